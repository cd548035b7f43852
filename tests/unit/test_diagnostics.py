"""trl_gspo.diagnostics against direct computations with numpy-free naive code and hand-checked cases."""

import math
import random
import statistics

import pytest

from trl_gspo.diagnostics import (
    distinct_fraction,
    distinct_n,
    group_length_stats,
    rollout_diagnostics,
    zero_variance_group_fraction,
)


def test_hand_checked_rollout():
    sequences = [[1, 2, 3], [1, 2, 3], [1, 2], [4], [5, 5, 5], [5, 5, 5], [5, 5, 5], [5, 5, 5]]
    rewards = [1.0, 0.0, 1.0, float("nan"), 0.5, 0.5, float("nan"), 0.5]
    out = rollout_diagnostics(sequences, rewards, group_size=4)
    # group 1: 3 distinct of 4; group 2: 1 of 4 (collapsed)
    assert out["diversity/distinct_fraction"] == pytest.approx((3 / 4 + 1 / 4) / 2)
    # group 1 bigrams: (1,2),(2,3),(1,2),(2,3),(1,2) -> 2 distinct of 5; group 2: (5,5) x 8 -> 1 of 8
    assert out["diversity/distinct_2"] == pytest.approx((2 / 5 + 1 / 8) / 2)
    assert out["length/group_mean"] == pytest.approx((9 / 4 + 3) / 2)
    assert out["length/group_std"] == pytest.approx((statistics.pstdev([3, 3, 2, 1]) + 0.0) / 2)
    assert out["signal/zero_variance_groups"] == 0.5  # group 2: every scorable reward is 0.5


def test_random_rollouts_match_direct_computation():
    rng = random.Random(0)
    for _ in range(50):
        group_size, groups = rng.randint(1, 5), rng.randint(1, 4)
        sequences = [[rng.randint(0, 2) for _ in range(rng.randint(0, 4))] for _ in range(group_size * groups)]
        lengths = [len(s) for s in sequences]
        fractions, bigram_ratios, means, stds = [], [], [], []
        for g in range(groups):
            block = sequences[g * group_size : (g + 1) * group_size]
            fractions.append(len(set(map(tuple, block))) / group_size)
            bigrams = [(s[k], s[k + 1]) for s in block for k in range(len(s) - 1)]
            if bigrams:
                bigram_ratios.append(len(set(bigrams)) / len(bigrams))
            block_lengths = lengths[g * group_size : (g + 1) * group_size]
            means.append(statistics.fmean(block_lengths))
            stds.append(statistics.pstdev(block_lengths))
        assert distinct_fraction(sequences, group_size) == pytest.approx(statistics.fmean(fractions))
        got = distinct_n(sequences, group_size, 2)
        assert (math.isnan(got) and not bigram_ratios) or got == pytest.approx(statistics.fmean(bigram_ratios))
        assert group_length_stats(lengths, group_size) == pytest.approx(
            (statistics.fmean(means), statistics.fmean(stds))
        )


def test_zero_variance_and_bad_group_size():
    assert zero_variance_group_fraction([1, 1, 0, 1, 2, 2], 2) == pytest.approx(2 / 3)
    assert zero_variance_group_fraction([float("nan"), 3.0, 1.0, 0.0], 2) == 0.5
    with pytest.raises(ValueError, match="groups of 4"):
        distinct_fraction([[1]] * 6, 4)
