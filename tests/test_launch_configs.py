"""Every shipped launch config (recipes/accelerate_configs/*.yaml) runs GSPO with two real processes on CPU, on one
"machine" and on two.

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

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "train_worker.py"
CONFIGS = ROOT / "recipes" / "accelerate_configs"
# float32 on both sides; the backends reduce in different orders, so the losses agree to rounding, not bit for bit
LOSS_TOLERANCE = dict(rel_tol=1e-4, abs_tol=1e-5)

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
