"""Two real processes over gloo: GSPO under DDP, DeepSpeed ZeRO-2 and ZeRO-3 gives the same losses.

`accelerate launch --multi_gpu --num_processes 2` with use_cpu=True gives a world of 2 on CPU (`--cpu` would
silently run one process), so every run asserts its world size. The first DeepSpeed run compiles an op
(about a minute, cached under ~/.cache/torch_extensions).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "distributed" / "train_worker.py"
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
}

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(tmp_path, name, deepspeed=None, extra_fields=None):
    out = tmp_path / f"{name}.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--mixed_precision", "no", "--main_process_port", "0", str(WORKER), str(out)]
    if deepspeed is not None or extra_fields is not None:
        command.append(json.dumps(deepspeed))
    if extra_fields is not None:
        command.append(json.dumps(extra_fields))
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp"), "ddp")


def test_ddp_runs_two_processes(ddp_run):
    assert ddp_run["world_size"] == 2
    assert len(ddp_run["losses"]) == 3 and all(math.isfinite(x) for x in ddp_run["losses"])


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp(tmp_path, ddp_run, stage):
    run = launch(tmp_path, f"zero{stage}", {**DEEPSPEED, "zero_optimization": {"stage": stage}})
    assert run["world_size"] == 2 and "DEEPSPEED" in run["distributed_type"]
    for ours, reference in zip(run["losses"], ddp_run["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-5, abs_tol=1e-6)


def test_zero3_with_speed_options_matches_ddp(tmp_path, ddp_run):
    """Packed passes (one forward per pass on every rank, as ZeRO-3's collective gathers need) and rollout
    log-probs, checked against a packed pi_old forward at every rollout, give the padded DDP run's losses (float32:
    rollout and recomputed pi_old differ by ~1e-7)."""
    extra_fields = {"padding_free": True, "use_rollout_logprobs": True, "rollout_logprobs_check_interval": 1}
    run = launch(tmp_path, "zero3_speed", {**DEEPSPEED, "zero_optimization": {"stage": 3}}, extra_fields)
    assert run["world_size"] == 2 and "DEEPSPEED" in run["distributed_type"]
    # the rollout log-probs answered the pi_old pass (the check is logged only there) and match it in float32
    assert run["rollout_mismatch"] and max(run["rollout_mismatch"]) < 1e-5
    for ours, reference in zip(run["losses"], ddp_run["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-4, abs_tol=1e-6)


def test_token_advantages_are_normalised_over_groups_that_straddle_processes(tmp_path):
    """GSPO-token with a span reward in a world of 2: each rank's (B, T) advantages equal the single-process formula
    applied to both ranks' rows together (the group statistics cross the process boundary)."""
    import torch

    from trl_gspo.token_rewards import token_advantage_component

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--mixed_precision", "no", "--main_process_port", "0", str(WORKER.parent / "token_reward_worker.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command + [str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and all(math.isfinite(x) for x in summary["losses"])
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    width = max(r["mask"].size(1) for r in ranks)

    def padded(key, rank):
        value = rank[key]
        return torch.nn.functional.pad(value, (0, width - value.size(1)))

    rewards = torch.cat([padded("token_rewards", r) for r in ranks])
    mask = torch.cat([padded("mask", r) for r in ranks])
    assert rewards.size(0) == 12  # 6 rows per rank, groups of 4: rows 4..7 span both ranks
    expected = torch.cat([r["sequence_advantages"] for r in ranks]).unsqueeze(1) + token_advantage_component(
        rewards, mask, 4
    )
    got = torch.cat([padded("advantages", r) for r in ranks])
    torch.testing.assert_close(got * mask, expected * mask, atol=1e-5, rtol=1e-5)
    assert (token_advantage_component(rewards[4:8], mask[4:8], 4) * mask[4:8]).abs().sum() > 0  # a real signal
