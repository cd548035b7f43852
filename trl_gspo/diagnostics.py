"""Per-rollout diagnostics of exploration, length and signal, as pure functions of the sampled groups.

GSPO gives every token of a completion one shared weight; stable sequence-level updates can collapse a group onto
one answer (exploration drops) and its length normalisation can bias response length (LUSPO, arXiv 2602.05261).
These numbers let a user see either coming. A rollout is N completions in consecutive groups of G (one group per
prompt, TRL's order); every statistic is computed per group, then averaged over groups. The keys (`diversity/`,
`length/`, `signal/`) are defined in trl_gspo/metrics.py; the policy entropy is logged by the loss (`entropy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from accelerate.utils import gather_object


def _groups(items: Sequence, group_size: int) -> list[Sequence]:
    if group_size < 1 or len(items) % group_size:
        raise ValueError(f"{len(items)} completions are not a whole number of groups of {group_size}")
    return [items[start : start + group_size] for start in range(0, len(items), group_size)]


def distinct_fraction(sequences: Sequence[Sequence[int]], group_size: int) -> float:
    """Mean over groups of (number of distinct completions) / G."""
    groups = _groups(sequences, group_size)
    return sum(len({tuple(s) for s in group}) / group_size for group in groups) / len(groups)


def distinct_n(sequences: Sequence[Sequence[int]], group_size: int, n: int = 2) -> float:
    """Mean over groups of (distinct n-grams) / (all n-grams) of the group's completions; NaN if no group has one."""
    ratios = []
    for group in _groups(sequences, group_size):
        grams = [tuple(s[k : k + n]) for s in group for k in range(len(s) - n + 1)]
        if grams:
            ratios.append(len(set(grams)) / len(grams))
    return sum(ratios) / len(ratios) if ratios else math.nan


def group_length_stats(lengths: Sequence[float], group_size: int) -> tuple[float, float]:
    """(mean over groups of the mean length, mean over groups of the population std of the lengths)."""
    means, stds = [], []
    for group in _groups(lengths, group_size):
        mean = sum(group) / group_size
        means.append(mean)
        stds.append(math.sqrt(sum((x - mean) ** 2 for x in group) / group_size))
    return sum(means) / len(means), sum(stds) / len(stds)


def zero_variance_group_fraction(rewards: Sequence[float], group_size: int) -> float:
    """Share of groups whose non-NaN rewards are all equal (a group with at most one scorable reward included)."""
    groups = _groups(rewards, group_size)
    return sum(len({r for r in group if not math.isnan(r)}) <= 1 for group in groups) / len(groups)


def rollout_diagnostics(
    sequences: Sequence[Sequence[int]], rewards: Sequence[float], group_size: int
) -> dict[str, float]:
    """Every metric of this module for one rollout: completion token ids (unpadded) and total rewards."""
    mean_length, std_length = group_length_stats([len(s) for s in sequences], group_size)
    return {
        "diversity/distinct_fraction": distinct_fraction(sequences, group_size),
        "diversity/distinct_2": distinct_n(sequences, group_size, 2),
        "length/group_mean": mean_length,
        "length/group_std": std_length,
        "signal/zero_variance_groups": zero_variance_group_fraction(rewards, group_size),
    }


def log_rollout_diagnostics(completion_ids_list, rewards_per_func, reward_weights, group_size, metrics) -> None:
    """Log the module's statistics of one rollout (every process's completions) into `metrics`.

    `completion_ids_list` are this process's sampled ids (not completion_mask: mask_truncated_completions zeroes the
    mask of truncated completions); `rewards_per_func` the gathered (N, functions) rewards TRL computed.
    """
    weighted = rewards_per_func * reward_weights.to(rewards_per_func.device).unsqueeze(0)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = weighted.nansum(dim=1).masked_fill(unscorable, float("nan")).tolist()
    sequences = gather_object([list(ids) for ids in completion_ids_list])
    for name, value in rollout_diagnostics(sequences, rewards, group_size).items():
        metrics[name].append(value)
