"""Rollout log-probs as pi_old: the log-probs computed while sampling replace the separate pi_old forward.

Sources, all arriving as the per-token `logprobs` lists of GRPOTrainer's `_generate`:
- transformers generation: `SampledTokenLogProbs`, a logits processor added to `generate`, records
  log softmax(scores / temperature) of each sampled token. transformers runs custom processors before its
  warpers (temperature, top-k, top-p, min-p), so the record is of the untruncated distribution at the trainer's
  temperature: the quantity GRPOTrainer's pi_old forward computes. Processors that run before it and change the
  distribution (repetition penalty, suppressed or banned tokens, minimum length) are refused by GSPOConfig, and
  any -inf score it sees raises at the step where it happens.
- vLLM: its returned log-probs (TRL asks for `processed_logprobs`: after temperature, and after top-k/top-p
  truncation, so those are refused with vLLM: the ratio would measure the kept mass, TRL issue 6789).
- a custom `rollout_func`: its `logprobs`, as returned.

`mismatch_log_ratios` and `rollout_mismatch` compare the rollout log-probs with a recomputed pi_old at the sequence
level, the level GSPO clips at.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .objective import masked_token_diff, outside_clip_band, sequence_log_ratio


class SampledTokenLogProbs(LogitsProcessor):
    """Logits processor that records the log-prob of every sampled token under softmax(scores / temperature).

    The processor sees step k's scores before the token is sampled; that token is the last column of the
    `input_ids` of step k + 1, and the last step's token is read from the finished sequences in `per_sequence`.
    One (B, V) log-softmax is kept at a time.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []
        self._pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self.steps.append(self._pending.gather(1, input_ids[:, -1:]).squeeze(1))
        if torch.isneginf(scores).any():
            raise RuntimeError(
                "use_rollout_logprobs: a logits processor removed tokens from the sampling distribution (a -inf "
                "score, e.g. suppress_tokens, bad_words_ids, min_new_tokens or a model generation_config setting): "
                "the rollout log-probs would not be the trainer's pi_old. Remove it or set use_rollout_logprobs=False."
            )
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def per_sequence(self, completion_ids: list[list[int]]) -> list[list[float]]:
        """The recorded log-probs of each completion, as lists of its length (rows in generation order)."""
        if self._pending is None:
            return [[] for _ in completion_ids]
        width = max(len(ids) for ids in completion_ids)
        last = torch.tensor([ids[-1] if len(ids) == width else 0 for ids in completion_ids])
        steps = [*self.steps, self._pending.gather(1, last[:, None].to(self._pending.device)).squeeze(1)]
        table = torch.stack(steps, dim=1).cpu()
        return [table[row, : len(ids)].tolist() for row, ids in enumerate(completion_ids)]


@contextmanager
def recording_generate(model, recorder: SampledTokenLogProbs):
    """Within the block, `model.generate` also runs `recorder` (GRPOTrainer calls generate without processors)."""
    had_own = "generate" in vars(model)
    original = model.generate

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(recorder)
        return original(*args, logits_processor=processors, **kwargs)

    model.generate = generate
    try:
        yield recorder
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate


def mismatch_log_ratios(logps: torch.Tensor, other_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the objective's `sequence_log_ratio` of `logps` against `other_logps`, made for engine log-probs.

    Unlike the objective's: NaN-safe on padding (engine log-probs may be NaN there), not clamped (a statistic, not a
    gradient) and NaN for an empty row, so that `rollout_mismatch` leaves it out. The trainer passes (recomputed
    pi_old, rollout log-probs): the log s_i of the rollout's first optimizer step.
    """
    diff = masked_token_diff(logps, other_logps, mask)
    ratios = sequence_log_ratio(diff, torch.zeros_like(diff), mask, log_ratio_bound=math.inf)
    return ratios.masked_fill(mask.sum(-1) == 0, math.nan)


def rollout_mismatch(ratios: torch.Tensor, epsilon_low: float, epsilon_high: float) -> dict[str, float]:
    """Statistics of the per-sequence log-ratios r_i of `mismatch_log_ratios` (NaN rows are left out).

    Returns mean and max of |r_i|, the clip band's upper edge in log space (log(1 + epsilon_high)) to read them
    against, and the fraction of sequences with r_i outside [log(1 - epsilon_low), log(1 + epsilon_high)]: those
    whose clip decision the mismatch alone could flip. Empty dict when no sequence has a token.
    """
    ratios = ratios[~torch.isnan(ratios)]
    if ratios.numel() == 0:
        return {}
    high = math.log(1 + epsilon_high)
    outside = outside_clip_band(ratios, epsilon_low, epsilon_high).float().mean()
    mean_abs, max_abs, outside = torch.stack([ratios.abs().mean(), ratios.abs().max(), outside]).tolist()
    return {
        "seq_abs_log_ratio_mean": mean_abs,
        "seq_abs_log_ratio_max": max_abs,
        "outside_clip_band": outside,
        "clip_band_log_high": high,
    }
