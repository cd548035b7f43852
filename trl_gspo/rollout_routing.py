"""The routing a rollout engine chose, per generated sequence, and its layout in TRL's rows (R3, arXiv 2510.11370).

One `RolloutRouting` per sequence holds the experts of every position the engine fed through the model, in the
layout vLLM returns them (`CompletionOutput.routed_experts`, [seq_len, layers, top_k], with
`SamplingParams.routed_experts_prompt_start`): rows for the token positions prompt_start .. P + C - 2 of the unpadded
prompt (P tokens) + completion (C tokens). The last completion token is sampled but never fed back, so it has no
routing; it feeds no log-prob either. With prompt_start = P - 1 the record is exactly C rows: the routing of the
positions whose logits give the C completion log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Batch keys of the rollout routing in TRL's row layout: (B, L, layers, k) experts and (B, L) bool "has a routing";
# the batch first, so they travel with their rows through TRL's shuffle and split.
ROLLOUT_ROUTING_KEY = "moe_rollout_routing"
ROLLOUT_ROUTING_KNOWN_KEY = "moe_rollout_routing_known"


@dataclass(frozen=True)
class RolloutRouting:
    """The experts the rollout engine chose for one sequence (the module docstring's layout).

    experts: (prompt_length - prompt_start + completion_length - 1, layers, top_k) expert indices.
    """

    experts: torch.Tensor
    prompt_length: int
    completion_length: int
    prompt_start: int = 0

    def __post_init__(self):
        if not 0 <= self.prompt_start <= self.prompt_length:
            raise ValueError(
                f"RolloutRouting.prompt_start={self.prompt_start} must lie in [0, prompt_length={self.prompt_length}]."
            )
        rows = self.prompt_length - self.prompt_start + self.completion_length - 1
        if self.experts.dim() != 3 or self.experts.size(0) != rows:
            raise ValueError(
                f"RolloutRouting.experts has shape {tuple(self.experts.shape)}; expected ({rows}, layers, top_k): one "
                f"row per fed position, prompt_length {self.prompt_length} - prompt_start {self.prompt_start} + "
                f"completion_length {self.completion_length} - 1 (the last sampled token is never fed)."
            )


def padded_length(length: int, multiple: int | None) -> int:
    """`length` rounded up to a multiple of `multiple` (TRL's `pad(..., pad_to_multiple_of=multiple)`)."""
    return length if not multiple else -(-length // multiple) * multiple


def records_from_generation(
    routing: torch.Tensor, prompt_lengths: list[int], completion_lengths: list[int], padded_prompt_length: int
) -> list[RolloutRouting]:
    """One record per row of a transformers generate() call on left-padded prompts.

    Args:
        routing: (B, T, layers, k), the experts of every position generate() fed: the prefill of the padded prompts
            (positions 0 .. padded_prompt_length - 1), then one position per decoding step.
        prompt_lengths, completion_lengths: per row, the unpadded prompt length and the completion length TRL keeps
            (up to and including the first EOS).
    """
    batch, fed = routing.shape[:2]
    if len(prompt_lengths) != batch or len(completion_lengths) != batch:
        raise ValueError(
            f"records_from_generation: routing of {batch} rows for {len(prompt_lengths)} prompts and "
            f"{len(completion_lengths)} completions."
        )
    records = []
    for row, (prompt_length, completion_length) in enumerate(zip(prompt_lengths, completion_lengths, strict=True)):
        start, end = padded_prompt_length - prompt_length, padded_prompt_length + completion_length - 1
        if start < 0 or end > fed:
            raise ValueError(
                f"records_from_generation: row {row} (prompt {prompt_length}, completion {completion_length} tokens) "
                f"needs positions {start} .. {end - 1} of a generation that fed {fed} positions with prompts padded "
                f"to {padded_prompt_length}."
            )
        records.append(RolloutRouting(routing[row, start:end], prompt_length, completion_length))
    return records


def rollout_routing_rows(
    records: list[RolloutRouting], prompt_width: int, completion_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The records laid out as TRL's rows: the prompt left-padded to `prompt_width`, the completion right-padded to
    `completion_width`. Returns (B, prompt_width + completion_width, layers, k) experts (0 where unknown) and a
    (B, prompt_width + completion_width) bool mask, True where the rollout routed that position."""
    layers, top_k = records[0].experts.shape[1:]
    device, dtype = records[0].experts.device, records[0].experts.dtype
    experts = torch.zeros(len(records), prompt_width + completion_width, layers, top_k, dtype=dtype, device=device)
    known = torch.zeros(len(records), prompt_width + completion_width, dtype=torch.bool, device=device)
    for row, record in enumerate(records):
        if record.prompt_length > prompt_width or record.completion_length > completion_width:
            raise ValueError(
                f"rollout_routing_rows: row {row} has a prompt of {record.prompt_length} and a completion of "
                f"{record.completion_length} tokens; the rows hold {prompt_width} and {completion_width}."
            )
        start = prompt_width - record.prompt_length + record.prompt_start
        experts[row, start : start + record.experts.size(0)] = record.experts
        known[row, start : start + record.experts.size(0)] = True
    return experts, known
