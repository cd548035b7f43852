"""The GSPO objective as pure tensor functions (Zheng et al., arXiv 2507.18071).

Tensors in, a loss and its statistics out: no trainer, no process group, no model. `GSPOTrainer` calls
`compute_policy_objective`; the tests compare every function here with a float64 loop written straight
from the paper's formulas.

Notation (shapes): B sequences (completions) in the micro-batch, T completion positions (padded).
`mask` (B, T) is 1 on the completion tokens that count (padding and tool-output tokens are 0).

    s_i   = exp( (1/|y_i|) * sum_t mask_it * (logp_it - old_logp_it) )          sequence ratio
    J     = (1/B) * sum_i min( s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i )
    GSPO-token: s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)], advantages A_it, and the min(...) is averaged
                over the tokens of a sequence, then over sequences.

Every sequence counts once, whatever its length: that is what makes it GSPO (summing token losses over
a batch would weight sequences by length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import metrics as names

# exp(10) ~ 2.2e4: far outside any clip band, small enough that exp never overflows in float32 (verl and
# SkyRL clamp at the same value). Beyond it the ratio carries no gradient.
DEFAULT_LOG_RATIO_BOUND = 10.0


@dataclass
class ObjectiveOutput:
    """What `compute_policy_objective` returns.

    Attributes:
        loss: () the objective to minimise, mean over the B sequences (policy term + beta * KL term).
        seq_log_ratio: (B,) detached, clamped length-normalised log-ratio log s_i (0 for empty rows).
        lengths: (B,) number of unmasked completion tokens |y_i|.
        policy_tokens: (B, T) bool, the tokens whose policy term carries a non-zero weight: the mask less the
            sequences and tokens that `sequence_weights` or `token_weights` set to 0 (off-policy mask, an importance
            weight masked out). The clip flags and statistics count only these: the others are not in the loss.
        low_clipped: the ratio's gradient is cut on the low side: below 1 - eps_low with a negative advantage (the
            clip), or log s_i at -log_ratio_bound with a non-zero advantage (the clamp). (B, 1) bool for GSPO (one
            flag per sequence), (B, T) for GSPO-token (per token); False off `policy_tokens`.
        high_clipped: likewise above 1 + eps_high with a positive advantage, or at +log_ratio_bound.
        per_token_kl: (B, T) detached k3 estimate of KL(pi_theta || pi_ref), or None when beta == 0.
    """

    loss: torch.Tensor
    seq_log_ratio: torch.Tensor
    lengths: torch.Tensor
    policy_tokens: torch.Tensor
    low_clipped: torch.Tensor
    high_clipped: torch.Tensor
    per_token_kl: torch.Tensor | None


def masked_token_diff(logps: torch.Tensor, other_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 `logps - other_logps` on masked tokens, exactly 0 elsewhere.

    `torch.where`, not a product with the mask: padding may hold -inf or NaN (vLLM marks tokens it could not
    score with NaN) and NaN * 0 is NaN.
    """
    diff = logps.float() - other_logps.float()
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def sequence_log_ratio(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    log_ratio_bound: float = DEFAULT_LOG_RATIO_BOUND,
) -> torch.Tensor:
    """Length-normalised sequence log-ratio log s_i, in float32.

    Args:
        per_token_logps: (B, T) log pi_theta(y_it | x, y_i<t), differentiable.
        old_per_token_logps: (B, T) the same under the rollout policy pi_old.
        mask: (B, T) 1 for tokens that count.
        log_ratio_bound: the result is clamped to [-bound, bound] so exp cannot overflow.

    Returns:
        (B,) (1/|y_i|) * sum_t mask_it * (logp_it - old_logp_it); 0 for rows with no unmasked token.

    Padding must hold finite log-probs (the trainer's own forward writes 0 there): a product with the mask is
    several times cheaper than `torch.where` on CPU. Engine log-probs, which may be NaN, go through
    `masked_token_diff` instead.
    """
    lengths = mask.sum(-1).float()
    summed = ((per_token_logps.float() - old_per_token_logps.float()) * mask).sum(-1)
    return (summed / lengths.clamp(min=1.0)).clamp(-log_ratio_bound, log_ratio_bound)


def k3_kl(per_token_logps: torch.Tensor, ref_per_token_logps: torch.Tensor) -> torch.Tensor:
    """(B, T) k3 estimator of KL(pi_theta || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    delta = ref_per_token_logps.float() - per_token_logps.float()
    return torch.exp(delta) - delta - 1


def length_normalized_is_weight(
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
    log_ratio_bound: float = DEFAULT_LOG_RATIO_BOUND,
) -> torch.Tensor:
    """(B,) detached sequence importance weights between the inference engine (vLLM) and the trainer, GSPO's
    geometric mean w_i = exp( (1/|y_i|) * sum_t mask_it * (old_logp_it - sampling_logp_it) ), all inputs (B, T).

    TRL's "sequence_*" modes use the product over tokens (exp of the sum), which collapses or explodes on long
    completions. Tokens the engine could not score (NaN) count as agreeing. `mode` "sequence_truncate" clamps w into
    [clip_min, clip_max], "sequence_mask" zeroes it outside; either bound may be None (no bound on that side).
    """
    diff = torch.nan_to_num(masked_token_diff(old_per_token_logps, sampling_per_token_logps, mask), nan=0.0)
    lengths = mask.sum(-1).float().clamp(min=1.0)
    if mode not in ("sequence_truncate", "sequence_mask"):
        raise ValueError(
            f"length_normalized_is_weight: mode must be 'sequence_truncate' or 'sequence_mask', got {mode!r}"
        )
    weight = torch.exp((diff.sum(-1) / lengths).clamp(-log_ratio_bound, log_ratio_bound)).detach()
    return _bounded(weight, mode, clip_min, clip_max)


def _bounded(weights: torch.Tensor, mode: str, clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """Importance weights clamped into [clip_min, clip_max] ("*_truncate") or zeroed outside it ("*_mask")."""
    if mode.endswith("_truncate"):
        return weights.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return weights.masked_fill((weights < low) | (weights > high), 0.0)


def engine_importance_weights(
    old_per_token_logps: torch.Tensor,
    sampling_per_token_logps: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
    length_normalized: bool,
    log_ratio_bound: float = DEFAULT_LOG_RATIO_BOUND,
) -> torch.Tensor:
    """vLLM importance-correction weights of a batch: (B, 1) in a "sequence_*" mode, (B, T) in a "token_*" mode.

    With `length_normalized` (a sequence mode), GSPO's geometric mean, `length_normalized_is_weight`. Otherwise
    GRPOTrainer's own weights: the exp of the per-token difference (token modes) or of its sum over the sequence
    (sequence modes), engine NaNs counting as agreement, bounded as `_bounded` says.
    """
    sequence_mode = mode.startswith("sequence")
    if sequence_mode and length_normalized:
        weights = length_normalized_is_weight(
            old_per_token_logps, sampling_per_token_logps, mask, mode, clip_min, clip_max, log_ratio_bound
        )
        return weights.unsqueeze(1)
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)
    return _bounded(torch.exp(diff.sum(dim=-1, keepdim=True) if sequence_mode else diff), mode, clip_min, clip_max)


def _clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high):
    """-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A), elementwise (PPO's pessimistic bound)."""
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    return -torch.minimum(ratio * advantages, clipped_ratio * advantages)


def compute_policy_objective(
    level: str,
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    *,
    sequence_weights: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    ref_per_token_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_importance_correction: bool = True,
    log_ratio_bound: float = DEFAULT_LOG_RATIO_BOUND,
) -> ObjectiveOutput:
    """The GSPO ("sequence") or GSPO-token ("sequence_token") loss for one micro-batch.

    Args:
        level: "sequence" (GSPO: one clipped ratio and one weight per sequence) or "sequence_token"
            (GSPO-token: same ratio value, each token may carry its own advantage).
        per_token_logps: (B, T) log pi_theta of the completion tokens, differentiable.
        old_per_token_logps: (B, T) log pi_old (rollout policy), no gradient needed.
        advantages: (B,) one per sequence, or (B, T) per token ("sequence_token" only).
        mask: (B, T) 1 on the tokens that count (completion minus padding and tool output).
        epsilon_low, epsilon_high: clip band [1 - eps_low, 1 + eps_high] (paper: 3e-4, 4e-4).
        sequence_weights: (B,) optional detached per-sequence multipliers of the policy term (off-policy
            sequence mask, inference-engine importance weights).
        token_weights: (B, T) optional detached per-token multipliers of the policy term (entropy mask,
            per-token engine weights); "sequence_token" only, since a sequence-level loss has no token terms.
        ref_per_token_logps: (B, T) log pi_ref, required when beta > 0.
        beta: KL coefficient. The per-token k3 KL is averaged over each sequence's tokens, then over sequences.
        kl_importance_correction: multiply each token's KL by its own ratio pi_theta / pi_old (DeepSeek-V3.2's
            unbiased estimator); per token, never the sequence ratio (TRL issue 6586).
        log_ratio_bound: clamp of the log-ratios so exp cannot overflow.

    Returns:
        ObjectiveOutput. Rows with no unmasked token contribute exactly 0 to the loss and its gradient; the
        loss is divided by B (not by the number of non-empty rows) so that a sequence's weight does not depend
        on how many others in its micro-batch were masked out.
    """
    if level not in ("sequence", "sequence_token"):
        raise ValueError(f"compute_policy_objective: level must be 'sequence' or 'sequence_token', got {level!r}")
    batch_size = per_token_logps.size(0)
    mask = mask.float()
    lengths = mask.sum(-1)
    non_empty = lengths > 0
    seq_log_ratio = sequence_log_ratio(per_token_logps, old_per_token_logps, mask, log_ratio_bound)

    if level == "sequence":
        if advantages.dim() != 1:
            raise ValueError(
                f"GSPO ('sequence') takes one advantage per sequence, shape (B,); got {tuple(advantages.shape)}. "
                "Per-token advantages need importance_sampling_level='sequence_token' (GSPO-token)."
            )
        if token_weights is not None:
            raise ValueError(
                "GSPO ('sequence') has no per-token terms to weight; token_weights need 'sequence_token'."
            )
        adv = advantages.float()
        per_sequence_loss = _clipped_surrogate(torch.exp(seq_log_ratio), adv, epsilon_low, epsilon_high)
        clip_advantages = adv.unsqueeze(1)  # (B, 1), broadcast over tokens for the token-level statistics
    else:
        adv = advantages.float() if advantages.dim() == 2 else advantages.float().unsqueeze(1)
        # Cancel first: (logp - sg[logp]) is exactly 0 in value and carries d logp; adding sg[log s_i] after
        # keeps the eps-sized signal that sg[s] * p / sg[p] would round away in bf16. Beyond the log-ratio
        # bound the ratio carries no gradient, as in the sequence form.
        in_bound = (seq_log_ratio.abs() < log_ratio_bound).float().unsqueeze(1)
        token_log_ratio = (per_token_logps.float() - per_token_logps.float().detach()) * in_bound
        token_ratio = torch.exp(token_log_ratio + seq_log_ratio.detach().unsqueeze(1))
        per_token_loss = _clipped_surrogate(token_ratio, adv, epsilon_low, epsilon_high)
        weights = mask if token_weights is None else mask * token_weights.float()
        per_sequence_loss = (per_token_loss * weights).sum(-1) / lengths.clamp(min=1.0)
        clip_advantages = adv

    if sequence_weights is not None:
        per_sequence_loss = per_sequence_loss * sequence_weights.float()
    per_sequence_loss = torch.where(non_empty, per_sequence_loss, torch.zeros_like(per_sequence_loss))

    per_token_kl = None
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("compute_policy_objective: beta != 0 needs ref_per_token_logps.")
        kl = k3_kl(per_token_logps, ref_per_token_logps)
        per_token_kl = kl.detach()
        if kl_importance_correction:
            token_log_ratio = masked_token_diff(per_token_logps, old_per_token_logps, mask)
            kl = kl * torch.exp(token_log_ratio.clamp(-log_ratio_bound, log_ratio_bound))
        kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
        per_sequence_loss = per_sequence_loss + beta * kl.sum(-1) / lengths.clamp(min=1.0)

    with torch.no_grad():
        policy_tokens = mask.bool()
        if sequence_weights is not None:
            policy_tokens = policy_tokens & (sequence_weights != 0).unsqueeze(1)
        if token_weights is not None:
            policy_tokens = policy_tokens & (token_weights != 0)
        counted = policy_tokens.any(-1, keepdim=True) if level == "sequence" else policy_tokens
        log_ratio = seq_log_ratio.unsqueeze(1)
        ratio = torch.exp(log_ratio)
        # at the bound the clamp leaves no gradient whatever the advantage's sign (a zero advantage has none anyway)
        moving = clip_advantages != 0
        low_clipped = ((ratio < 1 - epsilon_low) & (clip_advantages < 0)) | ((log_ratio <= -log_ratio_bound) & moving)
        high_clipped = ((ratio > 1 + epsilon_high) & (clip_advantages > 0)) | ((log_ratio >= log_ratio_bound) & moving)
        low_clipped, high_clipped = low_clipped & counted, high_clipped & counted

    return ObjectiveOutput(
        loss=per_sequence_loss.sum() / batch_size,
        seq_log_ratio=seq_log_ratio.detach(),
        lengths=lengths,
        policy_tokens=policy_tokens,
        low_clipped=low_clipped,
        high_clipped=high_clipped,
        per_token_kl=per_token_kl,
    )


# --- statistics of the objective, as logged (pure: the trainer only reduces them over processes) ---


def objective_metric_sums(out: ObjectiveOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO's own statistics of one micro-batch, in a form that sums (and gathers) exactly over micro-batches and
    processes.

    The clip statistics count only what is in the loss (`out.policy_tokens`): sequences with at least one token of
    non-zero weight, i.e. neither empty nor dropped by the off-policy mask or a masked importance weight.

    Returns:
        sums: (5,) [low-clipped sequences, high-clipped sequences, sequences in the loss, clipped tokens, tokens in
            the loss]; a GSPO-token sequence counts as the fraction of its loss tokens under the clip.
        per_sequence: (B, 3) [low-clipped fraction, high-clipped fraction, s_i]: NaN in the first two for rows not
            in the loss and in the third for empty rows, so that they never win a min or a max.
    """
    row_tokens = out.policy_tokens.float().sum(-1)  # each row's tokens in the loss
    counted = row_tokens > 0
    if out.low_clipped.size(1) == 1:  # GSPO: one flag per sequence
        per_seq_low = out.low_clipped.squeeze(1).float()
        per_seq_high = out.high_clipped.squeeze(1).float()
        clipped_tokens = ((per_seq_low + per_seq_high) * row_tokens).sum()
    else:  # GSPO-token: per-token flags (the advantage sign may vary along a sequence)
        per_seq_low = out.low_clipped.float().sum(-1) / row_tokens.clamp(min=1.0)
        per_seq_high = out.high_clipped.float().sum(-1) / row_tokens.clamp(min=1.0)
        clipped_tokens = (out.low_clipped | out.high_clipped).float().sum()
    sums = torch.stack(
        [per_seq_low.sum(), per_seq_high.sum(), counted.float().sum(), clipped_tokens, row_tokens.sum()]
    )
    nan = torch.full_like(per_seq_low, float("nan"))
    per_sequence = torch.stack(
        [
            torch.where(counted, per_seq_low, nan),
            torch.where(counted, per_seq_high, nan),
            torch.where(out.lengths > 0, torch.exp(out.seq_log_ratio), nan),
        ],
        dim=1,
    )
    return sums, per_sequence


def objective_metrics(sums: torch.Tensor, per_sequence: torch.Tensor) -> dict[str, float]:
    """GSPO's own logged metrics (`gspo/clip_ratio/*`, `gspo/clipped_token_fraction`, `gspo/seq_ratio/*`: their
    definitions are in trl_gspo/metrics.py) from `objective_metric_sums` summed (`sums`) and concatenated
    (`per_sequence`) over micro-batches or processes."""
    low, high, sequences, clipped, loss_tokens = sums.tolist()
    sequences, loss_tokens = max(sequences, 1.0), max(loss_tokens, 1.0)
    metrics = {
        names.GSPO_CLIP_LOW_MEAN: low / sequences,
        names.GSPO_CLIP_HIGH_MEAN: high / sequences,
        names.GSPO_CLIP_REGION_MEAN: (low + high) / sequences,
        names.CLIPPED_TOKEN_FRACTION: clipped / loss_tokens,
    }
    # masked reductions rather than nanmin/nanmax, whose emptiness check syncs with the device
    in_clip, valid = ~torch.isnan(per_sequence[:, 0]), ~torch.isnan(per_sequence[:, 2])
    count = valid.sum().clamp(min=1)
    seq_low, seq_high, ratios = (torch.nan_to_num(per_sequence[:, i], nan=0.0) for i in range(3))
    mean = ratios.sum() / count
    inf = torch.tensor(float("inf"), device=ratios.device)
    n_clip, n, low_min, high_max, mean, std, ratio_min, ratio_max = torch.stack(
        [
            in_clip.sum().float(),
            valid.sum().float(),
            torch.where(in_clip, seq_low, inf).min(),
            torch.where(in_clip, seq_high, -inf).max(),
            mean,
            (torch.where(valid, (ratios - mean) ** 2, 0.0).sum() / count).sqrt(),
            torch.where(valid, ratios, inf).min(),
            torch.where(valid, ratios, -inf).max(),
        ]
    ).tolist()  # one device-to-host transfer
    if n_clip > 0:
        metrics[names.GSPO_CLIP_LOW_MIN] = low_min
        metrics[names.GSPO_CLIP_HIGH_MAX] = high_max
    if n > 0:
        metrics.update(
            {
                names.SEQ_RATIO_MEAN: mean,
                names.SEQ_RATIO_STD: std,
                names.SEQ_RATIO_MIN: ratio_min,
                names.SEQ_RATIO_MAX: ratio_max,
            }
        )
    return metrics


def grpo_metric_sums(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropies: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    per_token_kl: torch.Tensor | None = None,
    kl_importance_correction: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics behind the keys GRPOTrainer logs from its loss (`clip_ratio/*`, `entropy`, `kl`), computed as
    TRL 1.16's `GRPOTrainer._compute_loss` computes them with importance_sampling_level="sequence" for the same
    micro-batch, so that each key means in a GSPO run what it means in a GRPO one.

    TRL's clip flags are `exp(mean_t log-ratio) < 1 - eps_low` with A < 0 and `> 1 + eps_high` with A > 0: no
    clamp, no off-policy, entropy or importance weights; (B, 1) with (B,) advantages, averaged over every row, (B, T)
    with per-token ones, averaged over the tokens of `mask`. Its `kl` multiplies the k3 estimate by s_i when
    `kl_importance_correction` (GSPO's loss uses each token's own ratio).

    Args:
        per_token_logps, old_per_token_logps: (B, T) log pi_theta and log pi_old; mask: (B, T) the loss mask.
        advantages: (B,) or (B, T); entropies: (B, T); per_token_kl: (B, T) k3 estimate, None when beta == 0.

    Returns:
        sums: (7,) [low flags, high flags, clipped flags, flag count (rows or tokens), entropy sum, KL sum, tokens].
        per_row: (B, 2) [low, high] flag of each row (per-token advantages: the row's token mean, NaN for an empty
            row), what TRL takes the min and max of.
    """
    log_ratio = per_token_logps.detach() - old_per_token_logps
    ratio = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    advantages = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    low_clipped = (ratio < 1 - epsilon_low) & (advantages < 0)
    high_clipped = (ratio > 1 + epsilon_high) & (advantages > 0)
    low, high, region = low_clipped.float(), high_clipped.float(), (low_clipped | high_clipped).float()
    tokens = mask.sum().float()
    if low.size(1) == 1:  # one flag per sequence
        flag_sums = [low.sum(), high.sum(), region.sum(), torch.tensor(float(low.size(0)), device=low.device)]
        per_row = torch.cat([low, high], dim=1)
    else:
        flag_sums = [(low * mask).sum(), (high * mask).sum(), (region * mask).sum(), tokens]
        per_row = torch.stack([(low * mask).sum(-1) / mask.sum(-1), (high * mask).sum(-1) / mask.sum(-1)], dim=1)
    if per_token_kl is None:
        kl_sum = torch.zeros((), device=mask.device)
    else:
        kl = per_token_kl * ratio if kl_importance_correction else per_token_kl
        kl_sum = (kl * mask).sum()
    sums = torch.stack([*flag_sums, (entropies.detach() * mask).sum(), kl_sum, tokens])
    return sums, per_row


def grpo_metrics(sums: torch.Tensor, per_row: torch.Tensor, with_kl: bool) -> dict[str, float]:
    """GRPOTrainer's logged metrics (`clip_ratio/*`, `entropy`, `kl` when `with_kl`) from `grpo_metric_sums` summed
    (`sums`) and concatenated (`per_row`) over processes; NaN extremes where TRL logs NaN (no row to take them
    over)."""
    low, high, region, count, entropy, kl, tokens = sums.tolist()
    count, tokens = max(count, 1.0), max(tokens, 1.0)
    finite = ~torch.isnan(per_row)
    inf = torch.tensor(float("inf"), device=per_row.device)
    n_low, n_high, low_min, high_max = torch.stack(
        [
            finite[:, 0].sum().float(),
            finite[:, 1].sum().float(),
            torch.where(finite[:, 0], per_row[:, 0], inf).min(),
            torch.where(finite[:, 1], per_row[:, 1], -inf).max(),
        ]
    ).tolist()
    metrics = {
        names.CLIP_LOW_MEAN: low / count,
        names.CLIP_HIGH_MEAN: high / count,
        names.CLIP_REGION_MEAN: region / count,
        names.CLIP_LOW_MIN: low_min if n_low else math.nan,
        names.CLIP_HIGH_MAX: high_max if n_high else math.nan,
        names.ENTROPY: entropy / tokens,
    }
    if with_kl:
        metrics[names.KL] = kl / tokens
    return metrics


def outside_clip_band(log_ratio: torch.Tensor, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """Where the sequence log-ratio log s_i leaves [log(1 - eps_low), log(1 + eps_high)], whatever the advantage."""
    return (log_ratio < math.log(1 - epsilon_low)) | (log_ratio > math.log(1 + epsilon_high))


def outside_clip_band_counts(out: ObjectiveOutput, epsilon_low: float, epsilon_high: float) -> torch.Tensor:
    """(2,) float [sequences whose s_i is outside [1 - eps_low, 1 + eps_high], non-empty sequences], whatever the sign
    of the advantage: at a rollout's first optimizer step (no update yet) any such sequence is rounding, not
    learning. Sums over micro-batches and processes give the fraction."""
    counted = out.lengths > 0
    outside = outside_clip_band(out.seq_log_ratio, epsilon_low, epsilon_high) & counted
    return torch.stack([outside.sum(), counted.sum()]).float()
