"""A/B benchmark: trl_gspo.GSPOTrainer against TRL's GRPOTrainer (gspo_benchmarks.cli; method: BENCHMARKS.md).

python scripts/benchmark.py                       # default tiny CPU run (~70 s on 2 busy cores)
python scripts/benchmark.py --quick --json out.json
python scripts/benchmark.py --help                # what is measured, every flag
"""

import sys

from gspo_benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
