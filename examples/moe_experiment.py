"""A small MoE experiment on CPU: GSPO, GSPO with routing replay, and GRPO at equal steps, several seeds.

    nice -n 10 python scripts/moe_experiment.py --seeds 0 1 2 --steps 120 --output-dir runs/moe_experiment

The model is the demo's (gspo_examples.tasks.prepare_model) turned into a Qwen3-MoE (4 experts, top-2, expert size 256
so the active compute matches the dense demo model), warm-started with supervised steps on sort_digits to dev
accuracy 0.3 (cached). Each run then trains from that warm start with the demo recipe's settings (batch 64 = 8
prompts x 8, 4 optimizer steps per rollout, lr 1e-4 linear decay, temperature 0.5, exact-match reward):
  gspo         sequence ratio, clip 3e-4 / 4e-4 (the paper's)
  gspo_replay  the same with routing_replay=True (R2)
  grpo         token ratio, clip 0.2 / 0.27 (the paper's GRPO baseline), loss_type grpo
Reported per run: held-out greedy accuracy before/after (test split), routing drift averaged over the steps after
at least one update in their rollout, and clip fractions (sequences and tokens). Writes results.json, results.md
(a table of means and per-seed values) and moe_experiment.png. Whatever it shows is the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo_examples.tasks import greedy_accuracy, make_splits, prepare_model
from trl_gspo import GSPOConfig, GSPOTrainer
from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW
from trl_gspo.rewards import exact_match

TASK = "sort_digits"
MOE_MODEL = {"model_type": "qwen3_moe", "intermediate_size": 256, "num_experts": 4, "num_experts_per_tok": 2}
METHODS = {
    "gspo": dict(importance_sampling_level="sequence", epsilon=PAPER_EPSILON_LOW, epsilon_high=PAPER_EPSILON_HIGH),
    "gspo_replay": dict(
        importance_sampling_level="sequence",
        epsilon=PAPER_EPSILON_LOW,
        epsilon_high=PAPER_EPSILON_HIGH,
        routing_replay=True,
    ),
    "grpo": dict(importance_sampling_level="token", epsilon=0.2, epsilon_high=0.27),
}
STEPS_PER_GENERATION = 4


def train_one(model_dir: Path, splits: dict, method: str, seed: int, steps: int, output_dir: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    test = splits["test"]
    before = greedy_accuracy(model, tokenizer, test)
    args = GSPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=64,
        num_generations=8,
        steps_per_generation=STEPS_PER_GENERATION,
        max_completion_length=8,
        temperature=0.5,
        learning_rate=1e-4,
        lr_scheduler_type="linear",
        max_steps=steps,
        beta=0.0,
        loss_type="grpo",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=seed,
        disable_tqdm=True,
        **METHODS[method],
    )
    train = Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in splits["train"]])
    trainer = GSPOTrainer(model, exact_match, args=args, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = greedy_accuracy(trainer.model, tokenizer, test)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # steps 2..4 of each rollout: routing after 1..3 updates (step 1 has seen none and is 0 by construction)
    moved = [entry for entry in logs if (entry["step"] - 1) % STEPS_PER_GENERATION != 0]

    def mean(key, entries=logs):
        values = [entry[key] for entry in entries if key in entry]
        return statistics.fmean(values) if values else None

    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "seconds": seconds,
        "accuracy_before": before,
        "accuracy_after": after,
        "drift_token_layer": mean("moe/routing_drift/token_layer", moved),
        "drift_token_any_layer": mean("moe/routing_drift/token_any_layer", moved),
        "clip_sequences": mean("clip_ratio/region_mean", moved) if method != "grpo" else None,
        "clip_tokens": mean("gspo/clipped_token_fraction", moved)
        if method != "grpo"
        else mean("clip_ratio/region_mean", moved),
        "reward_first_rollout": logs[0]["reward"],
        "reward_last_rollout": [entry["reward"] for entry in logs if "reward" in entry][-1],
        "drift_curve": [(entry["step"], entry.get("moe/routing_drift/token_layer")) for entry in moved],
        "reward_curve": [(entry["step"], entry["reward"]) for entry in logs if "reward" in entry],
    }


def table(results: list[dict]) -> str:
    def fmt(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        "| method | seeds | test acc. before | test acc. after | gain | drift token-layer | drift token-any-layer "
        "| clipped sequences | clipped tokens | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue

        def avg(key, runs=runs):
            values = [r[key] for r in runs if r[key] is not None]
            return statistics.fmean(values) if values else None

        per_seed = ", ".join(f"{r['accuracy_after']:.3f}" for r in runs)
        lines.append(
            f"| {method} | {len(runs)} | {fmt(avg('accuracy_before'))} | {fmt(avg('accuracy_after'))} ({per_seed}) "
            f"| {fmt(avg('accuracy_after') - avg('accuracy_before'))} | {fmt(avg('drift_token_layer'))} "
            f"| {fmt(avg('drift_token_any_layer'))} | {fmt(avg('clip_sequences'))} | {fmt(avg('clip_tokens'))} "
            f"| {avg('seconds'):.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gspo": "tab:blue", "gspo_replay": "tab:green", "grpo": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        label = f"{r['method']} (seed {r['seed']})"
        steps, drift = zip(*r["drift_curve"], strict=True)
        axes[0].plot(steps, drift, color=colors[r["method"]], alpha=0.6, lw=1, label=label)
        steps, reward = zip(*r["reward_curve"], strict=True)
        axes[1].plot(steps, reward, color=colors[r["method"]], alpha=0.6, lw=1)
    axes[0].set(title="routing drift (token, layer) after 1-3 updates", xlabel="optimizer step", ylabel="fraction")
    axes[1].set(title="mean reward of the rollout", xlabel="optimizer step", ylabel="exact match")
    for i, method in enumerate(METHODS):
        runs = [r for r in results if r["method"] == method]
        axes[2].scatter([i] * len(runs), [r["accuracy_before"] for r in runs], color="grey", marker="_", s=200)
        axes[2].scatter([i] * len(runs), [r["accuracy_after"] for r in runs], color=colors[method])
    axes[2].set_xticks(range(len(METHODS)), list(METHODS))
    axes[2].set(title="held-out greedy accuracy (grey: before)", ylabel="accuracy")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output-dir", type=Path, default=Path("runs/moe_experiment"))
    flags = parser.parse_args(argv)
    torch.set_num_threads(1)
    model_dir, info = prepare_model(TASK, seed=0, model_kwargs=MOE_MODEL)
    splits = make_splits(TASK, seed=0)
    results = []
    for seed in flags.seeds:
        for method in flags.methods:
            result = train_one(model_dir, splits, method, seed, flags.steps, flags.output_dir / f"{method}-{seed}")
            print(json.dumps({k: v for k, v in result.items() if not k.endswith("curve")}))
            results.append(result)
    flags.output_dir.mkdir(parents=True, exist_ok=True)
    (flags.output_dir / "results.json").write_text(json.dumps({"warm_start": info, "runs": results}, indent=1))
    text = table(results)
    (flags.output_dir / "results.md").write_text(text + "\n")
    plot(results, flags.output_dir / "moe_experiment.png")
    print(text)
