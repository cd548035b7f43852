"""Measure how far rollout log-probs (transformers generation) are from the recomputed pi_old, per precision.

    python -m gspo_benchmarks.rollout_mismatch [--steps 16] [--json out.json]

Trains a tiny random qwen3 (hidden 64, 2 layers, char vocabulary) with GSPOConfig(use_rollout_logprobs=True,
rollout_logprobs_check_interval=1), so every rollout also runs the pi_old forward and logs the sequence-level
mismatch (gspo/rollout_logprobs/*; see trl_gspo.pi_old.RolloutLogprobsPiOld). Settings compared:

- float32: weights, generation and training forward in float32.
- bf16 autocast: GSPOConfig(bf16=True): training forwards under bf16 autocast, generation in float32 (what
  GRPOTrainer does on CPU with bf16=True: the engine/trainer precision gap of a float32 engine).
- bf16 weights: the model itself in bfloat16, generation (with KV cache) and training forward both bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import warnings

import torch

SETTINGS = {
    "float32": dict(bf16=False, dtype=torch.float32),
    "bf16 autocast": dict(bf16=True, dtype=torch.float32),
    "bf16 weights": dict(bf16=False, dtype=torch.bfloat16),
}
METRICS = ("seq_abs_log_ratio_mean", "seq_abs_log_ratio_max", "outside_clip_band")


def measure(setting: str, steps: int = 16, seed: int = 0) -> dict:
    """Per-rollout mismatch metrics of one short training run in `setting` (see SETTINGS)."""
    import datasets

    from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
    from trl_gspo import GSPOConfig, GSPOTrainer

    options = SETTINGS[setting]
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, hidden_size=64, seed=seed, dtype=options["dtype"])
    prompts = [f"{i % 97:02d}+{(7 * i) % 89:02d}=" for i in range(256)]
    with tempfile.TemporaryDirectory() as output_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GSPOConfig(
            output_dir=output_dir,
            per_device_train_batch_size=8,
            num_generations=8,
            max_completion_length=64,
            max_steps=steps,
            learning_rate=1e-3,
            use_rollout_logprobs=True,
            rollout_logprobs_check_interval=1,
            bf16=options["bf16"],
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            seed=seed,
            disable_tqdm=True,
        )
        trainer = GSPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [float(len(c) % 4) for c in completions],
            args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
        )
        trainer.train()
    rows = [h for h in trainer.state.log_history if "gspo/rollout_logprobs/seq_abs_log_ratio_max" in h]
    return {metric: [h[f"gspo/rollout_logprobs/{metric}"] for h in rows] for metric in METRICS} | {
        "clip_band_log_high": rows[0]["gspo/rollout_logprobs/clip_band_log_high"] if rows else None
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps; one rollout per 4 steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {setting: measure(setting, args.steps) for setting in SETTINGS}
    print(
        "| setting | rollouts | mean abs seq log-ratio (median over rollouts) | max abs seq log-ratio (max) "
        "| sequences outside the clip band (mean) |"
    )
    print("|---|---|---|---|---|")
    for setting, r in results.items():
        print(
            f"| {setting} | {len(r['seq_abs_log_ratio_max'])} | {statistics.median(r['seq_abs_log_ratio_mean']):.2e} "
            f"| {max(r['seq_abs_log_ratio_max']):.2e} | {statistics.mean(r['outside_clip_band']):.3f} |"
        )
    band = next(iter(results.values()))["clip_band_log_high"]
    print(f"\nclip band: log(1 + epsilon_high) = {band:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
