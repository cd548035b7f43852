"""Cost of the MoE routing drift metric and of routing replay: training step time with each off and on.

    nice -n 10 .venv/bin/python scripts/measure_moe_overhead.py --repeats 3

A tiny Qwen3-MoE (hidden 128, 4 layers, 8 experts, top-2), GSPO with 4 optimizer steps per rollout, batch 16,
completions up to 32 tokens. The three settings run interleaved, `--repeats` times each, and the median of TRL's
`step_time` (forward + backward of one optimizer step, generation excluded) and the median wall time per step
(generation and the pi_old pass included) are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
from trl_gspo import GSPOConfig, GSPOTrainer

SETTINGS = {
    "drift off": dict(log_routing_drift=False),
    "drift on (default)": dict(log_routing_drift=True),
    "drift on + replay": dict(log_routing_drift=True, routing_replay=True),
}


def reward(completions, **kwargs):
    return [float(len(c[-1]["content"]) % 4) for c in completions]


def run(setting: dict, steps: int, output_dir: str) -> tuple[float, float]:
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tokenizer, model_type="qwen3_moe", hidden_size=128, num_layers=4, num_experts=8, seed=0
    )
    prompts = [[{"role": "user", "content": f"{i * 37}+{i % 11}="}] for i in range(256)]
    args = GSPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=16,
        num_generations=8,
        max_completion_length=32,
        max_steps=steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        **setting,
    )
    trainer = GSPOTrainer(
        model, reward, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    wall = (time.perf_counter() - start) / steps
    step_times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry]
    return statistics.median(step_times), wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    results = {name: ([], []) for name in SETTINGS}
    with tempfile.TemporaryDirectory() as output_dir:
        for _ in range(cli.repeats):
            for name, setting in SETTINGS.items():
                step, wall = run(setting, cli.steps, output_dir)
                results[name][0].append(step)
                results[name][1].append(wall)
    base_step = statistics.median(results["drift off"][0])
    base_wall = statistics.median(results["drift off"][1])
    print("| setting | step_time median (s) | vs off | wall per step incl. generation (s) | vs off |")
    print("|---|---|---|---|---|")
    for name, (steps, walls) in results.items():
        step, wall = statistics.median(steps), statistics.median(walls)
        print(f"| {name} | {step:.4f} | {step / base_step:.3f} | {wall:.4f} | {wall / base_wall:.3f} |")
