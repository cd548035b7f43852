"""vLLM colocate mode in a world of 2 on CPU, through the project's launch configs (`make test-vllm`: .venv-vllm).

Each run is `accelerate launch --config_file recipes/accelerate_configs/<ddp|zero3>.yaml --num_processes 2
--mixed_precision no` of tests/distributed/vllm_colocate_worker.py: every rank builds its own float32 engine (TRL's
colocate mode, external launcher), trains 4 steps with a rollout at steps 0 and 2, and checks after each weight
sync that its engine's log-probs of a fixed completion equal its trainer's (tests/vllm_sync.py; the same check is
shown to fail on a skipped or early sync in tests/e2e/test_vllm_colocate.py). Under ZeRO-3 the parameters are
partitioned, and TRL's sync gathers each one for the engine; its losses equal the DDP run's.

The launch runs in its own process group, bounded by LAUNCH_TIMEOUT_S, and the whole group is killed if it is
still running (a rank stuck in a collective would otherwise outlive the test).
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")

from vllm_sync import FLOAT32_TOLERANCE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "vllm_colocate_worker.py"
CONFIGS = ROOT / "recipes" / "accelerate_configs"
LAUNCH_TIMEOUT_S = 300  # two engines start together on 2 shared cores: about a minute, plus DeepSpeed's start

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def launch_colocate(model_dir: str, out_dir: Path, config: str) -> list[dict]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml")]
    command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0"]
    command += [str(WORKER), model_dir, str(out_dir)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    launch = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = launch.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        output, _ = launch.communicate()
        pytest.fail(f"{config} launch ran past {LAUNCH_TIMEOUT_S} s:\n{output[-4000:]}")
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.communicate()
    assert launch.returncode == 0, output[-4000:]
    ranks = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(run["world_size"] == 2 for run in ranks)
    return ranks


def assert_every_engine_holds_the_trainers_weights(ranks):
    for rank, run in enumerate(ranks):
        assert len(run["losses"]) == 4 and all(math.isfinite(loss) for loss in run["losses"])
        print(f"rank {rank}: token gaps after the syncs {run['gaps']}")
        assert len(run["gaps"]) == 2 and max(run["gaps"]) < FLOAT32_TOLERANCE, (rank, run["gaps"])
        # training moved the trainer between the syncs, so a stale engine would have been seen
        moved = max(abs(a - b) for a, b in zip(run["trainer_logps"][0], run["trainer_logps"][-1]))
        assert moved > 100 * FLOAT32_TOLERANCE, (rank, moved)
    # one model trained in data parallel: both ranks' trainers (and so their engines) agree
    for first, second in zip(ranks[0]["trainer_logps"][-1], ranks[1]["trainer_logps"][-1]):
        assert abs(first - second) < FLOAT32_TOLERANCE


@pytest.fixture(scope="module")
def ddp_ranks(vllm_model_dir, tmp_path_factory):
    return launch_colocate(vllm_model_dir, tmp_path_factory.mktemp("ddp"), "ddp")


def test_ddp_two_processes_each_engine_synced(ddp_ranks):
    assert all("MULTI_CPU" in run["distributed_type"] for run in ddp_ranks)  # ddp.yaml's MULTI_GPU: gloo on CPU
    assert_every_engine_holds_the_trainers_weights(ddp_ranks)


def test_zero3_two_processes_gathered_sync(vllm_model_dir, tmp_path, ddp_ranks):
    ranks = launch_colocate(vllm_model_dir, tmp_path, "zero3")
    for run in ranks:
        assert "DEEPSPEED" in run["distributed_type"] and run["zero_stage"] == 3
        assert run["partitioned_params"] == run["num_params"] > 0  # every parameter partitioned: the sync gathers
    assert_every_engine_holds_the_trainers_weights(ranks)
    # the same engines, seeds and float32 model as the DDP run: the same rollouts and losses, to rounding
    for ours, theirs in zip(ranks[0]["losses"], ddp_ranks[0]["losses"], strict=True):
        assert math.isclose(ours, theirs, rel_tol=1e-4, abs_tol=1e-5), (ranks[0]["losses"], ddp_ranks[0]["losses"])
