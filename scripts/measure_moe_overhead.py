"""Cost of the MoE routing drift metric and of routing replay (gspo_benchmarks.moe_overhead; docs/MOE.md).

nice -n 10 .venv/bin/python scripts/measure_moe_overhead.py --repeats 3
"""

from gspo_benchmarks.moe_overhead import main

if __name__ == "__main__":
    main()
