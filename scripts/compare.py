"""GSPO vs GSPO-token vs GRPO on a built-in task (gspo_examples.compare; `--help` lists the flags).

python scripts/compare.py                                   # place task, seed 0, gspo/gspo_token/grpo, 300 steps
python scripts/compare.py --seeds 0 1 2 --arms gspo gspo_token gspo_dense
"""

from gspo_examples.compare import main

if __name__ == "__main__":
    main()
