"""The pure GSPO objective against a naive float64 loop written from the paper's formulas."""

import math
import zlib

import pytest
import torch
from helpers import reference_clip_flags, reference_objective

from trl_gspo.objective import (
    DEFAULT_LOG_RATIO_BOUND,
    compute_policy_objective,
    k3_kl,
    length_normalized_is_weight,
    sequence_log_ratio,
)

EPS_LOW, EPS_HIGH = 3e-4, 4e-4


def make_batch(B=5, T=7, scale=1e-3, seed=0, ragged=True, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    # alternate the drift's sign by row so that both clip directions occur whenever scale exceeds eps
    drift = torch.tensor([(-1.0) ** i for i in range(B)], dtype=torch.float64).unsqueeze(1)
    logp = old + scale * (torch.randn(B, T, generator=g, dtype=torch.float64) + 2 * drift)
    mask = torch.ones(B, T, dtype=torch.float64)
    if ragged:
        for i in range(B):
            mask[i, T - (i % T) :] = 0  # row i keeps T - i tokens (row 0 keeps all)
    if empty_row:
        mask[-1] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


def ours_and_reference(level, logp, old, adv, mask, **kwargs):
    ref_kwargs = {
        k: v for k, v in kwargs.items() if k not in ("sequence_weights", "token_weights", "ref_per_token_logps")
    }
    ref_kwargs.update(
        seq_weights=kwargs.get("sequence_weights"),
        tok_weights=kwargs.get("token_weights"),
        ref=kwargs.get("ref_per_token_logps"),
    )
    if "kl_importance_correction" in ref_kwargs:
        ref_kwargs["kl_correction"] = ref_kwargs.pop("kl_importance_correction")
    x = logp.clone().float().requires_grad_(True)
    out = compute_policy_objective(level, x, old.float(), adv.float(), mask.float(), EPS_LOW, EPS_HIGH, **kwargs)
    out.loss.backward()
    x64 = logp.clone().requires_grad_(True)
    expected = reference_objective(level, x64, old, adv, mask, EPS_LOW, EPS_HIGH, **ref_kwargs)
    expected.backward()
    return out, x.grad, expected, x64.grad


def assert_close(actual, expected, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("scale", [1e-5, 1e-2], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("adv_sign", ["positive", "negative", "mixed"])
def test_matches_float64_reference(level, scale, adv_sign):
    logp, old, adv, mask = make_batch(scale=scale, seed=zlib.crc32(f"{level}{scale}{adv_sign}".encode()))
    adv = {"positive": adv.abs() + 0.1, "negative": -adv.abs() - 0.1, "mixed": adv}[adv_sign]
    out, grad, expected, expected_grad = ours_and_reference(level, logp, old, adv, mask)
    assert_close(out.loss, expected)
    assert_close(grad, expected_grad)
    clipped = (out.low_clipped | out.high_clipped).any().item()
    assert clipped == (scale > 1e-4), "the two regimes must really differ in whether the clip fires"
    if scale > 1e-4:  # a clipped sequence gets no policy gradient
        rows = (out.low_clipped | out.high_clipped).any(-1)
        assert grad[rows].abs().max().item() == 0.0


def test_gspo_token_with_sequence_advantages_equals_gspo():
    logp, old, adv, mask = make_batch(scale=2e-3, seed=3)
    seq_out, seq_grad, _, _ = ours_and_reference("sequence", logp, old, adv, mask)
    per_token_adv = adv.unsqueeze(1).expand_as(logp).contiguous()
    tok_out, tok_grad, _, _ = ours_and_reference("sequence_token", logp, old, per_token_adv, mask)
    assert_close(tok_out.loss, seq_out.loss)
    assert_close(tok_grad, seq_grad)
    assert seq_out.low_clipped.shape == (logp.size(0), 1)  # GSPO: one flag per sequence
    assert torch.equal(tok_out.low_clipped.any(-1), seq_out.low_clipped.squeeze(1))
    assert torch.equal(tok_out.high_clipped.any(-1), seq_out.high_clipped.squeeze(1))


def test_gspo_token_per_token_advantages():
    logp, old, _, mask = make_batch(scale=1e-5, seed=4)
    adv = torch.randn(logp.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out, grad, expected, expected_grad = ours_and_reference("sequence_token", logp, old, adv, mask)
    assert_close(out.loss, expected)
    assert_close(grad, expected_grad)
    # tokens of one sequence now pull in different directions: not a multiple of the sequence gradient
    row = grad[0] / mask[0].sum()
    assert (row > 0).any() and (row < 0).any()


def test_each_sequence_counts_once_whatever_its_length():
    """Two sequences with the same ratio and opposite advantages cancel, however many tokens each has."""
    T = 8
    old = torch.full((2, T), -1.0, dtype=torch.float64)
    logp = old + 1e-5
    mask = torch.zeros(2, T, dtype=torch.float64)
    mask[0, :2] = 1
    mask[1, :] = 1
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    out = compute_policy_objective("sequence", logp.float(), old.float(), adv.float(), mask, EPS_LOW, EPS_HIGH)
    assert abs(out.loss.item()) < 1e-7  # a token-sum aggregation would give the long one 4x the weight


def test_empty_rows_contribute_nothing_and_no_nan():
    logp, old, adv, mask = make_batch(scale=1e-5, seed=5)
    mask[:] = 0
    mask[0, :3] = 1
    old[1:, :] = -30.0  # padding values (finite, as the trainer's forward writes them) must not leak through the mask
    for level in ("sequence", "sequence_token"):
        x = logp.clone().float().requires_grad_(True)
        out = compute_policy_objective(level, x, old.float(), adv.float(), mask.float(), EPS_LOW, EPS_HIGH)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
        assert x.grad[1:].abs().max().item() == 0.0
        assert x.grad[0].abs().max().item() > 0.0
        # only row 0 counts, but the loss is still normalised by B
        single = compute_policy_objective(level, x[:1], old[:1].float(), adv[:1].float(), mask[:1], EPS_LOW, EPS_HIGH)
        assert math.isclose(out.loss.item() * x.size(0), single.loss.item(), rel_tol=1e-6)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_extreme_log_ratios_are_clamped(level):
    logp, old, adv, mask = make_batch(seed=6, empty_row=False)
    logp[0] = old[0] + 80.0  # exp(80) overflows float32
    logp[1] = old[1] - 80.0
    out, grad, expected, expected_grad = ours_and_reference(level, logp, old, adv, mask)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert out.seq_log_ratio[0].item() == DEFAULT_LOG_RATIO_BOUND
    assert out.seq_log_ratio[1].item() == -DEFAULT_LOG_RATIO_BOUND
    assert_close(out.loss, expected)
    assert_close(grad, expected_grad)
    assert grad[:2].abs().max().item() == 0.0  # beyond the bound the ratio carries no gradient


def test_sequence_and_token_weights_match_reference():
    logp, old, adv, mask = make_batch(scale=1e-5, seed=7)
    seq_w = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    out, grad, expected, expected_grad = ours_and_reference("sequence", logp, old, adv, mask, sequence_weights=seq_w)
    assert_close(out.loss, expected)
    assert_close(grad, expected_grad)
    assert grad[1].abs().max().item() == 0.0
    tok_w = (torch.rand(logp.shape, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    out, grad, expected, expected_grad = ours_and_reference(
        "sequence_token", logp, old, adv, mask, token_weights=tok_w
    )
    assert_close(out.loss, expected)
    assert_close(grad, expected_grad)
    assert grad[tok_w == 0].abs().max().item() == 0.0


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_clip_flags_match_the_gradient(level):
    """Flagged exactly when the clip or the log-ratio clamp leaves a counted sequence (token) no gradient; rows and
    tokens of weight 0 (off-policy mask, masked importance weight, entropy mask) are not counted at all."""
    B, T = 9, 6
    logp, old, adv, mask = make_batch(B=B, T=T, scale=1e-2, seed=13)
    bound = DEFAULT_LOG_RATIO_BOUND
    logp[0], adv[0] = old[0] + 1.5 * bound, -1.0  # beyond +bound with A < 0: the clamp, not the clip, cuts it
    logp[1], adv[1] = old[1] + 1.5 * bound, 1.0
    logp[2], adv[2] = old[2] - 1.5 * bound, 1.0  # beyond -bound with A > 0
    logp[3], adv[3] = old[3] - 1.5 * bound, 0.0  # a zero advantage: no gradient to cut
    logp[4], adv[4] = old[4] - 0.1, -1.0  # far below the band, A < 0: clipped ...
    seq_w = torch.ones(B, dtype=torch.float64)
    seq_w[4] = 0.0  # ... but dropped by a sequence mask: not in the loss, not counted
    seq_w[5] = 0.5
    adv[6] = 1.0  # log s_6 = +0.02 with A > 0: the plain high clip
    kwargs = {"sequence_weights": seq_w}
    if level == "sequence_token":
        g = torch.Generator().manual_seed(2)
        adv = adv.unsqueeze(1) + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        adv[1, :2] = 0.0
        kwargs["token_weights"] = (torch.rand(B, T, generator=g) > 0.3).double()
    out = compute_policy_objective(
        level, logp.float(), old.float(), adv.float(), mask.float(), EPS_LOW, EPS_HIGH, **kwargs
    )
    counted, low, high = reference_clip_flags(
        level, logp, old, adv, mask, EPS_LOW, EPS_HIGH, seq_weights=seq_w, tok_weights=kwargs.get("token_weights")
    )
    if level == "sequence":
        assert out.policy_tokens.any(-1).tolist() == counted
        assert out.low_clipped.squeeze(1).tolist() == low and out.high_clipped.squeeze(1).tolist() == high
        assert high[0] and low[2] and not low[3] and not counted[4], "the cases above must be what they claim"
        assert any(low[5:] + high[5:]), "and the plain clip must fire on some of the other rows"
    else:
        assert out.policy_tokens.tolist() == counted
        assert out.low_clipped.tolist() == low and out.high_clipped.tolist() == high
        assert any(high[0]) and any(low[2]) and not any(counted[4])
        assert any(map(any, low[5:] + high[5:]))


def test_token_weights_refused_for_plain_gspo():
    logp, old, adv, mask = make_batch()
    with pytest.raises(ValueError, match="sequence_token"):
        compute_policy_objective("sequence", logp, old, adv, mask, EPS_LOW, EPS_HIGH, token_weights=mask)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        compute_policy_objective("sequence", logp, old, mask, mask, EPS_LOW, EPS_HIGH)
    with pytest.raises(ValueError, match="level"):
        compute_policy_objective("token", logp, old, adv, mask, EPS_LOW, EPS_HIGH)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("correction", [True, False])
def test_kl_term_matches_reference(level, correction):
    logp, old, adv, mask = make_batch(scale=5e-2, seed=8)
    ref = logp + 0.1 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, grad, expected, expected_grad = ours_and_reference(
        level, logp, old, adv, mask, ref_per_token_logps=ref.float(), beta=0.04, kl_importance_correction=correction
    )
    assert_close(out.loss, expected)
    assert_close(grad, expected_grad)
    assert (out.per_token_kl >= 0).all()


def test_kl_correction_uses_token_ratio_not_sequence_ratio():
    """TRL issue 6586: weighting each token's KL by the sequence ratio is a different (biased) estimator."""
    logp, old, adv, mask = make_batch(scale=0.3, seed=10, ragged=False, empty_row=False)
    ref = logp - 0.2
    out = compute_policy_objective(
        "sequence",
        logp.float(),
        old.float(),
        adv.float() * 0,
        mask,
        EPS_LOW,
        EPS_HIGH,
        ref_per_token_logps=ref.float(),
        beta=1.0,
    )
    kl = k3_kl(logp, ref)
    token_weighted = (kl * torch.exp(logp - old)).mean(-1).mean()
    sequence_weighted = (kl * torch.exp(sequence_log_ratio(logp, old, mask)).unsqueeze(1)).mean(-1).mean()
    assert math.isclose(out.loss.item(), token_weighted.item(), rel_tol=1e-5)
    assert not math.isclose(out.loss.item(), sequence_weighted.item(), rel_tol=1e-3)


def test_sequence_log_ratio_is_length_normalised_float32():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], dtype=torch.bfloat16)
    old = torch.tensor([[-1.5, -2.0, -3.5, -9.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0]])
    value = sequence_log_ratio(logp, old, mask)
    assert value.dtype == torch.float32
    assert math.isclose(value.item(), (0.5 + 0.0 + 0.5) / 3, rel_tol=1e-6)


def test_gspo_token_value_survives_bf16_inputs():
    """Cancel-first: the eps-sized sequence signal is not rounded away when log-probs arrive in bf16."""
    logp, old, adv, mask = make_batch(scale=1e-4, seed=11, ragged=False, empty_row=False)
    logp_bf16 = logp.to(torch.bfloat16)
    seq = compute_policy_objective("sequence", logp_bf16, old.float(), adv.float(), mask, EPS_LOW, EPS_HIGH)
    tok = compute_policy_objective("sequence_token", logp_bf16, old.float(), adv.float(), mask, EPS_LOW, EPS_HIGH)
    assert seq.loss.item() == pytest.approx(tok.loss.item(), rel=1e-6)
    # the naive order, sg[s] * p / sg[p] evaluated in bf16, loses that signal entirely
    s = torch.exp(seq.seq_log_ratio).to(torch.bfloat16).unsqueeze(1)
    naive = s * torch.exp(logp_bf16) / torch.exp(logp_bf16)
    assert not torch.allclose(naive.float(), torch.exp(seq.seq_log_ratio).unsqueeze(1).expand_as(naive), rtol=1e-5)


def test_length_normalized_is_weight():
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-2.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    sampling = torch.tensor([[-1.2, -0.8, -1.6, 0.0], [-2.0, float("nan"), -3.0, -2.0], [-9.0, -9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    expected = torch.tensor(
        [math.exp((0.2 - 0.2 + 0.6) / 3), math.exp((0.0 + 0.0 + 1.0 + 0.0) / 4), math.exp(min(8.0, 10.0))]
    )
    truncated = length_normalized_is_weight(old, sampling, mask, "sequence_truncate", None, 3.0)
    assert_close(truncated, torch.minimum(expected, torch.tensor(3.0)))
    masked = length_normalized_is_weight(old, sampling, mask, "sequence_mask", 1.25, 3.0)
    assert_close(masked, torch.tensor([0.0, expected[1].item(), 0.0]))
    # the product over tokens (TRL's sequence mode) would be exp(0.6) and exp(1.0): the mean differs
    assert not math.isclose(truncated[0].item(), math.exp(0.6), rel_tol=1e-3)
    with pytest.raises(ValueError, match="mode"):
        length_normalized_is_weight(old, sampling, mask, "token_mask", None, 3.0)


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_objective_metrics_match_a_loop_over_sequences(level):
    """The logged statistics, from one micro-batch or from two halves summed and concatenated (as over processes),
    against a plain Python loop over the sequences of the flags the objective returns."""
    from trl_gspo.objective import objective_metric_sums, objective_metrics

    logp, old, adv, mask = make_batch(B=6, T=7, scale=2e-3, seed=3)
    if level == "sequence_token":
        adv = adv.unsqueeze(1) * torch.linspace(0.5, 1.5, 7)
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # row 2 dropped (off-policy mask)
    out = compute_policy_objective(level, logp, old, adv, mask, EPS_LOW, EPS_HIGH, sequence_weights=keep)

    low = out.low_clipped.float()
    high = out.high_clipped.float()
    per_low, per_high, counted, loss_tokens, clipped = [], [], 0, 0, 0
    for i in range(6):
        tokens_in_loss = int(out.policy_tokens[i].sum())
        if tokens_in_loss == 0:
            continue
        counted += 1
        loss_tokens += tokens_in_loss
        if level == "sequence":
            per_low.append(float(low[i, 0]))
            per_high.append(float(high[i, 0]))
            clipped += (per_low[-1] + per_high[-1]) * tokens_in_loss
        else:
            per_low.append(float(low[i].sum()) / tokens_in_loss)
            per_high.append(float(high[i].sum()) / tokens_in_loss)
            clipped += int(((low[i] + high[i]) > 0).sum())
    ratios = [math.exp(float(out.seq_log_ratio[i])) for i in range(6) if out.lengths[i] > 0]
    mean = sum(ratios) / len(ratios)
    expected = {
        "gspo/clip_ratio/low_mean": sum(per_low) / counted,
        "gspo/clip_ratio/high_mean": sum(per_high) / counted,
        "gspo/clip_ratio/region_mean": (sum(per_low) + sum(per_high)) / counted,
        "gspo/clipped_token_fraction": clipped / loss_tokens,
        "gspo/clip_ratio/low_min": min(per_low),
        "gspo/clip_ratio/high_max": max(per_high),
        "gspo/seq_ratio/mean": mean,
        "gspo/seq_ratio/std": math.sqrt(sum((r - mean) ** 2 for r in ratios) / len(ratios)),
        "gspo/seq_ratio/min": min(ratios),
        "gspo/seq_ratio/max": max(ratios),
    }
    assert 0 < expected["gspo/clip_ratio/region_mean"] < 1  # the batch exercises both clipped and unclipped rows

    sums, per_sequence = objective_metric_sums(out)
    whole = objective_metrics(sums, per_sequence)
    halves = [objective_metric_sums(_rows(out, rows)) for rows in (slice(0, 3), slice(3, 6))]
    split = objective_metrics(halves[0][0] + halves[1][0], torch.cat([halves[0][1], halves[1][1]]))
    for metrics in (whole, split):
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            assert math.isclose(metrics[name], value, rel_tol=1e-5, abs_tol=1e-7), name


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
def test_grpo_metrics_match_a_loop_over_rows(level):
    """GRPOTrainer's clip_ratio/*, entropy and kl as its importance_sampling_level="sequence" defines them (flags of
    the unclamped s_i whatever the weights, every row counted, per-token advantages counted per token), from one
    micro-batch or two halves, against a plain loop."""
    from trl_gspo.objective import grpo_metric_sums, grpo_metrics

    logp, old, adv, mask = make_batch(B=6, T=7, scale=2e-3, seed=3)  # row 5 is empty
    logp, old, mask = logp.float(), old.float(), mask.float()
    if level == "sequence_token":
        adv = adv.unsqueeze(1) * torch.linspace(-1.0, 1.5, 7)
    adv = adv.float()
    entropies = torch.rand(6, 7, generator=torch.Generator().manual_seed(1))
    kl = torch.rand(6, 7, generator=torch.Generator().manual_seed(2))
    low, high, count, per_low, per_high, entropy, kl_sum = 0.0, 0.0, 0.0, [], [], 0.0, 0.0
    for i in range(6):
        tokens = [t for t in range(7) if mask[i, t]]
        ratio = math.exp(sum(float(logp[i, t] - old[i, t]) for t in tokens) / max(len(tokens), 1))
        entropy += sum(float(entropies[i, t]) for t in tokens)
        kl_sum += sum(float(kl[i, t]) * ratio for t in tokens)
        if level == "sequence":
            row_low, row_high = float(ratio < 1 - EPS_LOW and adv[i] < 0), float(ratio > 1 + EPS_HIGH and adv[i] > 0)
            low, high, count = low + row_low, high + row_high, count + 1
            per_low.append(row_low)
            per_high.append(row_high)
        elif tokens:
            token_low = [float(ratio < 1 - EPS_LOW and adv[i, t] < 0) for t in tokens]
            token_high = [float(ratio > 1 + EPS_HIGH and adv[i, t] > 0) for t in tokens]
            low, high, count = low + sum(token_low), high + sum(token_high), count + len(tokens)
            per_low.append(sum(token_low) / len(tokens))
            per_high.append(sum(token_high) / len(tokens))
    tokens = float(mask.sum())
    expected = {
        "clip_ratio/low_mean": low / count,
        "clip_ratio/high_mean": high / count,
        "clip_ratio/region_mean": (low + high) / count,
        "clip_ratio/low_min": min(per_low),
        "clip_ratio/high_max": max(per_high),
        "entropy": entropy / tokens,
        "kl": kl_sum / tokens,
    }
    assert 0 < expected["clip_ratio/region_mean"] < 1  # the batch exercises both clipped and unclipped rows

    def sums(rows):
        return grpo_metric_sums(
            logp[rows], old[rows], adv[rows], mask[rows], entropies[rows], EPS_LOW, EPS_HIGH, kl[rows]
        )

    whole = grpo_metrics(*sums(slice(None)), with_kl=True)
    halves = [sums(rows) for rows in (slice(0, 3), slice(3, 6))]
    split = grpo_metrics(halves[0][0] + halves[1][0], torch.cat([halves[0][1], halves[1][1]]), with_kl=True)
    for metrics in (whole, split):
        assert metrics.keys() == expected.keys()
        for name, value in expected.items():
            assert math.isclose(metrics[name], value, rel_tol=1e-5, abs_tol=1e-7), name


def _rows(out, rows):
    """The ObjectiveOutput of a subset of rows (what another process would have computed)."""
    import dataclasses

    return dataclasses.replace(
        out,
        **{
            f.name: getattr(out, f.name)[rows]
            for f in dataclasses.fields(out)
            if f.name != "loss" and getattr(out, f.name) is not None
        },
    )
