"""max |s_i - 1| at learning rate 0 per source of train-mode randomness (gspo_benchmarks.noise; docs/NOISE.md).

python scripts/measure_noise.py
"""

from gspo_benchmarks.noise import main

if __name__ == "__main__":
    main()
