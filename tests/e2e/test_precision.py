"""A small, fast form of scripts/measure_precision.py (gspo_benchmarks.precision, docs/PRECISION.md): is GSPO's
sequence log-ratio computed accurately enough for its 3e-4 clip band after one optimizer step?

The recommended route (float32, no autocast, through TRL's fused LM head) must be within eps_low / 10 of a
float64 recomputation; the comparison must be able to fail (a wrong computation is caught, the step is large
enough to measure), and TRL's default bf16 autocast route is recorded as missing the target. The float16 routes
(fp16 autocast as fp16=True does it, and the model cast to float16) are recorded as several times more accurate
than bf16 on the same inputs, yet still missing the target.
"""

import pytest
import torch

from gspo_benchmarks import precision as mp

SMALL = mp.Settings(
    lengths=(16, 128),
    lrs=(1e-5, 0.0),
    masks=("full", "ragged"),
    routes=("bf16", "fp16", "fp16_weights", "fp32"),
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    batch_size=4,
    prompt_length=8,
    timing_repeats=1,
)


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(single_thread):
    return mp.measure(SMALL, log=lambda *_: None)


def rows(result, route, lr):
    selected = [row for row in result["rows"] if row["route"] == route and row["lr"] == lr]
    assert len(selected) == len(SMALL.lengths) * len(SMALL.masks)
    return selected


def test_recommended_fp32_route_is_within_a_tenth_of_eps_low(result):
    for row in rows(result, "fp32", 1e-5):
        assert row["max_abs_err"] < mp.TARGET, row
        # far below, in fact: float32 rounding, not a near miss
        assert row["max_abs_err"] < mp.TARGET / 10, row


def test_the_step_moves_the_ratio_by_more_than_the_target(result):
    # Otherwise a zero error would prove nothing.
    for row in rows(result, "fp32", 1e-5):
        assert row["median_abs_signal"] > 3 * mp.TARGET, row


def test_no_step_gives_exactly_zero_for_every_route(result):
    for route in SMALL.routes:
        for row in rows(result, route, 0.0):
            assert row["max_abs_err"] == 0.0, row
            assert row["max_abs_signal"] == 0.0, row


def test_bf16_autocast_route_misses_the_target(result):
    # The finding of docs/PRECISION.md: TRL's default bf16 route is not accurate enough for GSPO's band.
    assert max(row["max_abs_err"] for row in rows(result, "bf16", 1e-5)) > mp.TARGET


@pytest.mark.parametrize("route", ["fp16", "fp16_weights"])
def test_fp16_routes_beat_bf16_on_every_row_but_miss_the_target(result, route):
    # docs/PRECISION.md: float16's 11-bit mantissa against bf16's 8 bits makes the error several times smaller, not
    # small enough for eps_low / 10.
    bf16 = {(row["length"], row["mask"]): row["max_abs_err"] for row in rows(result, "bf16", 1e-5)}
    fp16 = rows(result, route, 1e-5)
    for row in fp16:
        assert 0.0 < row["max_abs_err"] < bf16[(row["length"], row["mask"])] / 2, row
    assert max(row["max_abs_err"] for row in fp16) > mp.TARGET


def test_fp16_routes_compute_in_float16(single_thread):
    # Otherwise a float16 route that silently ran float32 (CPU autocast ignoring float16) would look accurate.
    tokenizer, master = mp.build_master(SMALL, SMALL.prompt_length + 16)
    prompt, completion = mp.make_batch(tokenizer, master, SMALL, 16)
    input_ids = torch.cat([prompt, completion], dim=1)
    for name in ("fp16", "fp16_weights", "fp32"):
        model = mp.route_model(master, mp.ROUTES[name])
        dtypes = set()
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out, seen=dtypes: seen.add(out.dtype))
        with torch.no_grad():
            logps = mp.route_logps(model, mp.ROUTES[name], input_ids, torch.ones_like(input_ids), 16)
        assert dtypes == {torch.float32 if name == "fp32" else torch.float16}, name
        assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    assert next(mp.route_model(master, mp.ROUTES["fp16_weights"]).parameters()).dtype == torch.float16


def test_the_comparison_catches_wrong_computations(single_thread):
    length = 64
    tokenizer, master = mp.build_master(SMALL, SMALL.prompt_length + length)
    prompt, completion = mp.make_batch(tokenizer, master, SMALL, length)
    mask = mp.completion_mask("full", SMALL.batch_size, length, SMALL.seed)
    input_ids = torch.cat([prompt, completion], dim=1)
    attention_mask = torch.ones_like(input_ids)
    old_state = {name: p.detach().clone() for name, p in master.named_parameters()}

    route = mp.ROUTES["fp32"]
    model = mp.route_model(master, route)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grads = mp.gspo_gradients(model, route, input_ids, attention_mask, mask, advantages)
    new_state = mp.adamw_step(model, old_state, grads, 1e-5)

    model64 = mp.make_exact_float64(mp.build_like(master, torch.float64))
    mp.load_weights(model64, old_state)
    ref_old = mp.reference_logps(model64, input_ids, attention_mask, length)
    mp.load_weights(model64, new_state)
    ref_ratio = mp.seq_log_ratio_fp64(mp.reference_logps(model64, input_ids, attention_mask, length), ref_old, mask)

    with torch.no_grad():
        mp.load_weights(model, old_state)
        old = mp.route_logps(model, route, input_ids, attention_mask, length)
        mp.load_weights(model, new_state)
        new = mp.route_logps(model, route, input_ids, attention_mask, length)

    assert mp.ratio_errors(new, old, mask, ref_ratio).max() < mp.TARGET
    # the new log-probs taken before the step (stale weights): the error is the whole signal
    assert mp.ratio_errors(old, old, mask, ref_ratio).max() > mp.TARGET
    # per-token log-probs stored in bf16
    assert mp.ratio_errors(new.bfloat16(), old.bfloat16(), mask, ref_ratio).max() > mp.TARGET
    # every sequence's true log-ratio is itself above the target, so a route that ignored the step would fail
    assert (ref_ratio.abs() > mp.TARGET).all()


def test_round_to_tf32():
    one = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-11 + 2**-12, 1 + 2**-12, -(1 + 2**-10 + 2**-12)])
    expected = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-10, 1.0, -(1 + 2**-10)])
    assert torch.equal(mp.round_to_tf32(one), expected)
    assert mp.round_to_tf32(one.double()).dtype == torch.float64  # non-float32 tensors pass through


def test_markdown_table_lists_every_cell(result):
    table = mp.markdown_table(result)
    assert table.count("\n| 16 |") == len(SMALL.masks) * len(SMALL.lrs)
    assert "fp32 max err" in table and "T=128" in table
