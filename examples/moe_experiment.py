"""The MoE experiment on CPU: GSPO, GSPO with R2 or R3 routing replay, and GRPO, off-policy in two ways at once.

    python scripts/moe_experiment.py                      # default: 1 seed, both engines, every variant
    python scripts/moe_experiment.py --seeds 0 1 2 3 4 --workers 2 --output-dir runs/moe_experiment_5seeds
    python scripts/moe_experiment.py --dense --variants gspo grpo     # the dense control (no routing)

Two sources of off-policy training, as in the paper's MoE claim: minibatch staleness (4 optimizer steps per rollout,
a learning rate high enough for the routers to move) and a rollout engine that disagrees with the trainer. vLLM
cannot train an MoE on this CPU (its weight reload leaves the CPU MoE kernel's packed expert weights stale, and
colocate mode refuses MoE on CPU), so the half-precision engine is TRL's transformers generation run under bf16
autocast (`AutocastGenerationTrainer`, a knob of this harness, not of the trainer); float32 generation is the
control. Training is float32 throughout.

The model is the demo's shape (gspo_examples.tasks.prepare_model) as a Qwen3-MoE with more layers and experts
(`MOE_MODEL`: 4 layers, 8 experts of size 128, top-2), warm-started with supervised steps on sort_digits to dev
accuracy 0.3 (cached under --cache-dir, shared by every run). Each run trains a copy for the same number of steps
(batch 64 = 8 prompts x 8, 4 optimizer steps per rollout, lr decayed linearly to 0, temperature 0.5, exact match):

  variant        importance ratio, clip          pi_old
  gspo           sequence, 3e-4 / 4e-4 (paper)   recomputed by a forward after the rollout
  gspo_r2        the same, routing_replay (R2)   recomputed, with the pi_old pass's experts replayed in every step
  gspo_r3        the same, rollout_routing_replay (R3): the rollout's experts replayed in pi_old and every step
  grpo           token, 0.2 / 0.27 (paper's GRPO) recomputed
  gspo_rollout   as gspo                         the rollout's own log-probs (use_rollout_logprobs)
  grpo_rollout   as grpo                         the rollout's own log-probs
  gspo_r3_rollout  as gspo_r3                    the rollout's own log-probs, computed with the experts R3 replays

GSPOConfig refuses R2 with use_rollout_logprobs (R2 replays the pi_old forward's routing, and there is none), so R2
exists only with a recomputed pi_old; R3 replays the sampler's routing and composes with both. With a recomputed
pi_old the engine's log-probs never enter the loss; the bf16 engine then reaches training only through the samples
it draws and, under R3, through the experts it chose.

Reported per run (`summarize`): held-out greedy accuracy before, after and its lowest point along the curve (every
--eval-every steps on --monitor-rows test prompts), collapse (final accuracy more than COLLAPSE_MARGIN below the warm
start), rollout reward, routing drift (moe/routing_drift/*) and clip fractions over the steps after at least one
update in their rollout, the clip fraction at each rollout's first step (0 by construction with a recomputed pi_old),
and the engine/trainer mismatch: gspo/rollout_logprobs/* (rollout pi_old, checked every rollout) and
moe/rollout_routing_mismatch/* (R3). Writes results.json, results.md and moe_experiment.png.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from trl_gspo import metrics as names
from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW
from trl_gspo.plotting import save_figure, series
from trl_gspo.trainer import GSPOTrainer

TASK = "sort_digits"
MOE_MODEL = {
    "model_type": "qwen3_moe",
    "num_layers": 4,
    "intermediate_size": 128,
    "num_experts": 8,
    "num_experts_per_tok": 2,
}
# the dense control: the MoE's shape with one MLP as wide as its two active experts (routing replay refuses it)
DENSE_MODEL = {"model_type": "qwen3", "num_layers": 4, "intermediate_size": 256}
TINY_MODEL = {"model_type": "qwen3_moe", "hidden_size": 32, "num_layers": 2, "intermediate_size": 32}
TINY_SPLITS = {"train": 64, "dev": 16, "test": 16}
STEPS_PER_GENERATION = 4
COLLAPSE_MARGIN = 0.05
GSPO = dict(importance_sampling_level="sequence", epsilon=PAPER_EPSILON_LOW, epsilon_high=PAPER_EPSILON_HIGH)
GRPO = dict(importance_sampling_level="token", epsilon=0.2, epsilon_high=0.27)
ROLLOUT_PI_OLD = dict(use_rollout_logprobs=True, rollout_logprobs_check_interval=1)
VARIANTS = {
    "gspo": GSPO,
    "gspo_r2": {**GSPO, "routing_replay": True},
    "gspo_r3": {**GSPO, "rollout_routing_replay": True},
    "grpo": GRPO,
    "gspo_rollout": {**GSPO, **ROLLOUT_PI_OLD},
    "grpo_rollout": {**GRPO, **ROLLOUT_PI_OLD},
    "gspo_r3_rollout": {**GSPO, "rollout_routing_replay": True, **ROLLOUT_PI_OLD},
}
GENERATION_DTYPES = {"float32": None, "bf16": torch.bfloat16}


class AutocastGenerationTrainer(GSPOTrainer):
    """GSPOTrainer whose rollouts run under CPU autocast at `generation_dtype` (None: float32), standing in for a
    half-precision inference engine. Everything that happens during generation sees it: the sampled tokens, the
    rollout log-probs (use_rollout_logprobs) and the experts R3 records; the trainer's own passes stay float32."""

    def __init__(self, *args, generation_dtype: torch.dtype | None = None, **kwargs):
        self.generation_dtype = generation_dtype
        super().__init__(*args, **kwargs)

    def _generate_single_turn(self, *args, **kwargs):
        dtype = self.generation_dtype
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return super()._generate_single_turn(*args, **kwargs)


def train_one(job: dict) -> dict:
    """One run: `job` holds variant, generation, seed, steps, learning_rate, eval_every, model_dir, splits,
    batch, output_dir. Returns the run's summary inputs (accuracies, wall and CPU time, log history)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_examples.tasks import HeldoutAccuracyCallback, greedy_accuracy
    from trl_gspo import GSPOConfig
    from trl_gspo.rewards import exact_match

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    test = job["splits"]["test"]
    monitor = test[: job["monitor_rows"]]
    before = greedy_accuracy(model, tokenizer, test)
    args = GSPOConfig(
        output_dir=job["output_dir"],
        per_device_train_batch_size=job["batch"],
        num_generations=8,
        steps_per_generation=STEPS_PER_GENERATION,
        max_completion_length=8,
        temperature=0.5,
        learning_rate=job["learning_rate"],
        lr_scheduler_type="linear",
        max_steps=job["steps"],
        beta=0.0,
        loss_type="grpo",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=job["seed"],
        disable_tqdm=True,
        **VARIANTS[job["variant"]],
    )
    trainer = AutocastGenerationTrainer(
        model,
        exact_match,
        args=args,
        train_dataset=Dataset.from_list(
            [{"prompt": r["prompt"], "answer": r["answer"]} for r in job["splits"]["train"]]
        ),
        processing_class=tokenizer,
        callbacks=[HeldoutAccuracyCallback(tokenizer, monitor, job["eval_every"])],
        generation_dtype=GENERATION_DTYPES[job["generation"]],
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return {
        "variant": job["variant"],
        "generation": job["generation"],
        "seed": job["seed"],
        "steps": job["steps"],
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "accuracy_before": before,
        "accuracy_after": greedy_accuracy(trainer.model, tokenizer, test),
        "log_history": trainer.state.log_history,
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def summarize(run: dict) -> dict:
    """Per-run numbers from the log history (one entry per optimizer step: logging_steps=1)."""
    logs = [e for e in run["log_history"] if "loss" in e]
    first = [e for e in logs if (e["step"] - 1) % STEPS_PER_GENERATION == 0]
    moved = [e for e in logs if (e["step"] - 1) % STEPS_PER_GENERATION != 0]  # after 1-3 updates in the rollout
    sequence_level = VARIANTS[run["variant"]]["importance_sampling_level"] == "sequence"

    def mean(key, entries=logs):
        return _mean(e.get(key) for e in entries)

    _, curve = series(run["log_history"], "heldout_accuracy")
    rewards = [e["reward"] for e in logs if "reward" in e]
    tail = rewards[-max(1, len(rewards) // 4) :]
    return {
        "accuracy_before": run["accuracy_before"],
        "accuracy_after": run["accuracy_after"],
        "accuracy_lowest": min(curve) if curve else None,
        "collapsed": run["accuracy_after"] < run["accuracy_before"] - COLLAPSE_MARGIN,
        "reward_last_quarter": _mean(tail),
        "drift_token_layer": mean("moe/routing_drift/token_layer", moved),
        "drift_token_any_layer": mean("moe/routing_drift/token_any_layer", moved),
        # TRL's GRPO loss counts clip_ratio/region_mean in tokens; GSPO's own sequence count is under gspo/
        "clip_sequences": mean(names.GSPO_CLIP_REGION_MEAN, moved) if sequence_level else None,
        "clip_tokens": mean(names.CLIPPED_TOKEN_FRACTION if sequence_level else names.CLIP_REGION_MEAN, moved),
        "first_step_clip": mean(
            names.FIRST_STEP_OUTSIDE_CLIP_BAND if sequence_level else names.CLIP_REGION_MEAN, first
        ),
        "mismatch_seq_abs_log_ratio": mean("gspo/rollout_logprobs/seq_abs_log_ratio_mean"),
        "mismatch_outside_clip_band": mean("gspo/rollout_logprobs/outside_clip_band"),
        "routing_mismatch_token_layer": mean("moe/rollout_routing_mismatch/token_layer"),
        "routing_mismatch_token_any_layer": mean("moe/rollout_routing_mismatch/token_any_layer"),
        "seconds": run["seconds"],
        "cpu_seconds": run["cpu_seconds"],
    }


COLUMNS = {
    "accuracy_after": ("test acc. after", ".3f"),
    "accuracy_lowest": ("lowest monitored acc.", ".3f"),
    "reward_last_quarter": ("reward, last quarter", ".3f"),
    "drift_token_layer": ("drift token-layer", ".3f"),
    "drift_token_any_layer": ("drift token-any-layer", ".3f"),
    "clip_sequences": ("clipped seq.", ".3f"),
    "clip_tokens": ("clipped tokens", ".3f"),
    "first_step_clip": ("first-step clipped", ".3f"),
    "mismatch_seq_abs_log_ratio": ("engine mismatch mean abs seq log-ratio", ".1e"),
    "mismatch_outside_clip_band": ("mismatch outside clip band", ".3f"),
    "routing_mismatch_token_layer": ("rollout routing mismatch token-layer", ".4f"),
    "routing_mismatch_token_any_layer": ("rollout routing mismatch token-any-layer", ".4f"),
    "seconds": ("s/run", ".0f"),
}


def table(results: list[dict]) -> str:
    """Means over seeds for each (generation, variant); accuracy after with its per-seed values and std."""
    header = ["generation", "variant", "seeds", "test acc. before", *(label for label, _ in COLUMNS.values())]
    header.insert(header.index("test acc. after") + 1, "acc. after per seed")
    header.insert(header.index("acc. after per seed") + 1, "collapsed")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for generation in GENERATION_DTYPES:
        for variant in VARIANTS:
            runs = [summarize(r) for r in results if r["variant"] == variant and r["generation"] == generation]
            if not runs:
                continue
            cells = [generation, variant, str(len(runs)), f"{_mean(r['accuracy_before'] for r in runs):.3f}"]
            for key, (_, fmt) in COLUMNS.items():
                value = _mean(r[key] for r in runs)
                if key == "accuracy_after" and len(runs) > 1:
                    cells.append(f"{value:.3f} +- {statistics.stdev(r[key] for r in runs):.3f}")
                else:
                    cells.append("n/a" if value is None else format(value, fmt))
                if key == "accuracy_after":
                    cells.append(", ".join(f"{r[key]:.3f}" for r in runs))
                    cells.append(f"{sum(r['collapsed'] for r in runs)}/{len(runs)}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLORS = dict(zip(VARIANTS, ["tab:blue", "tab:green", "tab:olive", "tab:red", "tab:purple", "tab:orange"]))
PANELS = [
    ("heldout_accuracy", "held-out greedy accuracy", None),
    ("reward", "mean rollout reward", None),
    ("moe/routing_drift/token_layer", "routing drift (token, layer)", "moved"),
    # (key of the sequence-level variants, key of the token-level ones)
    ((names.GSPO_CLIP_REGION_MEAN, names.CLIP_REGION_MEAN), "clipped (GSPO: seq., GRPO: tokens)", "moved"),
    ("gspo/first_step_outside_clip_band", "GSPO seq. outside clip band, step 1", None),
]


def _panel_key(keys, variant):
    """A PANELS key for one variant: the key itself, or the first of (sequence-level key, token-level key)."""
    if isinstance(keys, str):
        return keys
    return keys[VARIANTS[variant]["importance_sampling_level"] != "sequence"]


def _mean_curve(runs, key, which):
    """Mean over runs of `key` per step (runs share their steps); `which`='moved' keeps steps 2-4 of each rollout."""
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for step, value in zip(*series(run["log_history"], key), strict=True):
            if which == "moved" and (step - 1) % STEPS_PER_GENERATION == 0:
                continue
            by_step.setdefault(int(step), []).append(value)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[s]) for s in steps]


def plot(results: list[dict], path: Path) -> Path:
    """One row per generation precision: accuracy, reward, drift (steps 2-4 of each rollout), clip fraction (steps
    2-4) and the share of sequences outside GSPO's clip band at each rollout's first step; means over seeds."""
    from trl_gspo.plotting import _pyplot

    plt = _pyplot()
    generations = [g for g in GENERATION_DTYPES if any(r["generation"] == g for r in results)]
    fig, axes = plt.subplots(len(generations), len(PANELS), figsize=(5 * len(PANELS), 3.6 * len(generations)))
    axes = [axes] if len(generations) == 1 else axes
    for row, generation in zip(axes, generations, strict=True):
        for ax, (keys, title, which) in zip(row, PANELS, strict=True):
            for variant in VARIANTS:
                runs = [r for r in results if r["variant"] == variant and r["generation"] == generation]
                steps, values = _mean_curve(runs, _panel_key(keys, variant), which)
                if steps:
                    ax.plot(steps, values, color=COLORS[variant], lw=1.2, label=variant)
            ax.set(title=title, xlabel="optimizer step")
        row[0].set_ylabel(f"{generation} generation")
        row[0].legend(fontsize=7)
    return save_figure(fig, path)


def parse_flags(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--generation", nargs="+", default=list(GENERATION_DTYPES), choices=list(GENERATION_DTYPES))
    parser.add_argument("--eval-every", type=int, default=8, help="held-out accuracy every this many steps")
    parser.add_argument("--monitor-rows", type=int, default=128, help="test prompts in the held-out curve")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (one CPU thread each)")
    parser.add_argument("--dense", action="store_true", help="the dense control model (DENSE_MODEL) instead")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-32 MoE and 64/16/16 splits (tests)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/moe_experiment"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/trl_gspo"))
    parser.add_argument(
        "--from-results", type=Path, nargs="+", help="results.json files to tabulate and plot together, no training"
    )
    return parser.parse_args(argv)


def write_report(results: list[dict], output_dir: Path, header: str) -> Path:
    """results.md (the header line, then the table) and moe_experiment.png in `output_dir`; returns results.md."""
    output_dir.mkdir(parents=True, exist_ok=True)
    report = output_dir / "results.md"
    report.write_text(f"{header}\n\n{table(results)}\n")
    plot(results, output_dir / "moe_experiment.png")
    return report


def run_grid(flags) -> tuple[dict, list[dict]]:
    """Warm-start (or reuse) the model, then train every (seed, generation, variant) of the flags; returns the
    warm start's info and the runs."""
    from gspo_examples.tasks import make_splits, prepare_model

    model_kwargs, split_sizes = (TINY_MODEL, TINY_SPLITS) if flags.tiny else (MOE_MODEL, None)
    if flags.dense:
        model_kwargs = DENSE_MODEL
    model_dir, info = prepare_model(
        TASK,
        seed=0,
        cache_dir=flags.cache_dir,
        split_sizes=split_sizes,
        model_kwargs=model_kwargs,
        target_accuracy=0.0 if flags.tiny else 0.3,  # tiny: stop the warm start at its first check
    )
    splits = make_splits(TASK, seed=0, sizes=split_sizes)
    jobs = [
        {
            "variant": variant,
            "generation": generation,
            "seed": seed,
            "steps": flags.steps,
            "learning_rate": flags.learning_rate,
            "eval_every": flags.eval_every,
            "monitor_rows": flags.monitor_rows,
            "batch": 16 if flags.tiny else 64,
            "model_dir": str(model_dir),
            "splits": splits,
            "output_dir": str(flags.output_dir / f"{variant}-{generation}-{seed}"),
        }
        for seed in flags.seeds
        for generation in flags.generation
        for variant in flags.variants
    ]
    if flags.workers > 1:  # spawn: a fresh interpreter per worker, no forked torch state
        with ProcessPoolExecutor(flags.workers, mp_context=get_context("spawn")) as pool:
            return info, list(pool.map(train_one, jobs))
    return info, [train_one(job) for job in jobs]


def main(argv=None) -> Path:
    flags = parse_flags(argv)
    command = ("python scripts/moe_experiment.py " + shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    if flags.from_results:  # re-tabulate and re-plot saved runs, no training
        saved = [json.loads(Path(path).read_text()) for path in flags.from_results]
        runs = [run for result in saved for run in result["runs"]]
        lines = [
            f"`{r['command']}`: {r['timing']['wall_seconds']:.0f} s wall, {r['timing']['cpu_seconds']:.0f} s CPU"
            for r in saved
        ]
        report = write_report(runs, flags.output_dir, "\n".join(lines))
        print(report.read_text())
        return report
    torch.set_num_threads(1)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    info, results = run_grid(flags)
    for run in results:
        print(
            json.dumps(
                {"variant": run["variant"], "generation": run["generation"], "seed": run["seed"], **summarize(run)}
            )
        )
    # spawned workers' CPU time counts too: RUSAGE_CHILDREN covers the workers, which have exited by now
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    timing = {
        "wall_seconds": time.perf_counter() - start_wall,
        "cpu_seconds": time.process_time() - start_cpu + children.ru_utime + children.ru_stime,
    }
    flags.output_dir.mkdir(parents=True, exist_ok=True)
    (flags.output_dir / "results.json").write_text(
        json.dumps({"command": command, "warm_start": info, "timing": timing, "runs": results}, indent=1)
    )
    report = write_report(
        results,
        flags.output_dir,
        f"`{command}`: {timing['wall_seconds']:.0f} s wall, {timing['cpu_seconds']:.0f} s CPU",
    )
    print(report.read_text())
    return report
