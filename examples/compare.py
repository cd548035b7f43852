"""GSPO vs GSPO-token vs GRPO on one built-in task: same warm-started model, prompts, seeds and step budget.

For every seed the task's splits and the warm-started model (gspo_examples.tasks.prepare_model, cached) are shared by
all arms; each arm then trains a fresh copy with GSPOTrainer, its held-out greedy accuracy is recorded every
`eval_every` steps, and its log history is kept. The arms (`ARMS`):

    gspo        importance_sampling_level="sequence", clip 3e-4 / 4e-4, sequence reward exact_match
    gspo_token  "sequence_token" (GSPO-token), clip 3e-4 / 4e-4, exact_match plus the task's span reward
                (Task.span_reward, e.g. mismatch_spans) when it has one, else exact_match alone
    grpo        "token" (GRPO), clip 0.2 / 0.27, exact_match
    gspo_dense  "sequence", clip 3e-4 / 4e-4, exact_match plus the span reward summed into a number
                (token_rewards.summed_reward): the same reward information as gspo_token without the per-token
                credit, so gspo_token vs gspo_dense isolates where the credit goes
    gspo_token:<formulation>
                gspo_token trained with another token component (a name of
                gspo_examples.token_advantages.TOKEN_ADVANTAGES), e.g. gspo_token:position_baseline; plain
                gspo_token uses GSPOTrainer's own (group_centred)

Everything else is shared (gspo_examples.tasks defaults; `TrainSettings`): 64 completions per optimizer step (8 prompts
x 8), 4 optimizer steps per rollout, temperature 0.5, learning rate decayed linearly to 0, no KL, loss_type "grpo"
(one weight per sequence) for every arm.

`write_report` writes `comparison.md` (a table: held-out accuracy before -> after, final rollout reward, token- and
sequence-weighted clip fractions, diversity, length, held-out length gap (greedy completion minus answer, in
characters), wall time; mean +- std over seeds; then accuracy per seed and paired by seed against the first arm) and
`comparison.png` (reward, held-out accuracy and length gap over steps, both clip fractions, distinct fraction, mean
length, wall time). TRL's
GRPO loss logs only the token-weighted clip fraction (its `clip_ratio/region_mean` counts tokens); its
sequence-weighted fraction is n/a.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trl_gspo import metrics as names
from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW
from trl_gspo.plotting import save_figure, series
from trl_gspo.rewards import exact_match, get_reward_func
from trl_gspo.token_rewards import summed_reward

from .tasks import SPAN_REWARDS
from .token_advantages import TOKEN_ADVANTAGES, token_advantage_trainer


@dataclass(frozen=True)
class Arm:
    label: str
    importance_sampling_level: str
    epsilon: float
    epsilon_high: float
    use_span_reward: bool = False
    span_reward_summed: bool = False  # the span reward as one number per completion (sequence-level arms)
    token_advantage: str = "group_centred"  # the token component (a TOKEN_ADVANTAGES name; GSPO-token arms)


ARMS = {
    "gspo": Arm("GSPO (sequence reward)", "sequence", PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH),
    "gspo_token": Arm(
        "GSPO-token (span reward)", "sequence_token", PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH, use_span_reward=True
    ),
    "grpo": Arm("GRPO (token level, 0.2/0.27)", "token", 0.2, 0.27),
    "gspo_dense": Arm(
        "GSPO (span reward summed)", "sequence", PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH, True, span_reward_summed=True
    ),
}
DEFAULT_ARMS = ("gspo", "gspo_token", "grpo")
FORMULATION_SEPARATOR = ":"


def get_arm(name: str) -> Arm:
    """ARMS[name], or for "gspo_token:<formulation>" the gspo_token arm with that token component."""
    if name in ARMS:
        return ARMS[name]
    base, _, formulation = name.partition(FORMULATION_SEPARATOR)
    if base == "gspo_token" and formulation in TOKEN_ADVANTAGES:
        return replace(ARMS[base], label=f"GSPO-token ({formulation})", token_advantage=formulation)
    raise ValueError(
        f"unknown arm {name!r}: expected one of {', '.join(sorted(ARMS))} or gspo_token:<formulation> with a "
        f"formulation among {', '.join(TOKEN_ADVANTAGES)}"
    )


# (token-weighted, sequence-weighted) clip-fraction keys per importance-sampling level; None: not logged
CLIP_KEYS = {
    "sequence": (names.CLIPPED_TOKEN_FRACTION, names.GSPO_CLIP_REGION_MEAN),
    "sequence_token": (names.CLIPPED_TOKEN_FRACTION, names.GSPO_CLIP_REGION_MEAN),
    "token": (names.CLIP_REGION_MEAN, None),
}


@dataclass
class TrainSettings:
    steps: int = 300
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 64
    num_generations: int = 8
    steps_per_generation: int = 4
    max_completion_length: int = 8
    temperature: float = 0.5
    logging_steps: int = 4
    eval_every: int = 50
    test_rows: int = 256
    monitor_rows: int = 128
    threads: int = 1
    token_advantage_weight: float = 1.0  # lambda of GSPO-token's token component (GSPOConfig)
    target_accuracy: float = 0.3
    span_reward: str | None = None  # the span arms' span reward (see arm_reward_funcs); None: the task's
    split_sizes: dict | None = None
    model_kwargs: dict | None = field(default=None)


def arm_reward_funcs(arm: Arm, task, span_reward: str | None = None) -> list[Callable]:
    """exact_match, plus for span arms `span_reward` or else the task's span reward.

    `span_reward`: a name in gspo_examples.tasks.SPAN_REWARDS, or anything trl_gspo.rewards.get_reward_func resolves.
    """
    funcs = [exact_match]
    span_reward = span_reward or task.span_reward
    if arm.use_span_reward and span_reward:
        span = SPAN_REWARDS[span_reward] if span_reward in SPAN_REWARDS else get_reward_func(span_reward)
        funcs.append(summed_reward(span) if arm.span_reward_summed else span)
    return funcs


def run_arm(arm_name: str, task, seed: int, model_dir, splits: dict, settings: TrainSettings, output_dir) -> dict:
    """Train one arm from the warm-started model in `model_dir`; return its log history, accuracy and wall time."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_gspo.config import GSPOConfig

    from .tasks import HeldoutAccuracyCallback, greedy_accuracy

    arm = get_arm(arm_name)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    test_rows = splits["test"][: settings.test_rows]
    config = GSPOConfig(
        output_dir=str(Path(output_dir) / f"{arm_name}-seed{seed}"),
        importance_sampling_level=arm.importance_sampling_level,
        epsilon=arm.epsilon,
        epsilon_high=arm.epsilon_high,
        beta=0.0,
        loss_type="grpo",
        per_device_train_batch_size=settings.per_device_train_batch_size,
        num_generations=settings.num_generations,
        steps_per_generation=settings.steps_per_generation,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        max_steps=settings.steps,
        logging_steps=settings.logging_steps,
        token_advantage_weight=settings.token_advantage_weight,
        seed=seed,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = token_advantage_trainer(arm.token_advantage)(
        model=model,
        reward_funcs=arm_reward_funcs(arm, task, settings.span_reward),
        args=config,
        train_dataset=Dataset.from_list(splits["train"]),
        processing_class=tokenizer,
        callbacks=[HeldoutAccuracyCallback(tokenizer, test_rows[: settings.monitor_rows], settings.eval_every)],
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "arm": arm_name,
        "seed": seed,
        "train_seconds": seconds,
        "accuracy_after": greedy_accuracy(trainer.model, tokenizer, test_rows),
        "test_rows": len(test_rows),
        "log_history": trainer.state.log_history,
    }


def run_seed(
    task_name: str, arms: Sequence[str], seed: int, settings: TrainSettings, output_dir, cache_dir, log=print
) -> list[dict]:
    """Every arm on one seed: one warm start, shared by the arms.

    Each run is saved as run-<task>-<arm>-seed<seed>.json in `output_dir` when it ends, and reused instead of
    trained again when that file exists with the same settings: an interrupted comparison resumes, and a wider
    one (more seeds or arms) trains only what is new.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tasks import get_task, greedy_accuracy, make_splits, prepare_model

    torch.set_num_threads(settings.threads)
    task = get_task(task_name)
    splits = make_splits(task, seed, settings.split_sizes)
    model_dir, _ = prepare_model(
        task.name,
        seed=seed,
        cache_dir=cache_dir,
        split_sizes=settings.split_sizes,
        model_kwargs=settings.model_kwargs,
        target_accuracy=settings.target_accuracy,
        log=log,
    )
    test_rows = splits["test"][: settings.test_rows]
    before = greedy_accuracy(
        AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir), test_rows
    )
    results = []
    defaults = json.loads(json.dumps(asdict(TrainSettings())))
    for arm_name in arms:
        path = Path(output_dir) / f"run-{task.name}-{arm_name.replace(FORMULATION_SEPARATOR, '-')}-seed{seed}.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        # a settings field added since the run was saved counts at its default, which is what that run used
        if saved is not None and {**defaults, **saved["settings"]} == json.loads(json.dumps(asdict(settings))):
            log(f"== {task.name} seed {seed}: {get_arm(arm_name).label}: reusing {path}")
            results.append(saved)
            continue
        log(f"== {task.name} seed {seed}: {get_arm(arm_name).label}, {settings.steps} steps")
        result = run_arm(arm_name, task, seed, model_dir, splits, settings, output_dir)
        result["accuracy_before"] = before
        log(
            f"   {task.name} seed {seed} {arm_name}: held-out accuracy {before:.3f} -> "
            f"{result['accuracy_after']:.3f} ({result['train_seconds']:.0f} s of training)"
        )
        path.write_text(json.dumps({**result, "settings": asdict(settings)}))
        results.append(result)
    return results


def run_comparison(
    task_name: str,
    arms: Sequence[str],
    seeds: Sequence[int],
    settings: TrainSettings,
    output_dir,
    cache_dir=".cache/trl_gspo",
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> list[dict]:
    """Every arm on every seed (seed-major: one warm start per seed, shared by its arms); results saved as JSON.

    jobs > 1 runs that many seeds at once, each in its own process (with `settings.threads` torch threads).
    """
    for name in arms:
        get_arm(name)  # an unknown arm fails before any training
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        import multiprocessing

        with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_seed, task_name, arms, seed, settings, output_dir, cache_dir) for seed in seeds]
            per_seed = [future.result() for future in futures]
    else:
        per_seed = [run_seed(task_name, arms, seed, settings, output_dir, cache_dir, log) for seed in seeds]
    results = [result for seed_results in per_seed for result in seed_results]
    (output_dir / "results.json").write_text(
        json.dumps({"task": task_name, "settings": asdict(settings), "runs": results}, indent=1)
    )
    return results


# --- summaries and figures (pure functions of the results) ------------------------------------------------------


def late_mean(log_history: Sequence[dict], key: str | None, fraction: float = 0.25) -> float:
    """Mean of the last `fraction` of the logged values of `key` (NaN if none): the end-of-training level."""
    _, values = series(log_history, key)
    if not values:
        return math.nan
    tail = values[-max(1, round(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def last_value(log_history: Sequence[dict], key: str) -> float:
    """The last logged value of `key` (NaN if none): for held-out measurements, the one at the end of training."""
    _, values = series(log_history, key)
    return values[-1] if values else math.nan


def run_mean(log_history: Sequence[dict], key: str | None) -> float:
    _, values = series(log_history, key)
    return sum(values) / len(values) if values else math.nan


def summarize_run(result: dict) -> dict[str, float]:
    """One run's table row: accuracy before/after, final reward, clip fractions (whole run), diversity, length."""
    history = result["log_history"]
    token_key, sequence_key = CLIP_KEYS[get_arm(result["arm"]).importance_sampling_level]
    return {
        "accuracy_before": result["accuracy_before"],
        "accuracy_after": result["accuracy_after"],
        "final_exact_match": late_mean(history, "rewards/exact_match/mean"),
        "token_clip_fraction": run_mean(history, token_key),
        "sequence_clip_fraction": run_mean(history, sequence_key),
        "zero_variance_groups": run_mean(history, "signal/zero_variance_groups"),
        "distinct_fraction": late_mean(history, "diversity/distinct_fraction"),
        "length_mean": late_mean(history, "length/group_mean"),
        "length_gap_after": last_value(history, "heldout_length_gap"),
        "train_seconds": result["train_seconds"],
    }


COLUMNS = {
    "accuracy_before": ("held-out acc. before", "{:.3f}"),
    "accuracy_after": ("held-out acc. after", "{:.3f}"),
    "final_exact_match": ("rollout exact match (last 25%)", "{:.3f}"),
    "token_clip_fraction": ("clipped tokens", "{:.4f}"),
    "sequence_clip_fraction": ("clipped sequences", "{:.4f}"),
    "zero_variance_groups": ("zero-variance groups", "{:.3f}"),
    "distinct_fraction": ("distinct completions / group (last 25%)", "{:.3f}"),
    "length_mean": ("mean length (last 25%)", "{:.2f}"),
    "length_gap_after": ("held-out length gap after (chars)", "{:+.3f}"),
    "train_seconds": ("train wall time (s)", "{:.0f}"),
}


def _mean_std(values: list[float], fmt: str) -> str:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return fmt.format(finite[0])
    # a spread has no sign, even where the mean is written with one
    return f"{fmt.format(statistics.fmean(finite))} ± {fmt.replace('+', '').format(statistics.stdev(finite))}"


def markdown_table(results: Sequence[dict]) -> str:
    """Arms as rows, COLUMNS as columns, mean ± std over seeds (std only with 2 or more seeds)."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    header = ["arm", "seeds", *(label for label, _ in COLUMNS.values())]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        rows = [summarize_run(r) for r in runs]
        cells = [get_arm(arm).label, ",".join(str(r["seed"]) for r in runs)]
        cells += [_mean_std([row[key] for row in rows], fmt) for key, (_, fmt) in COLUMNS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(results: Sequence[dict]) -> str:
    """Held-out accuracy after training, one row per seed, one column per arm."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    lines = ["| seed | before | " + " | ".join(get_arm(a).label for a in arms) + " |", "|" + "---|" * (len(arms) + 2)]
    for seed in seeds:
        by_arm = {r["arm"]: r for r in results if r["seed"] == seed}
        before = next(iter(by_arm.values()))["accuracy_before"]
        cells = [f"{by_arm[a]['accuracy_after']:.3f}" if a in by_arm else "" for a in arms]
        lines.append(f"| {seed} | {before:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_length_difference(run: dict, reference: dict) -> float:
    """Mean over the steps both logged of `length/group_mean` minus the reference run's. With the same seed both
    arms draw the same prompts at every step, so this isolates how the arm changed completion length."""
    mine, theirs = (dict(zip(*series(r["log_history"], "length/group_mean"))) for r in (run, reference))
    common = sorted(set(mine) & set(theirs))
    return statistics.fmean(mine[s] - theirs[s] for s in common) if common else math.nan


def paired_difference_table(results: Sequence[dict]) -> str:
    """Per seed, each arm against the first arm on the same seed (same warm start, prompts and test rows): held-out
    accuracy after training minus the first arm's (mean ± std over the seeds both ran, and on how many seeds the arm
    was higher / lower / equal), and `paired_length_difference` (mean ± std over those seeds)."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    runs = {(r["arm"], r["seed"]): r for r in results}
    reference = arms[0]
    lines = [
        f"| arm | seeds | accuracy after - {get_arm(reference).label} | higher / lower / equal "
        f"| rollout length - {get_arm(reference).label}'s (tokens, same prompts) |",
        "|---|---|---|---|---|",
    ]
    for arm in arms[1:]:
        pairs = [(runs[a, seed], runs[reference, seed]) for a, seed in runs if a == arm and (reference, seed) in runs]
        differences = [mine["accuracy_after"] - theirs["accuracy_after"] for mine, theirs in pairs]
        wins = sum(d > 0 for d in differences), sum(d < 0 for d in differences), sum(d == 0 for d in differences)
        lengths = [paired_length_difference(mine, theirs) for mine, theirs in pairs]
        lines.append(
            f"| {get_arm(arm).label} | {','.join(str(mine['seed']) for mine, _ in pairs)} | "
            f"{_mean_std(differences, '{:+.3f}')} | "
            + " / ".join(map(str, wins))
            + f" | {_mean_std(lengths, '{:+.3f}')} |"
        )
    return "\n".join(lines)


def _mean_curve(runs: Sequence[dict], key: str | None) -> tuple[list[int], list[float]]:
    """Mean over runs at the steps every run logged."""
    curves = [dict(zip(*series(r["log_history"], key))) for r in runs]
    common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return common, [sum(c[s] for c in curves) / len(curves) for s in common]


def plot_comparison(results: Sequence[dict], path, title: str | None = None) -> Path:
    """3 x 4 panels, one line per arm (mean over seeds): reward, held-out accuracy, token- and sequence-weighted
    clip fractions, distinct fraction, mean length, length spread, zero-variance groups, held-out length gap, wall
    time (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in results))
    panels = [
        ("rollout exact match", lambda level: "rewards/exact_match/mean"),
        ("held-out greedy accuracy", lambda level: "heldout_accuracy"),
        ("clipped fraction, tokens (paper's count)", lambda level: CLIP_KEYS[level][0]),
        ("clipped fraction, sequences", lambda level: CLIP_KEYS[level][1]),
        ("distinct completions per group", lambda level: "diversity/distinct_fraction"),
        ("mean completion length (tokens)", lambda level: "length/group_mean"),
        ("length std inside groups", lambda level: "length/group_std"),
        ("groups without reward variance", lambda level: "signal/zero_variance_groups"),
        ("held-out greedy length - answer length (chars)", lambda level: "heldout_length_gap"),
    ]
    fig, axes = plt.subplots(3, 4, figsize=(24, 12))
    flat = list(axes.flat)
    for ax in flat[len(panels) : -1]:
        ax.axis("off")
    for ax, (name, key_for) in zip(flat, panels):
        for arm in arms:
            runs = [r for r in results if r["arm"] == arm]
            steps, values = _mean_curve(runs, key_for(get_arm(arm).importance_sampling_level))
            if steps:
                marker = "o" if name.startswith("held-out") else None
                ax.plot(steps, values, marker=marker, label=get_arm(arm).label)
        if "clipped" in name:
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    seconds = [[r["train_seconds"] for r in results if r["arm"] == arm] for arm in arms]
    flat[-1].bar(range(len(arms)), [statistics.fmean(s) for s in seconds])
    flat[-1].set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize="small")
    flat[-1].set_title("train wall time per run (s)")
    return save_figure(fig, path, title, dpi=90)


def write_report(results: Sequence[dict], output_dir, command: str, task_name: str, settings: TrainSettings) -> Path:
    """comparison.md (command, settings, tables) and comparison.png in `output_dir`; returns the markdown path."""
    output_dir = Path(output_dir)
    figure = plot_comparison(
        results, output_dir / "comparison.png", title=f"{task_name}: {settings.steps} steps per run, mean over seeds"
    )
    text = "\n\n".join(
        [
            f"# GSPO vs GSPO-token vs GRPO on `{task_name}`",
            f"Command: `{command}`",
            f"Settings: `{json.dumps(asdict(settings))}`",
            markdown_table(results),
            "Held-out accuracy after training, per seed:\n\n" + per_seed_table(results),
            "Paired by seed:\n\n" + paired_difference_table(results),
            f"![comparison]({figure.name})",
        ]
    )
    path = output_dir / "comparison.md"
    path.write_text(text + "\n")
    return path


# --- command line (scripts/compare.py) ---

COMMANDS = """GSPO vs GSPO-token (span reward) vs GRPO on a built-in task, on CPU: a markdown table and PNG figures.

The arms and what they share: gspo_examples.compare's docstring. Each seed warm-starts one model (cached under
--cache-dir), and every arm trains a copy of it for the same number of steps.

Commands
    python scripts/compare.py                                   # place task, seed 0, gspo/gspo_token/grpo, 300 steps
    python scripts/compare.py --seeds 0 1 2 --arms gspo gspo_token gspo_dense
    python scripts/compare.py --task sort_digits --steps 200 --output-dir runs/compare-sort
    python scripts/compare.py --task swap --arms gspo gspo_token:scaled gspo_token:position_baseline grpo --jobs 2

Writes <output-dir>/results.json (every run's log history), comparison.md and comparison.png.
"""


def checked_arm(name: str) -> str:
    try:
        get_arm(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def parse_flags(argv=None):
    parser = argparse.ArgumentParser(description=COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="place", help="built-in task (default place: local precision)")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(DEFAULT_ARMS),
        type=checked_arm,
        help=f"among {', '.join(sorted(ARMS))} and gspo_token:<formulation>, formulation one of "
        f"{', '.join(TOKEN_ADVANTAGES)} (the token component, gspo_examples.token_advantages)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="optimizer steps per run")
    parser.add_argument("--learning-rate", type=float, default=TrainSettings.learning_rate)
    parser.add_argument("--eval-every", type=int, default=TrainSettings.eval_every)
    parser.add_argument("--test-rows", type=int, default=TrainSettings.test_rows)
    parser.add_argument(
        "--token-advantage-weight",
        type=float,
        default=TrainSettings.token_advantage_weight,
        help="lambda of GSPO-token's group-normalised token component (GSPOConfig.token_advantage_weight)",
    )
    parser.add_argument(
        "--span-reward",
        default=None,
        help="span reward of the span arms: a gspo_examples.tasks.SPAN_REWARDS name or a dotted import path "
        "(default: the task's, e.g. mismatch_spans for place, first_mismatch_span for swap)",
    )
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--cache-dir", default=".cache/trl_gspo", help="where warm-started models are cached")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see scripts/demo.py)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once, one process each")
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps on a small model and small splits (for the tests)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    flags = parse_flags(argv)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    settings = TrainSettings(
        steps=flags.steps,
        learning_rate=flags.learning_rate,
        eval_every=flags.eval_every,
        test_rows=flags.test_rows,
        monitor_rows=min(TrainSettings.monitor_rows, flags.test_rows),
        threads=flags.threads,
        token_advantage_weight=flags.token_advantage_weight,
        span_reward=flags.span_reward,
    )
    if flags.tiny:
        settings.split_sizes = {"train": 64, "dev": 16, "test": 16}
        settings.model_kwargs = {"hidden_size": 32, "intermediate_size": 64}
        settings.target_accuracy = 0.0  # stop the warm start at its first check
        settings.per_device_train_batch_size = 16
        settings.logging_steps = 1
    start = time.perf_counter()
    results = run_comparison(
        flags.task, flags.arms, flags.seeds, settings, flags.output_dir, flags.cache_dir, jobs=flags.jobs
    )
    command = "python scripts/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = write_report(results, flags.output_dir, command.strip(), flags.task, settings)
    print(report.read_text())
    print(f"== wrote {report} and {report.with_suffix('.png')} in {time.perf_counter() - start:.0f} s")
    return report
