"""The ragged workload of scripts/benchmark.py: prompts and completions of widely varying lengths.

Generation is replaced, on both trainers alike, by a TRL `rollout_func` that draws token sequences of the lengths
below from a seeded generator: both trainers train on exactly the same tokens, and the step time measures the
training passes (pi_old, policy forward and backward, optimizer), which is what padding-free passes and rollout
log-probs change. Lengths are log-normal, as RL completion lengths roughly are (a few long ones, many short):

- prompt length: exp(N(log 48, 0.6)), rounded, clipped to [8, 192] tokens; one length per prompt (its group shares it).
- completion length: exp(N(log 128, 0.7)), rounded, clipped to [8, max_completion_length]; it ends with EOS.

With a micro-batch of 8 sequences from a shuffled generation batch, about half the (B, L) slots of the padded
layout are padding (the benchmark reports the measured share).

The rollout log-probs returned are synthetic (-4.0 per token, about log(1/87) for the 87-token char vocabulary):
their value only decides which sequences the GSPO clip catches, not the work done.
"""

from __future__ import annotations

import math

import torch

from trl_gspo.packing import assign_rows

PROMPT_LENGTHS = {"median": 48, "sigma": 0.6, "low": 8, "high": 192}
COMPLETION_LENGTHS = {"median": 128, "sigma": 0.7, "low": 8}
SYNTHETIC_LOGPROB = -4.0


def sample_length(generator: torch.Generator, median: float, sigma: float, low: int, high: int) -> int:
    """One log-normal length exp(N(log median, sigma)), rounded and clipped to [low, high]."""
    value = math.exp(math.log(median) + sigma * torch.randn((), generator=generator).item())
    return int(min(max(round(value), low), high))


def ragged_rollout_func(tokenizer, max_completion_length: int, seed: int = 0):
    """A TRL rollout_func returning random prompts and completions of ragged lengths (see the module docstring).

    Deterministic in (seed, call number, prompt order): two trainers given the same prompts get the same tokens.
    """
    special = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    calls = [0]

    def rollout(prompts, trainer):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + calls[0])
        calls[0] += 1
        prompt_tokens = {}
        prompt_ids, completion_ids, logprobs = [], [], []
        for prompt in prompts:  # a group repeats its prompt: it keeps one prompt length
            key = prompt if isinstance(prompt, str) else str(prompt)
            if key not in prompt_tokens:
                length = sample_length(generator, **PROMPT_LENGTHS)
                prompt_tokens[key] = vocabulary[
                    torch.randint(len(vocabulary), (length,), generator=generator)
                ].tolist()
            length = sample_length(generator, **COMPLETION_LENGTHS, high=max_completion_length)
            tokens = vocabulary[torch.randint(len(vocabulary), (length - 1,), generator=generator)].tolist()
            prompt_ids.append(prompt_tokens[key])
            completion_ids.append([*tokens, tokenizer.eos_token_id])
            logprobs.append([SYNTHETIC_LOGPROB] * length)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    return rollout


def padding_share(attention_masks: list[torch.Tensor], packed: bool, max_row_tokens: int | None = None) -> dict:
    """Real and processed token counts of the log-prob passes that saw `attention_masks` ((B, L) each).

    Padded: every pass processes B * L slots. Packed: R * W slots, the rows trl_gspo.packing builds (same budget).
    """
    real = processed = 0
    for mask in attention_masks:
        lengths = mask.sum(1).tolist()
        real += sum(lengths)
        if packed:
            rows = assign_rows(lengths, mask.size(1) if max_row_tokens is None else max_row_tokens)
            processed += len(rows) * max(sum(lengths[i] for i in row) for row in rows)
        else:
            processed += mask.numel()
    return {"real_tokens": real, "processed_tokens": processed, "padded_share": 1 - real / max(processed, 1)}
