"""bf16 and fp16 error of GSPO's sequence log-ratio against float64 (gspo_benchmarks.precision; docs/PRECISION.md).

python scripts/measure_precision.py                       # lengths 16 64 256 1024, lr 1e-5 1e-6
python scripts/measure_precision.py --lengths 16 128 --json /tmp/precision.json
"""

from gspo_benchmarks.precision import main

if __name__ == "__main__":
    raise SystemExit(main())
