"""Train a causal LM with GSPO (Group Sequence Policy Optimization, arXiv 2507.18071) from a YAML recipe.

Launch (any field of the recipe can be overridden on the command line):

    # one process (CPU or one GPU)
    python scripts/train_gspo.py --config recipes/tiny/sort_digits/gspo.yaml
    # several GPUs: DDP, DeepSpeed ZeRO-2/3, FSDP2 (set --num_processes to your GPU count)
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml --num_processes 8 \
        scripts/train_gspo.py --config recipes/qwen2.5-1.5b/gsm8k/gspo_full.yaml
    # resume the last checkpoint of a run that stopped
    python scripts/train_gspo.py --config <recipe> --output_dir <same dir> --resume true

Where this departs from the textbook algorithm (all of it in trl_gspo/, not here):
  1. pi_old is the policy that generated the batch; the paper's 4 minibatches per rollout are
     steps_per_generation = 4 * gradient_accumulation_steps (GSPOConfig's default).
  2. The log-ratio is clamped to +-log_ratio_bound (10) before exp so it cannot overflow.
  3. Sequences with no unmasked token (all tool output, or masked as truncated) contribute 0; the loss is still
     divided by the micro-batch size, so the other sequences' weights do not change.
  4. With vLLM, the engine/trainer mismatch is corrected by the geometric mean of token ratios (GSPO's own form),
     not TRL's product over tokens.
"""

from trl_gspo.cli import main

if __name__ == "__main__":
    main()
