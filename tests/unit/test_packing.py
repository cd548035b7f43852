"""trl_gspo.packing against naive per-sequence references."""

import pytest
import torch
from helpers import ragged_batch, tiny_model

from gspo_benchmarks import packing_sweep
from gspo_benchmarks.packing_sweep import (
    COMPLETIONS,
    EXACT_BUT_CONFIG,
    PROMPTS,
    TOLERANCE,
    packed_error,
    tiny_causal_lm,
)
from trl_gspo import packing_models
from trl_gspo.packing import (
    IGNORE_INDEX,
    PACKING_EXACT_MODEL_TYPES,
    PACKING_INEXACT_MODEL_TYPES,
    assign_rows,
    config_packing_problem,
    pack_sequences,
    packing_support_problem,
    packs_into_one_row,
    unpack_completion_values,
)


def test_assign_rows_respects_the_budget_and_places_every_sequence_once():
    lengths = [5, 9, 0, 3, 14, 2, 7]
    rows = assign_rows(lengths, max_row_tokens=10)
    placed = sorted(i for row in rows for i in row)
    assert placed == [0, 1, 3, 4, 5, 6]  # the empty sequence is left out
    for row in rows:
        assert sum(lengths[i] for i in row) <= 10 or len(row) == 1
    assert len(rows) == 4  # 14 | 9 | 7+3 | 5+2 (first fit decreasing)


@pytest.mark.parametrize("budget", [None, 8, 1000])
def test_pack_layout_matches_a_per_sequence_loop(budget):
    input_ids, attention_mask, completion_width = ragged_batch(PROMPTS, COMPLETIONS)
    width = input_ids.size(1)
    packed = pack_sequences(input_ids, attention_mask, completion_width, max_row_tokens=budget, pad_token_id=0)
    rows, row_width = packed.input_ids.shape
    index = packed.packed_index
    assert torch.equal(index >= 0, attention_mask.bool())  # every real token packed, no padding
    placed = index[index >= 0].tolist()
    assert len(set(placed)) == len(placed)  # each in a packed position of its own
    for b, column in attention_mask.nonzero().tolist():
        r, w = divmod(int(index[b, column]), row_width)
        start = int(attention_mask[b].nonzero().min())
        assert packed.input_ids[r, w] == input_ids[b, column]
        assert packed.position_ids[r, w] == column - start
        next_scored = column + 1 < width and attention_mask[b, column + 1] and column + 1 >= width - completion_width
        expected = input_ids[b, column + 1] if next_scored else IGNORE_INDEX
        assert packed.shift_labels[r, w] == expected
    real = torch.zeros(rows * row_width, dtype=torch.bool)
    real[placed] = True
    real = real.view(rows, row_width)
    assert torch.all(packed.shift_labels[~real] == IGNORE_INDEX)  # filler scores nothing
    limit = width if budget is None else budget
    for r in range(rows):
        sequences = int((packed.position_ids[r][real[r]] == 0).sum())
        assert int(real[r].sum()) <= limit or sequences == 1


def test_unpack_puts_each_value_at_its_completion_token():
    input_ids, attention_mask, completion_width = ragged_batch(PROMPTS, COMPLETIONS)
    width = input_ids.size(1)
    packed = pack_sequences(input_ids, attention_mask, completion_width, max_row_tokens=9)
    # a "model" whose value at a packed position is the label it scores: unpacking must give the completion ids
    values = packed.shift_labels.float().clamp(min=0)
    unpacked = unpack_completion_values(packed, values, completion_width)
    for b in range(input_ids.size(0)):
        for c in range(completion_width):
            column = width - completion_width + c
            scored = attention_mask[b, column] and attention_mask[b, column - 1]
            assert unpacked[b, c] == (input_ids[b, column] if scored else 0)


def test_a_hole_in_the_mask_is_refused():
    input_ids, attention_mask, completion_width = ragged_batch(PROMPTS, COMPLETIONS)
    attention_mask[3, -completion_width + 1] = 0
    with pytest.raises(ValueError, match=r"sequence\(s\) \[3\]"):
        pack_sequences(input_ids, attention_mask, completion_width)


# --- which models pack exactly: measured against each sequence run alone, unpadded ---

# config features of allowed types that change the attention or the positions, each also measured exact
WINDOW = 4  # tokens; the ragged batch's sequences are up to 18 long
FEATURE_VARIANTS = {
    "qwen2_sliding_window": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)),
    "mistral_sliding_window": ("mistral", dict(sliding_window=WINDOW)),
    "gemma2_sliding_window": ("gemma2", dict(head_dim=8, sliding_window=WINDOW)),
    "gemma3_text_sliding_layers": (
        "gemma3_text",
        dict(head_dim=8, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    ),
    "llama_rope_linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=100.0))),
    "llama_rope_llama3": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
                rope_theta=100.0,
            )
        ),
    ),
    "llama_rope_yarn": (
        "llama",
        dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=100.0)),
    ),
}
ATTENTION = ["sdpa", "eager", "flash_attention_2"]


SEVERAL_ROWS = 16  # tokens per row: the ragged batch (lengths 17, 12, 12, 7, 5, 3) then packs into 4 rows


def check_packs_exactly(model, flash_calls, reference=None):
    """Several rows and one row, with the row layout the trainer uses for this attention implementation."""
    assert packing_support_problem(model) is None
    one_row = packs_into_one_row(model)
    assert one_row == model.config._attn_implementation.startswith("flash")
    for budget in (SEVERAL_ROWS, None):
        assert packed_error(model, max_row_tokens=budget, one_row=one_row, reference=reference) < TOLERANCE
    if one_row:  # transformers' own dispatch reached the varlen kernel with the sequences' own lengths
        assert flash_calls and all(kind == "varlen" for kind, _ in flash_calls)
        lengths = sorted(p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True))
        assert sorted(flash_calls[0][1]) == lengths


@pytest.mark.parametrize("model_type", sorted(PACKING_EXACT_MODEL_TYPES))
def test_allowed_model_type_packs_exactly(model_type, flash_calls):
    """Every accepted type (the sweep's registry), measured again as the sweep did: packed log-probs equal each
    sequence run alone, with each attention implementation its class supports."""
    model = tiny_causal_lm(model_type)
    assert model.config.model_type == model_type  # the registry keys on the type packing_support_problem reads
    reference = packing_sweep.alone_logps(model)  # each build below has the same weights (seed 0)
    for attention in packing_sweep.supported_attentions(model):
        try:
            candidate = model if attention == "eager" else tiny_causal_lm(model_type, attention)
        except ValueError:  # transformers refuses this implementation for this config (e.g. sdpa with softcapping)
            continue
        check_packs_exactly(candidate, flash_calls, reference)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("variant", FEATURE_VARIANTS)
def test_allowed_config_feature_packs_exactly(variant, attention, flash_calls):
    """Sliding windows and position-only RoPE scalings pack exactly too, and they do change the model's output."""
    model_type, extra = FEATURE_VARIANTS[variant]
    model = tiny_model(model_type, attention, **extra)
    check_packs_exactly(model, flash_calls)
    plain = tiny_model(model_type)  # same weights without the feature
    longest = torch.randint(3, 64, (1, 18), generator=torch.Generator().manual_seed(0))
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        assert not torch.allclose(model(longest).logits, plain(longest).logits, atol=1e-4)


def test_flash_attention_across_several_rows_is_inexact(flash_calls):
    """Why flash-attention packs one row: with several, transformers runs the dense kernel (no boundaries)."""
    model = tiny_model("qwen2", "flash_attention_2")
    assert packed_error(model, max_row_tokens=SEVERAL_ROWS) > 100 * TOLERANCE
    assert ("dense", 4) in flash_calls


def reason_kind(why):
    """A refusal reason without its per-type details (the error, the config's layer kinds)."""
    return why.split(" (")[0].split(":")[0]


# one refused type per kind of measured inexactness (the first in alphabetical order): refusing is always safe, so CI
# checks that each kind of reason is real, not every refused type
MEASURED_INEXACT = {
    model_type: why for model_type, (why, _) in packing_models.REFUSED.items() if reason_kind(why) != EXACT_BUT_CONFIG
}
REFUSED_PER_REASON = sorted(
    {reason_kind(why): model_type for model_type, why in sorted(MEASURED_INEXACT.items(), reverse=True)}.values()
)


@pytest.mark.parametrize("model_type", REFUSED_PER_REASON)
def test_refused_model_type_is_inexact_when_packed(model_type):
    """A refused type is refused with its reason, and measuring it again gives that reason and an inexact error."""
    problem = packing_support_problem(tiny_causal_lm(model_type))
    assert problem.startswith(f"model_type={model_type!r} {PACKING_INEXACT_MODEL_TYPES[model_type]}")
    record = packing_sweep.measure(model_type)
    assert record["status"] == "inexact" and record["reason"] == MEASURED_INEXACT[model_type]
    assert record["max_error"] is None or record["max_error"] > TOLERANCE


def test_exact_type_with_a_refused_default_config_is_refused():
    """A type measured exact whose default config the layer-kind or RoPE rules refuse is refused by type too, naming
    that rule (the first such type)."""
    model_type, (why, error) = next(
        (t, entry) for t, entry in sorted(packing_models.REFUSED.items()) if entry[0].startswith(EXACT_BUT_CONFIG)
    )
    model = tiny_causal_lm(model_type)
    assert error is None and why.endswith(
        config_packing_problem(model.config).removeprefix(f"model_type={model_type!r}")
    )
    assert packing_support_problem(model).startswith(f"model_type={model_type!r} {why}")


def test_refusal_states_the_measured_reason_and_error():
    """The refusal names the type, why and the error the sweep measured (opt: its mask ignores the position ids)."""
    why, error = packing_models.REFUSED["opt"]
    assert why == packing_sweep.MASK_WITHOUT_POSITION_IDS and error > 100 * TOLERANCE
    problem = packing_support_problem(tiny_model("opt"))
    assert f"model_type='opt' {why} (packed log-prob error {error:.2g})" in problem


def test_unmeasured_model_types_are_refused_as_not_verified():
    model = tiny_model("qwen2")
    model.config.model_type = "not_a_transformers_type"
    problem = packing_support_problem(model)
    assert "model_type='not_a_transformers_type' is not verified to pack exactly (never measured" in problem
    skipped, reason = sorted(packing_models.NOT_MEASURED.items())[0]
    model.config.model_type = skipped
    assert f"is not verified to pack exactly (not measured: {reason})" in packing_support_problem(model)


def test_docs_list_the_accepted_model_types():
    """docs/PERFORMANCE.md's list and docs/PACKING.md's table come from the same registry (the sweep writes all
    three)."""
    listed = packing_sweep.TYPE_LIST.search(packing_sweep.LIST_PAGE.read_text())
    assert set(listed.group(2).replace(",", " ").split()) == PACKING_EXACT_MODEL_TYPES
    docs = packing_sweep.DOCS.read_text()
    table = docs[docs.index(packing_sweep.TABLE_START) : docs.index(packing_sweep.TABLE_END)]
    accepted = {line.split("|")[1].split()[-1].strip("()") for line in table.splitlines() if "| accepted |" in line}
    assert accepted == PACKING_EXACT_MODEL_TYPES


@pytest.mark.parametrize(
    "model_type, rope_parameters",
    [
        ("llama", dict(rope_type="dynamic", factor=4.0, rope_theta=100.0)),
        (
            "phi3",
            dict(
                rope_type="longrope",
                short_factor=[1.0] * 4,
                long_factor=[8.0] * 4,
                original_max_position_embeddings=8,
                rope_theta=100.0,
            ),
        ),
    ],
)
def test_sequence_length_dependent_rope_is_refused_and_inexact(model_type, rope_parameters):
    """dynamic/longrope rescale from the longest position of the row: a short sequence packed with a long one
    changes (max_position_embeddings=8 is the original length they scale from)."""
    extra = dict(original_max_position_embeddings=8) if model_type == "phi3" else {}
    model = tiny_model(model_type, max_position_embeddings=8, rope_parameters=rope_parameters, **extra)
    assert f"rope_type [{rope_parameters['rope_type']!r}]" in packing_support_problem(model)
    assert packed_error(model, max_row_tokens=None) > TOLERANCE


def test_other_layer_types_are_refused():
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "linear_attention"]
    assert "layer_types ['linear_attention']" in packing_support_problem(model)
