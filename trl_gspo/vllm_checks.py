"""vLLM set-up errors, found when the trainer is built and reported in one line each.

Server mode (`vllm_mode="server"`), checked before the model loads:
- TRL 1.16 pushes the trainer's weights to the server only through vLLM's NCCL weight-transfer engine
  (`VLLMClient.init_communicator` raises NotImplementedError on any other device, after the model has loaded). Without
  a sync the server keeps sampling from the initial weights while the trainer moves on, so server-mode training is
  refused on a device without CUDA; colocate mode syncs on a CPU (trl_gspo/vllm_cpu.py).
- TRL waits for the server with an HTTP request that has no timeout: a host that accepts the connection and never
  answers hangs the run. The server is polled here with bounded requests for `vllm_server_timeout` seconds.
- The sampling log-probs stand for the policy the completions were drawn from (`use_rollout_logprobs=True`: pi_old
  itself; importance correction: its denominator) only if the server returns them after temperature scaling
  (`--logprobs-mode processed_logprobs`, which `trl vllm-serve` sets). TRL checks the mode only with importance
  correction and only warns; GSPOConfig turns the correction off for rollout log-probs, so the check is here.

Colocate mode: vLLM refuses some models only when it first runs them (on a CPU, attention with head_dim 16 fails at
the first generation, inside the training loop, with no model name). The engine generates one token at construction,
and an engine that cannot be built or cannot run the model is one error naming the model and vLLM's reason.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from urllib.parse import urlparse

from trl.generation import vllm_generation
from trl.import_utils import is_vllm_available

from .vllm_cpu import VLLM_INSTALL_HINT, use_cpu_weight_sync

# Devices TRL's server-mode weight sync runs on (vLLM's NCCL weight-transfer engine)
SERVER_SYNC_DEVICE_TYPES = ("cuda",)
# The log-prob mode under which the server's log-probs are those of the sampling distribution
PROCESSED_LOGPROBS = "processed_logprobs"
POLL_INTERVAL_S = 1.0


def server_base_url(args) -> str:
    """The URL TRL's VLLMGeneration connects to."""
    if args.vllm_server_base_url is not None:
        return args.vllm_server_base_url.rstrip("/")
    return f"http://{args.vllm_server_host}:{args.vllm_server_port}"


def server_address(base_url: str) -> str:
    parsed = urlparse(base_url)
    return f"host {parsed.hostname}, port {parsed.port or (443 if parsed.scheme == 'https' else 80)}"


def wait_for_server(base_url: str, timeout: float) -> None:
    """Return once `base_url/health` answers 200; raise ConnectionError naming host and port after `timeout` s."""
    import requests  # a dependency of vLLM (and of TRL's server client), not of the plugin

    deadline = time.monotonic() + timeout
    while True:
        try:
            left = deadline - time.monotonic()
            if requests.get(f"{base_url}/health", timeout=min(max(left, 0.1), 10.0)).status_code == 200:
                return
            problem = "it answers /health with an error"
        except requests.RequestException as error:
            problem = type(error).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectionError(
                f"vllm_mode='server': no vLLM server answered at {base_url} ({server_address(base_url)}) within "
                f"vllm_server_timeout={timeout} s (last try: {problem}). Start it first (`trl vllm-serve --model "
                "<model> --port <port>`), check vllm_server_base_url / vllm_server_host / vllm_server_port, or raise "
                "vllm_server_timeout while it loads."
            )
        time.sleep(min(POLL_INTERVAL_S, left))


def server_logprobs_mode(base_url: str) -> str:
    """The server's `--logprobs-mode`, from its development endpoint `/server_info` (what TRL's client reads)."""
    import requests

    response = requests.get(f"{base_url}/server_info", params={"config_format": "json"}, timeout=30)
    if response.status_code == 404:
        raise RuntimeError(
            f"The vLLM server at {base_url} does not expose /server_info, so its log-prob mode cannot be checked "
            "(and TRL cannot sync weights to it). Start it with `trl vllm-serve`, or with VLLM_SERVER_DEV_MODE=1 "
            "in its environment."
        )
    response.raise_for_status()
    return response.json()["vllm_config"]["model_config"]["logprobs_mode"]


def check_server_mode(args) -> None:
    """Refuse server-mode training that could not sync, an unreachable server, and log-probs of the wrong kind."""
    if args.device.type not in SERVER_SYNC_DEVICE_TYPES:
        raise ValueError(
            f"GSPOConfig.vllm_mode='server' trains on {args.device}, but TRL sends the trainer's weights to the vLLM "
            "server only over NCCL (vLLM's weight-transfer engine), which needs a CUDA device: the server would keep "
            "sampling from the initial weights. On this machine use vllm_mode='colocate' (the engine in the training "
            "process, synced through its reload), or use_vllm=False."
        )
    base_url = server_base_url(args)
    wait_for_server(base_url, args.vllm_server_timeout)
    users = [name for name in ("use_rollout_logprobs", "vllm_importance_sampling_correction") if getattr(args, name)]
    if users:
        mode = server_logprobs_mode(base_url)
        if mode != PROCESSED_LOGPROBS:
            raise ValueError(
                f"GSPOConfig.{users[0]}=True uses the vLLM server's sampling log-probs, but the server at {base_url} "
                f"runs with --logprobs-mode {mode}: they are not those of the temperature-scaled distribution the "
                f"completions were sampled from. Restart it with --logprobs-mode {PROCESSED_LOGPROBS} (the mode "
                "`trl vllm-serve` sets)."
            )


def engine_error(model_name: str, error: Exception) -> RuntimeError:
    reason = " ".join(str(error).split()) or type(error).__name__
    return RuntimeError(f"vLLM cannot serve the model {model_name} ({type(error).__name__}): {reason}")


@contextmanager
def engine_construction(model_name: str, dtype: str):
    """Within the block (GRPOTrainer's constructor), TRL's colocate `LLM(...)` call gets the engine `dtype` ("auto":
    TRL's behaviour, no dtype) and an exception from it is one RuntimeError naming the model and the reason. TRL
    builds the engine through the module global `vllm_generation.LLM`, the one seam it has."""
    build_llm = vllm_generation.LLM
    engine_kwargs = {} if dtype == "auto" else {"dtype": dtype}

    def build_named(*args, **kwargs):
        try:
            return build_llm(*args, **kwargs, **engine_kwargs)
        except Exception as error:
            raise engine_error(model_name, error) from None

    vllm_generation.LLM = build_named
    try:
        yield
    finally:
        vllm_generation.LLM = build_llm


def check_engine_runs(llm, model_name: str) -> None:
    """Generate one token from one token: vLLM reports kernels it lacks for the model (e.g. CPU attention with
    head_dim 16) only when it first runs them."""
    from vllm import SamplingParams

    try:
        # greedy: draws no random numbers, so the rollouts that follow are sampled as without the check
        llm.generate([{"prompt_token_ids": [0]}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    except Exception as error:
        raise engine_error(model_name, error) from None


def check_vllm_before_construction(args) -> None:
    """vLLM installed (before the model loads), and in server mode a reachable server that can sync and returns the
    log-probs of the sampling distribution (`check_server_mode`)."""
    if not args.use_vllm:
        return
    if not is_vllm_available():
        raise ImportError(f"use_vllm=True, but vLLM is not installed: {VLLM_INSTALL_HINT}.")
    if args.vllm_mode == "server":
        check_server_mode(args)


def check_vllm_after_construction(generation, args, model_name: str) -> None:
    """Colocate mode, once GRPOTrainer has built its engine: the CPU weight sync (trl_gspo/vllm_cpu.py), and one
    token generated, so that a model the engine cannot run is refused now, by name. A sleeping engine has no weights
    to run and is not checked."""
    use_cpu_weight_sync(generation)
    if args.vllm_enable_sleep_mode:
        return
    try:
        check_engine_runs(generation.llm, model_name)
    except RuntimeError:
        # free the engine now: the error's traceback keeps the trainer alive, and an engine freed later tears down
        # the distributed state of the next engine built in this process
        del generation.llm
        raise
