"""Two real processes on CPU: every shipped launch config (recipes/accelerate_configs/*.yaml) runs GSPO on one
"machine" and on two, DeepSpeed ZeRO-2/3 and the speed options match DDP's losses, and GSPO-token's group statistics
cross the process boundary.

`accelerate launch --multi_gpu --num_processes 2` with use_cpu=True gives a world of 2 on CPU (`--cpu` would silently
run one process), so every run asserts its world size. The first DeepSpeed run compiles an op (about a minute,
cached under ~/.cache/torch_extensions).

Each run is `accelerate launch --config_file <the project's yaml> --num_processes 2 --mixed_precision no` of
tests/distributed/train_worker.py (3 optimizer steps of a hidden-32 model). The CPU overrides, and why:
- `--mixed_precision no`: the configs ask for bf16, which CPU autocast would apply to a float32 parity test.
- FSDP2: accelerate on CPU silently falls back to plain data parallel; the worker marks the CPU state MULTI_GPU
  before the accelerator is built (see its docstring) and the test asserts every parameter is a DTensor shard.
- DeepSpeed: DS_ACCELERATOR=cpu; the worker skips DeepSpeed's shared-memory all-reduce op (a C++ build of
  minutes); ZeRO-3 offload still builds CPU Adam once (cached under ~/.cache/torch_extensions).
Every run asserts world size 2, the backend named, that the backend really sharded (DTensor shards, ZeRO-3
partitions holding about half the elements, offload devices), and step losses against a DDP run of the same
model within LOSS_TOLERANCE. Last, the multi-node overrides: 2 "machines" x 1 process on localhost.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "train_worker.py"
CONFIGS = ROOT / "recipes" / "accelerate_configs"
# float32 on both sides; the backends reduce in different orders, so the losses agree to rounding, not bit for bit
LOSS_TOLERANCE = dict(rel_tol=1e-4, abs_tol=1e-5)

# DeepSpeed settings passed inline (no launch config): ZeRO-2/3 against DDP at a tighter tolerance than the configs'
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": False},
}

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch(tmp_path, config: str, options: dict | None = None, extra_args=()) -> dict:
    out = tmp_path / f"{config}-{len(list(tmp_path.iterdir()))}.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml")]
    command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", *extra_args]
    command += [str(WORKER), str(out), "", json.dumps(options or {})]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    run = json.loads(out.read_text())
    assert run["world_size"] == 2
    assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])
    return run


def assert_same_losses(run, reference):
    for ours, theirs in zip(run["losses"], reference["losses"], strict=True):
        assert math.isclose(ours, theirs, **LOSS_TOLERANCE), (run["losses"], reference["losses"])


def assert_half_held(run):
    sharding = run["sharding"]
    assert sharding["local_numel"] < 0.6 * sharding["full_numel"], sharding


@pytest.fixture(scope="module")
def ddp_dense(tmp_path_factory):
    run = launch(tmp_path_factory.mktemp("ddp"), "ddp")
    assert "MULTI_CPU" in run["distributed_type"]  # ddp.yaml's MULTI_GPU is DDP over gloo on CPU
    return run


@pytest.fixture(scope="module")
def ddp_moe_replay(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ddp_moe"), "ddp", {"model_type": "qwen3_moe", "routing_replay": True})


def test_fsdp2_really_shards(tmp_path, ddp_dense):
    run = launch(tmp_path, "fsdp2")
    assert "FSDP" in run["distributed_type"]
    assert run["sharding"]["dtensor_params"] == run["sharding"]["num_params"] > 0
    assert_half_held(run)
    assert_same_losses(run, ddp_dense)


def test_zero3_offload(tmp_path, ddp_dense):
    run = launch(tmp_path, "zero3_offload")
    sharding = run["sharding"]
    assert "DEEPSPEED" in run["distributed_type"] and sharding["zero_stage"] == 3
    assert sharding["offload_param"] == sharding["offload_optimizer"] == "cpu"
    assert sharding["zero3_partitioned_params"] == sharding["num_params"]
    assert_half_held(run)
    assert_same_losses(run, ddp_dense)


def test_zero3_moe_with_routing_replay(tmp_path, ddp_moe_replay):
    """ZeRO-3 gathers each layer's parameters in forward: the router hooks still record, observe and replay."""
    run = launch(tmp_path, "zero3", {"model_type": "qwen3_moe", "routing_replay": True})
    assert "DEEPSPEED" in run["distributed_type"] and run["sharding"]["zero_stage"] == 3
    assert run["sharding"]["zero3_partitioned_params"] == run["sharding"]["num_params"]
    assert_half_held(run)
    drift = [entry["moe/routing_drift/token_layer"] for entry in run["logs"]]
    assert drift[0] == 0.0 and all(0.0 <= d <= 1.0 for d in drift)
    assert all(entry["aux_loss"] > 0 for entry in run["logs"])
    assert_same_losses(run, ddp_moe_replay)


def test_zero3_lora(tmp_path):
    """LoRA under ZeRO-3 (frozen base partitioned too). No DDP twin run, to save a launch: the LoRA path is the
    same code under every backend, and the parity of the backends is what the tests above check."""
    run = launch(tmp_path, "zero3", {"lora": True})
    assert "DEEPSPEED" in run["distributed_type"] and run["sharding"]["zero_stage"] == 3
    assert run["sharding"]["zero3_partitioned_params"] == run["sharding"]["num_params"]
    assert len(set(run["losses"])) == 3  # the adapters train: the steps differ


# ---- past one machine: 2 "machines" x 1 process on localhost ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_machines(tmp_path: Path, config: str) -> dict:
    """The documented multi-node overrides (recipes/README.md, "Past one machine"), one `accelerate launch` per
    machine: --num_machines 2 --num_processes 2 --machine_rank 0|1 --main_process_ip 127.0.0.1."""
    out = tmp_path / f"{config}-two-machines.json"
    port = str(free_port())
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    machines = []
    for rank in (0, 1):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIGS / f"{config}.yaml"),
        ]
        command += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        command += ["--main_process_ip", "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no"]
        command += [str(WORKER), str(out), "", "{}"]
        machines.append(
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    try:
        outputs = [machine.communicate(timeout=900) for machine in machines]
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    for rank, (machine, (_, stderr)) in enumerate(zip(machines, outputs, strict=True)):
        assert machine.returncode == 0, f"machine {rank}:\n{stderr[-4000:]}"
    run = json.loads(out.read_text())
    assert run["world_size"] == 2
    return run


# The ZeRO-3 form passes (2026-11-25, 2-core shared CPU: 74 s alone, 128 s under load; the FSDP2 form takes 14 s),
# too slow for the default suite; it uses exactly the overrides of the FSDP2 form. TRL_GSPO_MULTINODE_ZERO3=1 runs it.
SLOW_MULTINODE_ZERO3 = pytest.mark.skipif(
    os.environ.get("TRL_GSPO_MULTINODE_ZERO3") != "1",
    reason="2-machine ZeRO-3 takes 74-128 s on 2 CPU cores; same overrides as the FSDP2 case; TRL_GSPO_MULTINODE_ZERO3=1",
)


@pytest.mark.parametrize(
    "config,backend", [("fsdp2", "FSDP"), pytest.param("zero3", "DEEPSPEED", marks=SLOW_MULTINODE_ZERO3)]
)
def test_two_machines_one_process_each(tmp_path, ddp_dense, config, backend):
    run = launch_two_machines(tmp_path, config)
    assert backend in run["distributed_type"]
    assert_half_held(run)
    assert_same_losses(run, ddp_dense)


# --- without a launch config: --multi_gpu and DeepSpeed settings inline ---


def launch_inline(tmp_path, name, deepspeed=None, extra_fields=None):
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
def ddp_run(ddp_dense):
    """The DDP reference of the inline runs: the project's ddp.yaml run (the same worker, model and seed)."""
    return ddp_dense


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp(tmp_path, ddp_run, stage):
    run = launch_inline(tmp_path, f"zero{stage}", {**DEEPSPEED, "zero_optimization": {"stage": stage}})
    assert run["world_size"] == 2 and "DEEPSPEED" in run["distributed_type"]
    for ours, reference in zip(run["losses"], ddp_run["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-5, abs_tol=1e-6)


def test_zero3_with_speed_options_matches_ddp(tmp_path, ddp_run):
    """Packed passes (one forward per pass on every rank, as ZeRO-3's collective gathers need) and rollout
    log-probs, checked against a packed pi_old forward at every rollout, give the padded DDP run's losses (float32:
    rollout and recomputed pi_old differ by ~1e-7)."""
    extra_fields = {"padding_free": True, "use_rollout_logprobs": True, "rollout_logprobs_check_interval": 1}
    run = launch_inline(tmp_path, "zero3_speed", {**DEEPSPEED, "zero_optimization": {"stage": 3}}, extra_fields)
    assert run["world_size"] == 2 and "DEEPSPEED" in run["distributed_type"]
    # the rollout log-probs answered the pi_old pass (the check is logged only there) and match it in float32
    assert run["rollout_mismatch"] and max(run["rollout_mismatch"]) < 1e-5
    for ours, reference in zip(run["losses"], ddp_run["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-4, abs_tol=1e-6)


def test_token_advantages_are_normalised_over_groups_that_straddle_processes(tmp_path):
    """GSPO-token with a span reward in a world of 2: each rank's (B, T) advantages equal the single-process formula
    applied to both ranks' rows together (the group statistics cross the process boundary)."""
    import torch

    from trl_gspo.token_rewards import group_centred_component

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
    expected = torch.cat([r["sequence_advantages"] for r in ranks]).unsqueeze(1) + group_centred_component(
        rewards, mask, 4
    )
    got = torch.cat([padded("advantages", r) for r in ranks])
    torch.testing.assert_close(got * mask, expected * mask, atol=1e-5, rtol=1e-5)
    assert (group_centred_component(rewards[4:8], mask[4:8], 4) * mask[4:8]).abs().sum() > 0  # a real signal
