"""The private GRPOTrainer API trl_gspo relies on and the TRL batch keys it reads, in one place, and the checks that
fail loudly when trl moves the API.

trl is pinned to the minor version these were read from (pyproject.toml). GSPOTrainer calls the checks at
construction, so a moved method or attribute is named before anything reads it.
"""

from __future__ import annotations

import functools
import inspect

from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration

# Batch keys GRPOTrainer forwards to the model for vision-language inputs; passed through unchanged.
MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def loss_mask(batch: dict):
    """The (B, T) mask of the tokens TRL's loss scores: `completion_mask`, times `tool_mask` (tool output tokens out)
    when the rollout called tools."""
    mask = batch["completion_mask"]
    return mask * batch["tool_mask"] if "tool_mask" in batch else mask


# The private GRPOTrainer API GSPOTrainer relies on: method -> parameters it must accept (checked by
# `check_trl_private_api`), and instance attributes read or written (checked after construction by
# `check_trl_private_attributes`).
TRL_PRIVATE_API = {
    # overridden by the core, each once (trainer.py's docstring lists the step they make up)
    "_prepare_inputs": ("generation_batch",),
    "_generate_and_score_completions": ("inputs",),
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"),
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_get_per_token_logps_and_entropies": (
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
        *MODEL_INPUT_KEYS,
    ),
    "_compute_loss": ("model", "inputs"),
    "_save_checkpoint": ("model", "trial"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    # called by the core
    "get_high_entropy_mask": ("entropies", "mask", "threshold"),
    "get_off_policy_mask": (
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ),
    "_get_output_dir": ("trial",),
    # vLLM on a CPU: TRL's parameter iterator feeds the engine's reload; the LLM(...) call inside _init_vllm (through
    # the module global trl.generation.vllm_generation.LLM) gets the engine dtype
    "VLLMGeneration._iter_named_params": (),
    "VLLMGeneration._init_vllm": (),
}
# Classes other than GRPOTrainer named in TRL_PRIVATE_API keys ("Class.method").
_TRL_PRIVATE_API_OWNERS = {"VLLMGeneration": VLLMGeneration}
TRL_PRIVATE_ATTRIBUTES = {
    "the step": ("_buffered_inputs", "_step", "_metrics", "aux_loss_enabled", "_entropy_bonus_enabled"),
    # and, set by train(): current_gradient_accumulation_steps
    "rewards": ("_tokenizer", "reward_weights", "reward_func_names"),
    "MoE rollout routing replay": ("tools", "rollout_func", "pad_to_multiple_of"),
    "vLLM": ("use_vllm", "vllm_mode", "vllm_importance_sampling_correction"),  # and, in colocate mode: vllm_generation
}


@functools.cache
def check_trl_private_api(trainer_cls: type = GRPOTrainer) -> None:
    """Raise RuntimeError naming every private GRPOTrainer method GSPOTrainer needs that is missing or changed.
    Called by GSPOTrainer's constructor; cached."""
    problems = []
    for name, params in TRL_PRIVATE_API.items():
        owner, _, method_name = name.rpartition(".")
        owner_cls = _TRL_PRIVATE_API_OWNERS[owner] if owner else trainer_cls
        method = getattr(owner_cls, method_name, None)
        if method is None:
            problems.append(f"{owner_cls.__name__}.{method_name} is gone")
            continue
        signature = inspect.signature(method).parameters
        missing = [p for p in params if p not in signature]
        if missing:
            problems.append(f"{owner_cls.__name__}.{method_name} no longer takes {missing}")
    if problems:
        _refuse("; ".join(problems))


def check_trl_private_attributes(trainer: GRPOTrainer) -> None:
    """Raise RuntimeError naming every private GRPOTrainer attribute of TRL_PRIVATE_ATTRIBUTES the trainer lacks."""
    missing = sorted(
        {name for names in TRL_PRIVATE_ATTRIBUTES.values() for name in names if not hasattr(trainer, name)}
    )
    if missing:
        _refuse(f"GRPOTrainer no longer sets the attributes {missing}")


def _refuse(problems: str) -> None:
    import trl

    raise RuntimeError(
        f"trl_gspo was written against trl 1.16 and relies on its private API; with trl {trl.__version__}: "
        f"{problems}. Install trl>=1.16,<1.17."
    )
