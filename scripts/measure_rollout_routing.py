"""Rollout vs trainer routing and log-probs, with and without R3 (gspo_benchmarks.rollout_routing; docs/MOE.md).

python scripts/measure_rollout_routing.py
"""

from gspo_benchmarks.rollout_routing import main

if __name__ == "__main__":
    raise SystemExit(main())
