"""A model the colocated vLLM engine cannot serve: one error at construction naming the model and vLLM's reason.

`make test-vllm` (.venv-vllm); the engine runs in the test process (VLLM_ENABLE_V1_MULTIPROCESSING=0).
"""

import gc
import os

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # TRL's colocate mode reaches into the engine

from conftest import completion_length_reward, prompt_dataset, small_config  # noqa: E402
from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: E402

from gspo_examples.tiny import save_tiny_model  # noqa: E402
from trl_gspo import GSPOTrainer  # noqa: E402

pytestmark = pytest.mark.slow


def build_colocated(model_dir, output_dir, **overrides):
    values = dict(
        use_vllm=True,
        vllm_mode="colocate",
        vllm_dtype="float32",
        vllm_importance_sampling_correction=False,
        steps_per_generation=2,
    )
    args = small_config(output_dir, **{**values, **overrides})
    try:
        return GSPOTrainer(model_dir, completion_length_reward, args=args, train_dataset=prompt_dataset("standard"))
    finally:
        gc.collect()  # the engine of a failed construction
        cleanup_dist_env_and_memory()


def test_head_dim_the_cpu_engine_cannot_run_is_refused_at_construction(tmp_path):
    # hidden 64 with 4 heads: head_dim 16, which vLLM's CPU attention lacks. Without the check the trainer is
    # built and the first generation fails inside the training loop, naming no model
    model_dir = save_tiny_model(tmp_path / "head_dim_16", model_type="qwen3", hidden_size=64, num_heads=4)
    with pytest.raises(RuntimeError) as caught:
        build_colocated(model_dir, tmp_path / "out")
    message = str(caught.value)
    print(message)
    assert message.startswith(f"vLLM cannot serve the model {model_dir} (RuntimeError): ")
    assert "Unsupported CPU attention configuration: head_dim=16" in message
    assert "\n" not in message and caught.value.__suppress_context__  # one line, not vLLM's exception chain


def test_engine_refusal_while_it_is_built_is_one_line_naming_the_model(vllm_model_dir, tmp_path, monkeypatch):
    # on a CPU vllm_gpu_memory_utilization is the share of host memory vLLM reserves; all of it is refused (unless
    # VLLM_CPU_KVCACHE_SPACE, which tests/vllm_sync.py sets for the other tests, fixes the KV cache size instead)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    model_dir = vllm_model_dir
    with pytest.raises(RuntimeError) as caught:
        build_colocated(model_dir, tmp_path / "out", vllm_gpu_memory_utilization=0.99)
    message = str(caught.value)
    print(message)
    assert message.startswith(f"vLLM cannot serve the model {model_dir} (ValueError): ")
    assert "memory" in message and "--gpu-memory-utilization" in message
    assert "\n" not in message and caught.value.__suppress_context__
