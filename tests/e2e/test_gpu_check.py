"""benchmarks/gpu_check.sh in its CPU mode: the one-shot GPU check runs end to end on tiny shapes, so it cannot rot
before a device is lent. No timing is asserted; what a section computes exactly is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gspo_benchmarks.gpu_check import MOE_SETTINGS, SECTIONS, unmet_requirements

ROOT = Path(__file__).resolve().parents[2]
ROUTES = {"bf16", "bf16_head32", "fp16", "fp16_weights", "fp32", "tf32"}


@pytest.mark.slow
def test_cpu_mode_runs_every_section_into_one_results_file(tmp_path):
    out, no_wheels = tmp_path / "out", tmp_path / "no_wheels"
    no_wheels.mkdir()  # the installed packages (this checkout's), not a .whl/ that --prepare may have left here
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env["GSPO_CHECK_WHEELS"] = str(no_wheels)
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [path.name for path in out.iterdir()] == ["gpu_check.json"]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "cpu" and result["environment"]["unmet_requirements"] == []
    sections = result["sections"]
    assert list(sections) == list(SECTIONS) and all("result" in section for section in sections.values())

    precision = sections["precision"]["result"]
    assert {row["route"] for row in precision["rows"]} == ROUTES
    assert set(precision["forward_cost"]["ms"]) == ROUTES
    fp32 = [row for row in precision["rows"] if row["route"] == "fp32"]
    assert all(row["max_abs_err"] < 3e-5 and row["flipped_clip_decisions"] == 0 for row in fp32)
    assert precision["summary"].count("\n| ") == len(ROUTES)  # one line per route after the header

    first_step = sections["first_step"]["result"]
    assert first_step["all_exact"]
    assert {(run["precision"], run["padding_free"]) for run in first_step["runs"]} == {
        (precision, packed) for precision in ("fp32", "bf16") for packed in (False, True)
    }

    trials = sections["trainer_ab"]["result"]["trials"]
    assert set(trials) == {"trl_padded", "gspo_padded", "gspo_padding_free"}
    assert trials["gspo_padding_free"]["padded_share"] < trials["gspo_padded"]["padded_share"]
    assert all(trial["peak_rss_mib"] > 0 and trial["step_s_all"] > 0 for trial in trials.values())

    moe = sections["moe"]["result"]
    for label in MOE_SETTINGS:
        assert moe[label] and all("moe/routing_drift/token_layer" in entry for entry in moe[label])
    assert any("moe/rollout_routing_mismatch/token_layer" in entry for entry in moe["R3"])  # once per rollout
    assert "## moe" in result["report"] and result["report"] in proc.stdout


def test_unmet_requirements_name_the_package_and_the_versions(monkeypatch):
    # what the device run reports first when a carried wheel does not fit the image
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "1.0.0" if name == "pyarrow" else real_version(name)
    )
    problems = unmet_requirements(("datasets",))
    assert any(p.startswith("datasets needs pyarrow>=") and p.endswith(": 1.0.0 is installed") for p in problems)
