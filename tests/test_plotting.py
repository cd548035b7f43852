"""Tests for trl_gspo.plotting and scripts/plot_run.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from trl_gspo.plotting import find_trainer_state, load_log_history, plot_run, series

REPO = Path(__file__).resolve().parents[1]
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
                "clip_ratio/low_mean": 0.1,
                "clip_ratio/high_mean": 0.2,
                "clip_ratio/region_mean": 0.3,
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

    panels = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        panels.extend(ax.get_title() for ax in fig.axes if ax.get_visible())
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    out = plot_run(gspo_history(), tmp_path / "sub" / "fig.png", title="synthetic", clip_range=(3e-4, 4e-4))
    assert out == tmp_path / "sub" / "fig.png"
    assert is_png(out)
    assert len(panels) == 4
    assert any("reward" in t for t in panels) and any("accuracy" in t for t in panels)
    assert any("clip" in t for t in panels) and any("ratio" in t for t in panels)


def test_plot_run_grpo_history_without_gspo_keys(tmp_path, monkeypatch):
    import matplotlib.figure

    panels = []
    original = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        panels.extend(ax.get_title() for ax in fig.axes if ax.get_visible())
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    out = plot_run(grpo_history(), tmp_path / "grpo.png")
    assert is_png(out)
    assert len(panels) == 2  # reward and clip fraction; no held-out accuracy, no sequence ratio
    assert not any("ratio s_i" in t for t in panels)


def test_plot_run_refuses_a_history_with_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_run([{"step": 1, "loss": 0.1}], tmp_path / "empty.png")
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
