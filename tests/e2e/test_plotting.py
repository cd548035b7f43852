"""Tests for trl_gspo.plotting and scripts/plot_run.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trl_gspo.plotting import find_trainer_state, load_log_history, plot_run, series

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gspo_history(steps=20):
    history = []
    for step in range(1, steps + 1):
        history.append(
            {
                "step": step,
                "loss": 0.01,
                "reward": step / steps,
                "reward_std": 0.1,
                "gspo/clip_ratio/low_mean": 0.1,
                "gspo/clip_ratio/high_mean": 0.2,
                "gspo/clip_ratio/region_mean": 0.3,
                "clip_ratio/region_mean": 0.25,  # TRL's definition: not drawn next to GSPO's own
                "gspo/clipped_token_fraction": 0.28,
                "gspo/seq_ratio/min": 0.99,
                "gspo/seq_ratio/mean": 1.0,
                "gspo/seq_ratio/max": 1.01,
            }
        )
        if step % 5 == 0:
            history.append({"step": step, "heldout_accuracy": 0.3 + step / 40})
    history.append({"step": steps, "train_runtime": 12.0, "train_loss": 0.01})
    return history


def grpo_history(steps=12):
    return [
        {
            "step": step,
            "reward": 0.5,
            "reward_std": 0.2,
            "clip_ratio/region_mean": 0.0,
            "clip_ratio/low_mean": 0.0,
            "clip_ratio/high_mean": 0.0,
        }
        for step in range(1, steps + 1)
    ]


def is_png(path):
    path = Path(path)
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_series_skips_missing_and_non_finite_values():
    history = [{"step": 1, "reward": 0.5}, {"step": 2}, {"step": 3, "reward": math.nan}, {"step": 4, "reward": 1}]
    assert series(history, "reward") == ([1, 4], [0.5, 1.0])
    assert series(history, "absent") == ([], [])


def test_plot_run_writes_a_png_with_every_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        panels.extend(ax.get_title() for ax in fig.axes if ax.get_visible())
        clip_lines.extend(line.get_label() for ax in fig.axes if "clip" in ax.get_title() for line in ax.get_lines())
        return original(fig, *args, **kwargs)

    panels, clip_lines = [], []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    out = plot_run(gspo_history(), tmp_path / "sub" / "fig.png", title="synthetic", clip_range=(3e-4, 4e-4))
    assert out == tmp_path / "sub" / "fig.png"
    assert is_png(out)
    assert len(panels) == 4
    assert any("reward" in t for t in panels) and any("accuracy" in t for t in panels)
    assert any("clip" in t for t in panels) and any("ratio" in t for t in panels)
    assert clip_lines == [
        "tokens clipped (paper's count)",
        "sequences clipped (all)",
        "sequences clipped (low)",
        "sequences clipped (high)",
    ]


def test_plot_run_grpo_history_without_gspo_keys(tmp_path, monkeypatch):
    import matplotlib.figure

    panels = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        panels.extend(ax.get_title() for ax in fig.axes if ax.get_visible())
        clip_lines.extend(line.get_label() for ax in fig.axes if "clip" in ax.get_title() for line in ax.get_lines())
        return original(fig, *args, **kwargs)

    clip_lines = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    out = plot_run(grpo_history(), tmp_path / "grpo.png")
    assert is_png(out)
    assert len(panels) == 2  # reward and clip fraction; no held-out accuracy, no sequence ratio
    assert not any("ratio s_i" in t for t in panels)
    assert clip_lines == ["clip_ratio/region_mean (TRL's)"]


def test_plot_run_refuses_a_history_with_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="nothing to draw. It logged: learning_rate, loss"):
        plot_run([{"step": 1, "loss": 0.1, "learning_rate": 0.1}], tmp_path / "empty.png")
    # a run that logged no step at all (the quickstart: 8 steps, logging_steps 10) is told why
    with pytest.raises(ValueError, match=r"log history is empty: the run logged no step.*logging_steps=1"):
        plot_run([], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def write_state(folder, history):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 20, "log_history": history}))
    return path


def test_find_trainer_state_in_run_dir_and_latest_checkpoint(tmp_path):
    state = write_state(tmp_path / "file", gspo_history())
    assert find_trainer_state(state) == state
    assert find_trainer_state(tmp_path / "file") == state
    run = tmp_path / "run"
    write_state(run / "checkpoint-5", gspo_history(5))
    latest = write_state(run / "checkpoint-20", gspo_history(20))
    write_state(run / "checkpoint-9", gspo_history(9))  # 9 < 20 numerically, though "9" > "20" as text
    assert find_trainer_state(run) == latest
    assert len(load_log_history(run)) == len(gspo_history(20))


def test_missing_trainer_state_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trainer_state.json found at .*nowhere"):
        find_trainer_state(tmp_path / "nowhere")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run"):
        load_log_history(tmp_path / "empty_run")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_run.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plot_run_cli(tmp_path):
    state = write_state(tmp_path / "run", gspo_history())
    out = tmp_path / "figure.png"
    result = run_cli(state, "-o", out)
    assert result.returncode == 0, result.stderr
    assert is_png(out)
    assert str(out) in result.stdout
    # default output: next to the state file, found through the run folder
    result = run_cli(tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert is_png(tmp_path / "run" / "training_curves.png")


def test_plot_run_cli_clear_error_on_missing_file(tmp_path):
    missing = tmp_path / "no_such_run"
    result = run_cli(missing)
    assert result.returncode != 0
    assert "no trainer_state.json found" in result.stderr
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


# --- what each panel shows -------------------------------------------------------------------------------------------


def drawn_axes(monkeypatch, history, **kwargs):
    """Plot `history` and return {panel title: Axes} as drawn at savefig time."""
    import matplotlib.figure

    axes = {}
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kw):
        axes.update({ax.get_title(): ax for ax in fig.axes if ax.get_visible()})
        return original(fig, *args, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_run(history, kwargs.pop("path"), **kwargs)
    return axes


def test_reward_band_stays_within_a_unit_reward(tmp_path, monkeypatch):
    """A 0/1 reward with std 0.5 around a mean of 0.1 or 0.9: mean ± std would run from -0.4 to 1.4."""
    history = [{"step": s, "reward": 0.1 if s % 2 else 0.9, "reward_std": 0.5} for s in range(1, 11)]
    axes = drawn_axes(monkeypatch, history, path=tmp_path / "reward.png")
    (reward_ax,) = [ax for title, ax in axes.items() if title.startswith("reward")]
    band = reward_ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.0) and band.max() == pytest.approx(1.0)
    # a reward outside [0, 1] keeps its full band
    wide = [{"step": s, "reward": 2.0, "reward_std": 1.5} for s in range(1, 11)]
    axes = drawn_axes(monkeypatch, wide, path=tmp_path / "wide.png")
    band = axes["reward (training rollouts)"].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.5) and band.max() == pytest.approx(3.5)


def test_reward_bounds_rule():
    from trl_gspo.plotting import reward_bounds

    assert reward_bounds([0.0, 0.5, 1.0], [0.0, 0.504, 0.3]) == (0.0, 1.0)  # unbiased std of a 0/1 reward > 0.5
    assert reward_bounds([0.5, 1.2], [0.1, 0.1]) is None
    assert reward_bounds([0.5], [0.8]) is None  # more spread than any [0, 1] reward can have


def test_clip_lines_are_distinguishable(tmp_path, monkeypatch):
    axes = drawn_axes(monkeypatch, gspo_history(), path=tmp_path / "clip.png")
    lines = {line.get_label(): line for line in axes["clipped fraction"].get_lines()}
    tokens, sequences = lines["tokens clipped (paper's count)"], lines["sequences clipped (all)"]
    assert tokens.get_color() != sequences.get_color()
    assert tokens.get_linewidth() >= 3 * sequences.get_linewidth()  # the wide one underneath, the thin one on top
    assert tokens.get_zorder() <= sequences.get_zorder()
    ax_lines = axes["clipped fraction"].get_lines()
    assert ax_lines.index(tokens) < ax_lines.index(sequences)


def test_ratio_panel_shows_the_clip_band_as_deviation_from_one(tmp_path, monkeypatch):
    axes = drawn_axes(monkeypatch, gspo_history(), path=tmp_path / "ratio.png", clip_range=(3e-4, 4e-4))
    (ratio_ax,) = [ax for title, ax in axes.items() if "s_i - 1" in title]
    assert ratio_ax.get_yscale() == "symlog"
    band = [p for p in ratio_ax.patches if "unclipped band" in str(p.get_label())]
    assert len(band) == 1
    ys = band[0].get_path().transformed(band[0].get_patch_transform()).vertices[:, 1]
    assert ys.min() == pytest.approx(-3e-4) and ys.max() == pytest.approx(4e-4)
    means = [line for line in ratio_ax.get_lines() if line.get_label() == "mean"][0].get_ydata()
    assert all(abs(y) < 1e-12 for y in means)  # s_i = 1.0 drawn as 0


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_run_script", REPO / "scripts" / "plot_run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # in-process: the subprocess form is tested above
    return script


def test_ratio_legend_covers_no_data(tmp_path, monkeypatch):
    """The ratio panel's legend (five entries) sits outside its axes, where it hides none of the lines."""
    import matplotlib.figure

    boxes = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        result = original(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if ax.get_visible() and "s_i - 1" in ax.get_title():
                boxes.append((ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer), fig.bbox))
        return result

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    plot_run(gspo_history(), tmp_path / "ratio.png", clip_range=(3e-4, 4e-4))
    ((axes_box, legend_box, figure_box),) = boxes
    assert not axes_box.overlaps(legend_box)
    assert figure_box.contains(legend_box.x0, legend_box.y0) and figure_box.contains(legend_box.x1, legend_box.y1)


def test_plot_run_cli_draws_what_a_run_logged_and_names_what_it_did_not(tmp_path, capsys):
    script = load_script()
    run = tmp_path / "grpo-run"
    write_state(run, grpo_history())
    assert script.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert is_png(run / "training_curves.png")
    assert "left out: held-out accuracy (heldout_accuracy)" in out
    assert "left out: sequence ratio (gspo/seq_ratio/min, gspo/seq_ratio/mean, gspo/seq_ratio/max)" in out
    assert "left out: reward" not in out and "left out: clipped" not in out


def test_plot_run_cli_on_a_run_that_logged_nothing_says_why(tmp_path, capsys):
    """The quickstart's run: checkpoint-8/trainer_state.json with an empty log history."""
    script = load_script()
    write_state(tmp_path / "quickstart" / "checkpoint-8", [])
    assert script.main([str(tmp_path / "quickstart")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("plot_run.py: error: the log history is empty") and "logging_steps" in err


def test_plot_run_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    script = load_script()
    write_state(tmp_path / "run", gspo_history())
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert script.main([str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install 'trl-gspo[plots]'" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "training_curves.png").exists()


def test_plot_run_cli_writes_next_to_the_run_not_into_a_checkpoint(tmp_path, capsys):
    script = load_script()
    run = tmp_path / "my-run"
    write_state(run / "checkpoint-21", gspo_history())
    assert script.main([str(run), "--clip-range", "3e-4", "4e-4"]) == 0
    assert str(run / "training_curves.png") in capsys.readouterr().out
    assert is_png(run / "training_curves.png")
    assert not (run / "checkpoint-21" / "training_curves.png").exists()
    from trl_gspo.plotting import run_folder

    assert run_folder(run / "checkpoint-21" / "trainer_state.json") == run
    assert run_folder(run / "trainer_state.json") == run
