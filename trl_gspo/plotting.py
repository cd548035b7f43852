"""Figures of a GSPO (or GRPO) run from a Trainer's ``log_history`` (the list saved in trainer_state.json).

``plot_run(log_history, path)`` draws up to four panels over optimizer steps, each only if its keys were logged:

- reward: ``reward`` (mean over completions) with a +-``reward_std`` band;
- held-out accuracy: ``heldout_accuracy`` (logged by the demo's callback; greedy, exact match);
- clipping: sequence clip fractions ``clip_ratio/region_mean`` (also ``low_mean`` / ``high_mean``) and the
  paper's token-counted ``gspo/clipped_token_fraction``;
- sequence ratio: ``gspo/seq_ratio/min``, ``mean``, ``max`` with the clip range 1 - eps_low, 1 + eps_high if given.

A GRPO run has no ``gspo/`` keys: its ratio panel is skipped and the clip panel shows TRL's token fractions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

HELDOUT_ACCURACY_KEY = "heldout_accuracy"
REWARD_KEY, REWARD_STD_KEY = "reward", "reward_std"
SEQUENCE_CLIP_KEYS = {
    "clip_ratio/region_mean": "sequences clipped (all)",
    "clip_ratio/low_mean": "sequences clipped (low)",
    "clip_ratio/high_mean": "sequences clipped (high)",
}
TOKEN_CLIP_KEY = "gspo/clipped_token_fraction"
SEQ_RATIO_KEYS = ("gspo/seq_ratio/min", "gspo/seq_ratio/mean", "gspo/seq_ratio/max")


def series(log_history: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of every entry that logged a finite number under ``key``, in log order."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        steps.append(entry.get("step", len(steps)))
        values.append(float(value))
    return steps, values


def plot_run(
    log_history: Sequence[dict],
    path: str | os.PathLike,
    title: str | None = None,
    clip_range: tuple[float, float] | None = None,
) -> Path:
    """Write a PNG of the run's reward, held-out accuracy, clip fractions and sequence-ratio range to ``path``.

    Panels whose keys are absent are left out; ``clip_range=(eps_low, eps_high)`` draws 1 - eps_low and
    1 + eps_high on the ratio panel. Raises ValueError if the history holds none of the plotted keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    reward = series(log_history, REWARD_KEY)
    if reward[0]:
        panels.append("reward")
    if series(log_history, HELDOUT_ACCURACY_KEY)[0]:
        panels.append("accuracy")
    if any(series(log_history, key)[0] for key in [*SEQUENCE_CLIP_KEYS, TOKEN_CLIP_KEY]):
        panels.append("clip")
    if any(series(log_history, key)[0] for key in SEQ_RATIO_KEYS):
        panels.append("ratio")
    if not panels:
        raise ValueError(
            "plot_run: the log history holds none of the plotted keys "
            f"({REWARD_KEY}, {HELDOUT_ACCURACY_KEY}, clip_ratio/*, gspo/*); nothing to draw."
        )

    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, panels):
        if panel == "reward":
            steps, values = reward
            ax.plot(steps, values, color="tab:blue", label="mean reward")
            std_steps, stds = series(log_history, REWARD_STD_KEY)
            if std_steps == steps:
                ax.fill_between(
                    steps,
                    [v - s for v, s in zip(values, stds)],
                    [v + s for v, s in zip(values, stds)],
                    color="tab:blue",
                    alpha=0.2,
                    label="± std",
                )
            ax.set_title("reward (training rollouts)")
            ax.set_ylabel("reward")
        elif panel == "accuracy":
            steps, values = series(log_history, HELDOUT_ACCURACY_KEY)
            ax.plot(steps, values, marker="o", color="tab:green", label="held-out greedy accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("held-out accuracy (greedy, exact match)")
            ax.set_ylabel("accuracy")
        elif panel == "clip":
            for (key, label), color in zip(SEQUENCE_CLIP_KEYS.items(), ("tab:red", "tab:purple", "tab:orange")):
                steps, values = series(log_history, key)
                if steps:
                    style = "-" if key.endswith("region_mean") else ":"
                    ax.plot(steps, values, style, color=color, label=label)
            steps, values = series(log_history, TOKEN_CLIP_KEY)
            if steps:
                ax.plot(steps, values, "--", color="black", label="tokens clipped (paper's count)")
            ax.set_title("clipped fraction")
            ax.set_ylabel("fraction")
        elif panel == "ratio":
            low_steps, low = series(log_history, SEQ_RATIO_KEYS[0])
            high_steps, high = series(log_history, SEQ_RATIO_KEYS[2])
            if low_steps and low_steps == high_steps:
                ax.fill_between(low_steps, low, high, color="tab:gray", alpha=0.3, label="min..max")
            for key, style in zip(SEQ_RATIO_KEYS, (":", "-", ":")):
                steps, values = series(log_history, key)
                if steps:
                    ax.plot(
                        steps, values, style, color="tab:gray" if style == ":" else "black", label=key.split("/")[-1]
                    )
            if clip_range is not None:
                for i, bound in enumerate((1 - clip_range[0], 1 + clip_range[1])):
                    label = f"clip range [1-{clip_range[0]:g}, 1+{clip_range[1]:g}]" if i == 0 else None
                    ax.axhline(bound, color="tab:red", linewidth=0.8, linestyle="--", label=label)
            ax.set_title("sequence importance ratio s_i")
            ax.set_ylabel("ratio")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def find_trainer_state(path: str | os.PathLike) -> Path:
    """The trainer_state.json for ``path``: the file itself, ``path/trainer_state.json``, or that of the latest
    ``path/checkpoint-*`` folder. Raises FileNotFoundError naming ``path`` otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        direct = path / "trainer_state.json"
        if direct.is_file():
            return direct
        checkpoints = sorted(
            (p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
        )
        for checkpoint in reversed(checkpoints):
            if (checkpoint / "trainer_state.json").is_file():
                return checkpoint / "trainer_state.json"
    raise FileNotFoundError(
        f"no trainer_state.json found at {path} (looked for the file itself, {path}/trainer_state.json and "
        f"{path}/checkpoint-*/trainer_state.json)"
    )


def load_log_history(path: str | os.PathLike) -> list[dict]:
    """The ``log_history`` list of the trainer_state.json that ``find_trainer_state(path)`` finds."""
    state_path = find_trainer_state(path)
    state = json.loads(state_path.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{state_path} has no 'log_history' list; is it a Trainer's trainer_state.json?")
    return state["log_history"]
