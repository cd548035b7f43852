"""Figures of a GSPO (or GRPO) run from a Trainer's ``log_history`` (the list saved in trainer_state.json).

``plot_run(log_history, path)`` draws up to four panels over optimizer steps, each only if its keys were logged:

- reward: ``reward`` (mean over completions) with a +-``reward_std`` band, kept inside [0, 1] when the logged
  values are those of a [0, 1] reward (see ``reward_bounds``);
- held-out accuracy: ``heldout_accuracy`` (logged by the demo's callback; greedy, exact match);
- clipping: GSPO's sequence clip fractions ``gspo/clip_ratio/region_mean`` (also ``low_mean`` / ``high_mean``) drawn
  thin over the paper's token-counted ``gspo/clipped_token_fraction``, drawn wide and pale (they often coincide); a
  run without them (GRPO) shows TRL's ``clip_ratio/region_mean`` (token fractions there);
- sequence ratio: ``gspo/seq_ratio/min``, ``mean``, ``max`` as s_i - 1 on a symmetric log scale, with the unclipped
  band [-eps_low, +eps_high] shaded if the clip range is given.

A panel whose keys a run did not log is left out, and ``absent_panels`` names it (a GRPO run has no ``gspo/`` keys:
no ratio panel). Key definitions: trl_gspo/metrics.py. A history with none of the keys is an error that says
what it holds. Drawing needs matplotlib, the optional ``trl-gspo[plots]`` extra.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from . import metrics as names
from .checkpoints import TRAINER_STATE, checkpoint_folders

HELDOUT_ACCURACY_KEY = "heldout_accuracy"
REWARD_KEY, REWARD_STD_KEY = "reward", "reward_std"
SEQUENCE_CLIP_KEYS = {
    names.GSPO_CLIP_REGION_MEAN: "sequences clipped (all)",
    names.GSPO_CLIP_LOW_MEAN: "sequences clipped (low)",
    names.GSPO_CLIP_HIGH_MEAN: "sequences clipped (high)",
}
TOKEN_CLIP_KEY = names.CLIPPED_TOKEN_FRACTION
TRL_CLIP_KEY = names.CLIP_REGION_MEAN  # drawn only for a run without GSPO's own (GRPO: a token fraction)
# The largest std TRL can log for rewards in [0, 1]: half 0s, half 1s, with the unbiased (n - 1) estimate over
# n >= 2 completions: 0.5 * sqrt(n / (n - 1)) <= 0.5 * sqrt(2).
MAX_UNIT_REWARD_STD = 0.5 * math.sqrt(2) + 1e-9
SEQ_RATIO_KEYS = (names.SEQ_RATIO_MIN, names.SEQ_RATIO_MEAN, names.SEQ_RATIO_MAX)
# panel -> (what it shows, the keys that put it in the figure)
PANEL_KEYS = {
    "reward": ("reward", (REWARD_KEY,)),
    "accuracy": ("held-out accuracy", (HELDOUT_ACCURACY_KEY,)),
    "clip": ("clipped fraction", (*SEQUENCE_CLIP_KEYS, TOKEN_CLIP_KEY, TRL_CLIP_KEY)),
    "ratio": ("sequence ratio", SEQ_RATIO_KEYS),
}
MATPLOTLIB_MISSING = (
    "drawing a figure needs matplotlib, which is not installed: install the `plots` extra with "
    "`pip install 'trl-gspo[plots]'` (from a checkout: `pip install -e '.[plots]'`)."
)


def series(log_history: Sequence[dict], key: str | None) -> tuple[list[float], list[float]]:
    """(steps, values) of every entry that logged a finite number under ``key``, in log order; empty for None."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        steps.append(entry.get("step", len(steps)))
        values.append(float(value))
    return steps, values


def reward_bounds(means: Sequence[float], stds: Sequence[float]) -> tuple[float, float] | None:
    """(0, 1) when every logged mean lies in [0, 1] and every std is at most MAX_UNIT_REWARD_STD, as for a reward
    in [0, 1]; else None. The reward panel keeps its ±std band inside these bounds."""
    if all(0.0 <= m <= 1.0 for m in means) and all(s <= MAX_UNIT_REWARD_STD for s in stds):
        return (0.0, 1.0)
    return None


def present_panels(log_history: Sequence[dict]) -> list[str]:
    """The panels of PANEL_KEYS, in figure order, for which the history logged at least one finite value."""
    return [panel for panel, (_, keys) in PANEL_KEYS.items() if any(series(log_history, key)[0] for key in keys)]


def absent_panels(log_history: Sequence[dict]) -> list[str]:
    """What the figure leaves out for this history: 'held-out accuracy (heldout_accuracy)', one string per panel."""
    present = present_panels(log_history)
    return [f"{title} ({', '.join(keys)})" for panel, (title, keys) in PANEL_KEYS.items() if panel not in present]


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError naming the `plots` extra when it is missing."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(MATPLOTLIB_MISSING) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_folder(state_path: str | os.PathLike) -> Path:
    """The run folder of a trainer_state.json: its folder, or the run above it when it sits in a checkpoint-*/."""
    folder = Path(state_path).parent
    return folder.parent if folder.name.startswith("checkpoint-") else folder


def plot_run(
    log_history: Sequence[dict],
    path: str | os.PathLike,
    title: str | None = None,
    clip_range: tuple[float, float] | None = None,
) -> Path:
    """Write a PNG of the run's panels (module docstring) to ``path``; ``clip_range=(eps_low, eps_high)`` shades the
    unclipped band on the ratio panel. ValueError saying what the history holds if it has none of the plotted keys.
    """
    plt = _pyplot()
    panels = present_panels(log_history)
    if not panels:
        raise ValueError(nothing_to_draw_message(log_history))

    columns = 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, panel in zip(flat, panels):
        if panel == "reward":
            steps, values = series(log_history, REWARD_KEY)
            ax.plot(steps, values, color="tab:blue", label="mean reward")
            std_steps, stds = series(log_history, REWARD_STD_KEY)
            if std_steps == steps:
                bounds = reward_bounds(values, stds)
                label = "± std over completions" + (f", within [{bounds[0]:g}, {bounds[1]:g}]" if bounds else "")
                # a [0, 1] reward: mean ± std would run past what a reward can be
                floor, ceiling = bounds or (-math.inf, math.inf)
                low = [max(v - s, floor) for v, s in zip(values, stds)]
                high = [min(v + s, ceiling) for v, s in zip(values, stds)]
                ax.fill_between(steps, low, high, color="tab:blue", alpha=0.2, label=label)
            ax.set_title("reward (training rollouts)")
            ax.set_ylabel("reward")
        elif panel == "accuracy":
            steps, values = series(log_history, HELDOUT_ACCURACY_KEY)
            ax.plot(steps, values, marker="o", color="tab:green", label="held-out greedy accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("held-out accuracy (greedy, exact match)")
            ax.set_ylabel("accuracy")
        elif panel == "clip":
            # the token count is drawn wide and pale underneath, the sequence counts thin on top: under GSPO they
            # are often equal (one flag per sequence), and neither may hide the other
            steps, values = series(log_history, TOKEN_CLIP_KEY)
            if steps:
                ax.plot(
                    steps, values, color="tab:orange", linewidth=5, alpha=0.45, label="tokens clipped (paper's count)"
                )
            drawn = False
            for (key, label), color in zip(SEQUENCE_CLIP_KEYS.items(), ("tab:red", "tab:purple", "tab:green")):
                steps, values = series(log_history, key)
                if steps:
                    style = "-" if key.endswith("region_mean") else ":"
                    ax.plot(steps, values, style, color=color, linewidth=1.2, label=label)
                    drawn = True
            steps, values = series(log_history, TRL_CLIP_KEY)
            if steps and not drawn:
                ax.plot(steps, values, color="tab:red", linewidth=1.2, label=f"{TRL_CLIP_KEY} (TRL's)")
            ax.set_title("clipped fraction")
            ax.set_ylabel("fraction")
        elif panel == "ratio":
            # s_i - 1 on a symmetric log scale: the ratio moves by ~1e-3 around 1, where a linear axis shows a
            # flat line and hides a 3e-4 clip band
            ratio = {key: series(log_history, key) for key in SEQ_RATIO_KEYS}
            (low_steps, low), _, (high_steps, high) = ratio.values()
            if low_steps and low_steps == high_steps:
                band = [x - 1 for x in low], [x - 1 for x in high]
                ax.fill_between(low_steps, *band, color="tab:gray", alpha=0.3, label="min..max")
            for (key, (steps, values)), style in zip(ratio.items(), (":", "-", ":")):
                if steps:
                    color = "tab:gray" if style == ":" else "black"
                    ax.plot(steps, [x - 1 for x in values], style, color=color, label=key.split("/")[-1])
            linear_below = 1e-5
            if clip_range is not None:
                eps_low, eps_high = clip_range
                unclipped = f"unclipped band [-{eps_low:g}, +{eps_high:g}]"
                ax.axhspan(-eps_low, eps_high, color="tab:red", alpha=0.15, label=unclipped)
                linear_below = 10 ** math.floor(math.log10(min(clip_range)))
            ax.set_yscale("symlog", linthresh=linear_below)
            ax.axhline(0.0, color="black", linewidth=0.5)
            ax.set_title("sequence importance ratio: s_i - 1 (symmetric log scale)")
            ax.set_ylabel("s_i - 1")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if panel == "ratio":  # five entries over lines that fill the panel: below it, covering nothing
            ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
        else:
            ax.legend(fontsize="x-small", loc="best", framealpha=0.6)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    return save_figure(fig, path, title)


def nothing_to_draw_message(log_history: Sequence[dict]) -> str:
    plotted = ", ".join(key for _, keys in PANEL_KEYS.values() for key in keys)
    if not log_history:
        return (
            "the log history is empty: the run logged no step (it ran fewer steps than its logging_steps, or "
            f"stopped before the first log); nothing to draw. Rerun with logging_steps=1. Plotted keys: {plotted}."
        )
    logged = sorted({key for entry in log_history for key in entry if key != "step"})
    return (
        f"the log history holds none of the plotted keys ({plotted}); nothing to draw. It logged: "
        f"{', '.join(logged[:12])}{', ...' if len(logged) > 12 else ''}."
    )


def save_figure(fig, path: str | os.PathLike, title: str | None = None, dpi: int = 100) -> Path:
    """Title, lay out and write a figure to `path` (its folder made if missing), then free it; returns the path."""
    plt = _pyplot()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def find_trainer_state(path: str | os.PathLike) -> Path:
    """The trainer_state.json for ``path``: the file itself, ``path/trainer_state.json``, or that of the latest
    ``path/checkpoint-*`` folder. Raises FileNotFoundError naming ``path`` otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path, *checkpoint_folders(path)):  # the run, then its checkpoints, newest first
            if (folder / TRAINER_STATE).is_file():
                return folder / TRAINER_STATE
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
