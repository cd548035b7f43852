"""GSPO vs GSPO with routing replay vs GRPO on a tiny Qwen3-MoE (gspo_examples.moe_experiment; docs/MOE.md).

python scripts/moe_experiment.py --seeds 0 1 2 --steps 120
"""

from gspo_examples.moe_experiment import main

if __name__ == "__main__":
    main()
