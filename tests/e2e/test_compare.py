"""gspo_examples.compare and scripts/compare.py: the tiny end-to-end run, and the table against direct computations."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from gspo_examples.compare import (
    ARMS,
    TrainSettings,
    arm_reward_funcs,
    get_arm,
    late_mean,
    markdown_table,
    paired_difference_table,
    parse_flags,
    run_seed,
    summarize_run,
)
from gspo_examples.tasks import get_task

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tiny_comparison_writes_table_and_figure(tmp_path):
    out = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare.py"), "--tiny", "--steps", "4", "--eval-every", "2"]
        + ["--test-rows", "16", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (out / "comparison.md").read_text()
    for arm in ("gspo", "gspo_token", "grpo"):
        assert f"| {ARMS[arm].label} | 0 |" in table
    assert (out / "comparison.png").read_bytes()[:8] == PNG_MAGIC
    runs = {run["arm"]: run for run in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"gspo", "gspo_token", "grpo"}
    for run in runs.values():
        steps = [e["step"] for e in run["log_history"] if "heldout_accuracy" in e]
        assert steps == [0, 2, 4]  # before training, every 2 steps, at the end
        assert [e["step"] for e in run["log_history"] if "heldout_length_gap" in e] == steps
        assert any("diversity/distinct_fraction" in e for e in run["log_history"])
    # the span reward reaches GSPO-token only, as a token-level reward
    assert any("rewards/mismatch_spans/mean" in e for e in runs["gspo_token"]["log_history"])
    assert any("token_rewards/component_abs_mean" in e for e in runs["gspo_token"]["log_history"])
    assert not any("rewards/mismatch_spans/mean" in e for e in runs["gspo"]["log_history"])


def test_arm_reward_funcs():
    place, sort = get_task("place"), get_task("sort_digits")
    assert [f.__name__ for f in arm_reward_funcs(ARMS["gspo"], place)] == ["exact_match"]
    assert [f.__name__ for f in arm_reward_funcs(ARMS["gspo_token"], place)] == ["exact_match", "mismatch_spans"]
    assert [f.__name__ for f in arm_reward_funcs(ARMS["gspo_dense"], place)] == ["exact_match", "mismatch_spans_sum"]
    assert [f.__name__ for f in arm_reward_funcs(ARMS["gspo_token"], sort)] == ["exact_match"]  # no span reward
    dense = arm_reward_funcs(ARMS["gspo_dense"], place)[1]
    assert dense(completions=["abxde", "abcde", ""], answer=["abxde"] * 3) == [0.0, -1.0, -1.0]


def test_formulation_arms(capsys):
    arm = get_arm("gspo_token:position_baseline")
    assert arm.token_advantage == "position_baseline" and arm.importance_sampling_level == "sequence_token"
    assert arm.use_span_reward and "position_baseline" in arm.label
    assert get_arm("gspo_token").token_advantage == "group_centred"
    for bad in ("gspo_token:centered", "gspo:scaled", "ppo"):
        with pytest.raises(ValueError, match=rf"unknown arm '{bad}'.*gspo_token:<formulation>"):
            get_arm(bad)
    swap = get_task("swap")
    assert [f.__name__ for f in arm_reward_funcs(arm, swap)] == ["exact_match", "first_mismatch_span"]
    place = get_task("place")
    assert [f.__name__ for f in arm_reward_funcs(arm, place, "first_mismatch_span")][1] == "first_mismatch_span"
    assert [f.__name__ for f in arm_reward_funcs(ARMS["gspo"], place, "first_mismatch_span")] == ["exact_match"]
    with pytest.raises(SystemExit):
        parse_flags(["--arms", "gspo", "gspo_token:centered"])
    assert "unknown arm 'gspo_token:centered'" in capsys.readouterr().err
    assert parse_flags(["--arms", "gspo_token:scaled", "--jobs", "2"]).arms == ["gspo_token:scaled"]


def test_saved_runs_are_reused_only_with_the_same_settings(tmp_path, monkeypatch):
    import gspo_examples.compare as compare

    settings = TrainSettings(steps=3, split_sizes={"train": 16, "dev": 8, "test": 8}, test_rows=8)
    monkeypatch.setattr("gspo_examples.tasks.prepare_model", lambda *a, **k: (tmp_path / "model", None))
    monkeypatch.setattr("gspo_examples.tasks.greedy_accuracy", lambda *a, **k: 0.25)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    trained = []

    def fake_run_arm(arm_name, task, seed, model_dir, splits, settings, output_dir):
        trained.append((arm_name, settings.steps))
        return {"arm": arm_name, "seed": seed, "accuracy_after": 0.5, "train_seconds": 1.0, "log_history": []}

    monkeypatch.setattr(compare, "run_arm", fake_run_arm)
    first = run_seed("swap", ["gspo", "gspo_token:scaled"], 0, settings, tmp_path, tmp_path)
    again = run_seed("swap", ["gspo", "gspo_token:scaled", "grpo"], 0, settings, tmp_path, tmp_path)
    assert trained == [("gspo", 3), ("gspo_token:scaled", 3), ("grpo", 3)]  # only the new arm trained again
    assert [r["accuracy_after"] for r in again[:2]] == [r["accuracy_after"] for r in first]
    run_seed("swap", ["gspo"], 0, TrainSettings(**{**settings.__dict__, "steps": 4}), tmp_path, tmp_path)
    assert trained[-1] == ("gspo", 4)  # other settings: trained, not reused
    # a run saved before a settings field existed is reused when the field is at its default
    saved_path = tmp_path / "run-swap-gspo_token-scaled-seed0.json"
    saved = json.loads(saved_path.read_text())
    del saved["settings"]["span_reward"]
    saved_path.write_text(json.dumps(saved))
    run_seed("swap", ["gspo_token:scaled"], 0, settings, tmp_path, tmp_path)
    run_seed(
        "swap",
        ["gspo_token:scaled"],
        0,
        TrainSettings(**{**settings.__dict__, "span_reward": "x"}),
        tmp_path,
        tmp_path,
    )
    assert trained[-2:] == [("gspo", 4), ("gspo_token:scaled", 3)]


def fake_run(arm, seed, after, rewards, seconds):
    history = [{"heldout_accuracy": 0.3, "step": 0}]
    history += [
        {"rewards/exact_match/mean": r, "clip_ratio/region_mean": 0.1, "step": 4 * (i + 1)}
        # GSPO's own sequence count next to TRL's key, as a sequence-level run logs them
        | ({"gspo/clip_ratio/region_mean": 0.3} if arm != "grpo" else {})
        for i, r in enumerate(rewards)
    ]
    return {
        "arm": arm,
        "seed": seed,
        "accuracy_before": 0.3,
        "accuracy_after": after,
        "train_seconds": seconds,
        "log_history": history,
    }


def test_summary_and_table_against_direct_computation():
    rewards = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 0.9, 0.7]
    assert late_mean([{"x": v, "step": i} for i, v in enumerate(rewards)], "x") == pytest.approx((0.9 + 0.7) / 2)
    assert math.isnan(late_mean([{"y": 1.0}], "x"))
    runs = [
        fake_run("gspo", 0, 0.5, rewards, 10.0),
        fake_run("gspo", 1, 0.7, rewards, 14.0),
        fake_run("grpo", 0, 0.4, rewards, 9.0),
    ]
    row = summarize_run(runs[2])
    assert math.isnan(row["sequence_clip_fraction"])  # GRPO: TRL logs token fractions only
    assert row["token_clip_fraction"] == pytest.approx(0.1)
    assert summarize_run(runs[0])["sequence_clip_fraction"] == pytest.approx(0.3)  # GSPO's own, not TRL's key
    table = markdown_table(runs).splitlines()
    assert len(table) == 4
    after = f"{statistics.fmean([0.5, 0.7]):.3f} ± {statistics.stdev([0.5, 0.7]):.3f}"
    assert table[2].startswith(f"| {ARMS['gspo'].label} | 0,1 | 0.300 ± 0.000 | {after} |")
    assert "| n/a |" in table[3] and table[3].endswith("| 9 |")


def test_length_gap_column_is_the_last_held_out_gap():
    run = fake_run("gspo", 0, 0.5, [0.1, 0.2], 1.0)
    assert math.isnan(summarize_run(run)["length_gap_after"])  # not logged: n/a, not 0
    run["log_history"] += [{"heldout_length_gap": -0.5, "step": 4}, {"heldout_length_gap": 0.25, "step": 8}]
    assert summarize_run(run)["length_gap_after"] == 0.25


def test_paired_difference_table_against_direct_computation():
    runs = [
        fake_run("gspo", 0, 0.5, [0.1], 1.0),
        fake_run("gspo", 1, 0.7, [0.1], 1.0),
        fake_run("gspo", 2, 0.6, [0.1], 1.0),
        fake_run("grpo", 0, 0.4, [0.1], 1.0),
        fake_run("grpo", 1, 0.8, [0.1], 1.0),
        fake_run("grpo", 2, 0.6, [0.1], 1.0),
        fake_run("gspo_dense", 1, 0.9, [0.1], 1.0),  # one seed only: paired on that seed alone
    ]
    for run, lengths in zip(runs, ([5, 6], [5, 5], [4, 4], [6, 6], [5, 5], [4, 4], [7, 7, 7])):
        run["log_history"] += [{"length/group_mean": n, "step": 10 * (k + 1)} for k, n in enumerate(lengths)]
    runs[3]["log_history"].append({"length/group_mean": 9.0, "step": 99})  # a step the reference did not log
    table = paired_difference_table(runs).splitlines()
    assert len(table) == 4 and get_arm("gspo").label in table[0]
    differences = [0.4 - 0.5, 0.8 - 0.7, 0.6 - 0.6]
    spread = f"{statistics.fmean(differences):+.3f} ± {statistics.stdev(differences):.3f}"
    length_differences = [(6 - 5 + 6 - 6) / 2, 0.0, 0.0]
    length_spread = f"{statistics.fmean(length_differences):+.3f} ± {statistics.stdev(length_differences):.3f}"
    assert table[2] == f"| {ARMS['grpo'].label} | 0,1,2 | {spread} | 1 / 1 / 1 | {length_spread} |"
    assert table[3] == f"| {ARMS['gspo_dense'].label} | 1 | +0.200 | 1 / 0 / 0 | +2.000 |"
