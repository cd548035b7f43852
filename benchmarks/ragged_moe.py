"""The ragged-MoE workload of scripts/benchmark.py: a tiny Mixture-of-Experts model that generates ragged completions.

Rollout routing replay (R3) replays the experts transformers `generate()` chose, so this workload cannot replace
generation by a `rollout_func` as the ragged workload does: both trainers generate with transformers, from the same
model (same architecture, same seed) on the same prompts. The model is a tiny MoE (qwen3_moe by default: 4 experts,
top-2) whose LM head gets a constant bias on the EOS logit, identical on both sides, so that its completions end at
random lengths. An untrained tiny model's logits are nearly uniform over the vocabulary of V tokens; a bias

    b = log((V - 1) / (m - 1))

makes it end a completion with probability 1/m per token: completion lengths are then geometric with mean m,
capped at max_completion_length (MEAN_COMPLETION_AT_INIT below; the benchmark reports the measured means, which
drift slowly as training moves the logits). The bias is a frozen parameter of the LM head (`nn.Linear.bias`), so
generation, TRL's fused LM head and the packed passes all score with it.
"""

from __future__ import annotations

import math

import torch

from gspo_examples.tiny import ARCHITECTURES

MOE_MODEL_TYPES = tuple(name for name, fields in ARCHITECTURES.items() if "num_experts_per_tok" in fields)
MEAN_COMPLETION_AT_INIT = 64  # tokens: m above
DEFAULT_MAX_COMPLETION_LENGTH = 256


def eos_logit_bias(vocab_size: int, mean_length: float) -> float:
    """The EOS logit bias b that gives a model of uniform logits over `vocab_size` tokens an EOS probability of
    1 / mean_length per token."""
    if mean_length <= 1:
        raise ValueError(f"eos_logit_bias: mean_length={mean_length} must exceed 1 token")
    return math.log((vocab_size - 1) / (mean_length - 1))


def add_eos_logit_bias(model, eos_token_id: int, bias: float):
    """Give `model`'s LM head a frozen bias: `bias` on the EOS logit, 0 elsewhere. The weight stays the same
    parameter (tied to the input embeddings where it was). Returns the model."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[eos_token_id] = bias
    biased.bias.requires_grad_(False)
    model.set_output_embeddings(biased)
    return model
