"""gspo_examples.moe_experiment and scripts/moe_experiment.py: the variant grid against GSPOConfig's refusals, the
per-run summary against a hand-built log history, and a tiny end-to-end run whose bf16-autocast engine must show a
mismatch the float32 one does not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gspo_examples.moe_experiment import (
    DENSE_MODEL,
    MOE_MODEL,
    PANELS,
    ROLLOUT_PI_OLD,
    STEPS_PER_GENERATION,
    VARIANTS,
    _panel_key,
    summarize,
)
from trl_gspo import GSPOConfig

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def config(tmp_path, **fields):
    return GSPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        num_generations=8,
        steps_per_generation=STEPS_PER_GENERATION,
        use_cpu=True,
        report_to="none",
        **fields,
    )


def test_every_variant_is_accepted_and_r2_with_rollout_pi_old_is_refused(tmp_path):
    for fields in VARIANTS.values():
        config(tmp_path, **fields)
    # the grid leaves out R2 with the rollout's log-probs as pi_old because the config refuses it; R3 composes
    assert not any(f.get("routing_replay") and f.get("use_rollout_logprobs") for f in VARIANTS.values())
    assert any(f.get("rollout_routing_replay") and f.get("use_rollout_logprobs") for f in VARIANTS.values())
    with pytest.raises(ValueError, match="routing_replay=True cannot be combined with use_rollout_logprobs"):
        config(tmp_path, **VARIANTS["gspo"], **ROLLOUT_PI_OLD, routing_replay=True)


def test_dense_control_matches_the_moe_active_width_and_depth():
    assert DENSE_MODEL["model_type"] != MOE_MODEL["model_type"]
    assert DENSE_MODEL["num_layers"] == MOE_MODEL["num_layers"]
    assert DENSE_MODEL["intermediate_size"] == MOE_MODEL["intermediate_size"] * MOE_MODEL["num_experts_per_tok"]


def test_summary_splits_each_rollout_into_its_first_step_and_the_moved_ones():
    logs = []
    for step in range(1, 9):  # two rollouts of 4 optimizer steps
        first = (step - 1) % STEPS_PER_GENERATION == 0
        logs.append(
            {
                "step": step,
                "loss": 0.0,
                "reward": step / 10,
                "moe/routing_drift/token_layer": 0.0 if first else step / 100,
                "clip_ratio/region_mean": 0.5 if first else 0.1 * step,  # GRPO's (tokens) or TRL's definition
                "gspo/clip_ratio/region_mean": 0.6 if first else 0.2 * step,  # GSPO's own sequence count
                "gspo/clipped_token_fraction": 0.2,
                "gspo/first_step_outside_clip_band": 0.7 if step == 1 else 0.9,
            }
        )
        if step in (4, 8):
            logs.append({"step": step, "heldout_accuracy": 0.3 if step == 4 else 0.4})
    run = {"accuracy_before": 0.5, "accuracy_after": 0.44, "seconds": 1.0, "cpu_seconds": 1.0, "log_history": logs}
    moved_steps = [2, 3, 4, 6, 7, 8]

    gspo = summarize({**run, "variant": "gspo"})
    assert gspo["drift_token_layer"] == pytest.approx(sum(s / 100 for s in moved_steps) / 6)
    assert gspo["clip_sequences"] == pytest.approx(sum(0.2 * s for s in moved_steps) / 6)
    assert gspo["clip_tokens"] == pytest.approx(0.2)
    assert gspo["first_step_clip"] == pytest.approx((0.7 + 0.9) / 2)
    assert gspo["reward_last_quarter"] == pytest.approx((0.7 + 0.8) / 2)
    assert gspo["accuracy_lowest"] == 0.3
    assert gspo["collapsed"] is True  # 0.44 is more than 0.05 below 0.5
    assert gspo["mismatch_seq_abs_log_ratio"] is None

    # TRL's GRPO loss counts its clip fraction in tokens: no sequence column, its first-step value from TRL's key
    grpo = summarize({**run, "variant": "grpo", "accuracy_after": 0.46})
    assert grpo["clip_sequences"] is None
    assert grpo["clip_tokens"] == pytest.approx(sum(0.1 * s for s in moved_steps) / 6)
    assert grpo["first_step_clip"] == pytest.approx(0.5)
    assert grpo["collapsed"] is False
    # the figure's clip panel reads the same keys
    clip_panel = next(keys for keys, title, _ in PANELS if title.startswith("clipped"))
    assert _panel_key(clip_panel, "gspo") == "gspo/clip_ratio/region_mean"
    assert _panel_key(clip_panel, "grpo") == "clip_ratio/region_mean"


@pytest.mark.slow
def test_tiny_run_bf16_engine_mismatches_and_float32_engine_does_not(tmp_path):
    out = tmp_path / "moe"
    command = [sys.executable, str(REPO / "scripts" / "moe_experiment.py"), "--tiny", "--steps", "4"]
    command += ["--eval-every", "2", "--monitor-rows", "16", "--variants", "gspo_r3", "gspo_rollout", "grpo_rollout"]
    command += ["--output-dir", str(out), "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["timing"]["wall_seconds"] > 0 and saved["timing"]["cpu_seconds"] > 0
    runs = {(r["variant"], r["generation"]): summarize(r) for r in saved["runs"]}
    assert len(runs) == 6
    for variant in ("gspo_rollout", "grpo_rollout"):
        # float32 generation computes the trainer's log-probs on another path (KV cache): equal to rounding
        assert runs[variant, "float32"]["mismatch_seq_abs_log_ratio"] < 1e-6
        # under bf16 autocast the rollout's log-probs are the half-precision engine's
        assert runs[variant, "bf16"]["mismatch_seq_abs_log_ratio"] > 1e-5
    assert runs["gspo_rollout", "bf16"]["first_step_clip"] > 0  # the mismatch alone leaves the paper's clip band
    assert runs["gspo_rollout", "float32"]["first_step_clip"] == 0
    assert runs["gspo_r3", "float32"]["routing_mismatch_token_layer"] == 0
    assert runs["gspo_r3", "bf16"]["routing_mismatch_token_layer"] is not None
    assert runs["gspo_r3", "bf16"]["drift_token_layer"] is not None  # R3 keeps the drift metric
    assert runs["gspo_rollout", "bf16"]["drift_token_layer"] is None  # no pi_old forward to compare with
    for run in saved["runs"]:
        assert [e["step"] for e in run["log_history"] if "heldout_accuracy" in e] == [0, 2, 4]
    table = (out / "results.md").read_text()
    assert "| bf16 | gspo_rollout | 1 |" in table and "| float32 | gspo_r3 | 1 |" in table
    assert (out / "moe_experiment.png").read_bytes()[:8] == PNG_MAGIC

    # re-tabulating the saved runs gives the same table, with the command it came from
    merged = tmp_path / "merged"
    again = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "moe_experiment.py"), "--from-results", str(out / "results.json")]
        + ["--output-dir", str(merged)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (merged / "results.md").read_text().split("\n\n", 1)[1] == table.split("\n\n", 1)[1]
    assert saved["command"] in (merged / "results.md").read_text()
