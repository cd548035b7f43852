"""Where pi_old comes from: the sources GSPOTrainer's core asks for the old log-probs of a rollout's micro-batches.

The core calls `source.fill(micro_batches, pi_old_pass, ...)` once per rollout, after TRL's shuffle and split and
before the rollout's first optimizer step, so pi_old stays the rollout's policy under gradient accumulation,
steps_per_generation > gradient_accumulation_steps and num_iterations > 1.

- `RecomputedPiOld` (default): one forward per micro-batch with the policy pass's own call (same rows, same
  concatenation, one chunk, same backend). Computing it on the whole generation batch, as GRPOTrainer does, mixes
  rows of different chunks into each micro-batch, and a kernel may reduce in another order for another composition
  (packed rows share a row with other sequences; accelerators pick kernels by shape), so s_i moves from rounding
  alone (docs/reference/metrics.md). Aligned, s_i is exactly 1 before the first update.
- `RolloutLogprobsPiOld` (`use_rollout_logprobs`): the log-probs computed while sampling (trl_gspo/rollout_logprobs.py),
  no forward; every `rollout_logprobs_check_interval` train rollouts also recomputed and compared.
"""

from __future__ import annotations

import torch

from .config import pi_old_pass_runs
from .metrics import ROLLOUT_LOGPROBS_PREFIX
from .rollout_logprobs import mismatch_log_ratios, rollout_mismatch


class RecomputedPiOld:
    """pi_old recomputed per micro-batch (module docstring)."""

    def fill(self, micro_batches, pi_old_pass, accelerator, metrics, training, epsilon_low, epsilon_high) -> None:
        for batch in micro_batches:
            batch["old_per_token_logps"] = pi_old_pass(batch)


class RolloutLogprobsPiOld:
    """pi_old = the rollout's own log-probs (`sampling_per_token_logps`, which TRL builds from what generation
    returned: vLLM's, a rollout_func's, or transformers generation's as recorded by `SampledTokenLogProbs`).

    A micro-batch with a missing value (vLLM's None) on any process falls back to the forward on every process (the
    forward is collective under ZeRO-3 / FSDP). Values off the loss mask are 0. Its metrics, per checked rollout:
    `gspo/rollout_logprobs/*` (trl_gspo/metrics.py).
    """

    def __init__(self, check_interval: int):
        self.check_interval = check_interval
        self.train_rollouts = 0  # the check schedule counts train rollouts; an eval rollout follows the latest

    def fill(self, micro_batches, pi_old_pass, accelerator, metrics, training, epsilon_low, epsilon_high) -> None:
        if training:
            self.train_rollouts += 1
        check = bool(self.check_interval) and (self.train_rollouts - 1) % self.check_interval == 0
        ratios, fallback = [], False
        for batch in micro_batches:
            rollout = batch.get("sampling_per_token_logps")
            if rollout is None:  # never fall back to the forward silently
                raise RuntimeError(
                    "use_rollout_logprobs=True, but this generation path returned no log-probs (a rollout_func must "
                    "return them under 'logprobs'). Set use_rollout_logprobs=False."
                )
            mask = batch["completion_mask"].bool()
            # every process takes the same branch: the forward is collective under ZeRO-3 / FSDP
            missing = accelerator.reduce(torch.isnan(rollout[mask]).any().float(), reduction="max") > 0
            rollout = rollout.masked_fill(~mask, 0.0)  # a None off the mask (a masked truncated completion): no NaN
            if missing:
                batch["old_per_token_logps"], fallback = pi_old_pass(batch), True
                continue
            if check:
                recomputed = pi_old_pass(batch)
                # a rollout log-prob of exactly 0 is TRL's filler for tool-result tokens: left out
                ratios.append(mismatch_log_ratios(recomputed, rollout, mask & (rollout != 0)))
            batch["old_per_token_logps"] = rollout
        if check or fallback:
            metrics[f"{ROLLOUT_LOGPROBS_PREFIX}/fallback"].append(float(fallback))
        if ratios:
            stats = rollout_mismatch(accelerator.gather(torch.cat(ratios)), epsilon_low, epsilon_high)
            for name, value in stats.items():
                metrics[f"{ROLLOUT_LOGPROBS_PREFIX}/{name}"].append(value)


def pi_old_source(args) -> RecomputedPiOld | RolloutLogprobsPiOld | None:
    """The pi_old source the config asks for; None when every step is on-policy (no pi_old pass: the loss takes the
    detached current log-probs, which equal pi_old there)."""
    if not pi_old_pass_runs(args):
        return None
    if args.use_rollout_logprobs:
        return RolloutLogprobsPiOld(args.rollout_logprobs_check_interval)
    return RecomputedPiOld()
