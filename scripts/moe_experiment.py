"""GSPO vs GSPO + R2 / R3 routing replay vs GRPO on a tiny Qwen3-MoE, recomputed or rollout pi_old, bf16-autocast or
float32 generation (gspo_examples.moe_experiment; docs/MOE.md section 6).

python scripts/moe_experiment.py                                   # default: 1 seed, every variant, both engines
python scripts/moe_experiment.py --seeds 1 2 3 4 --generation bf16 --output-dir runs/moe_bf16
"""

from gspo_examples.moe_experiment import main

if __name__ == "__main__":
    main()
