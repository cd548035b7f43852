"""trl_gspo.packing against naive per-sequence references."""

import pytest
import torch

from trl_gspo.packing import IGNORE_INDEX, assign_rows, pack_sequences, unpack_completion_values


def ragged_batch(prompt_lengths, completion_lengths, vocab=40, seed=0):
    """A batch laid out as GRPOTrainer does: left-padded prompts, right-padded completions (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    batch, prompt_width, completion_width = len(prompt_lengths), max(prompt_lengths), max(completion_lengths)
    prompt_ids = torch.randint(3, vocab, (batch, prompt_width), generator=generator)
    completion_ids = torch.randint(3, vocab, (batch, completion_width), generator=generator)
    prompt_mask = torch.arange(prompt_width).flip(0)[None, :] < torch.tensor(prompt_lengths)[:, None]
    completion_mask = torch.arange(completion_width)[None, :] < torch.tensor(completion_lengths)[:, None]
    input_ids = torch.cat([prompt_ids * prompt_mask, completion_ids * completion_mask], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    return input_ids, attention_mask, completion_width


PROMPTS = [3, 7, 1, 5, 2, 6]
COMPLETIONS = [9, 0, 4, 12, 1, 6]


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
    assert packed.real_tokens == int(attention_mask.sum())
    seen = set()
    for r in range(packed.input_ids.size(0)):
        for w in range(packed.input_ids.size(1)):
            flat = int(packed.token_index[r, w])
            if flat < 0:
                assert packed.shift_labels[r, w] == IGNORE_INDEX
                continue
            b, column = divmod(flat, width)
            seen.add(flat)
            start = int(attention_mask[b].nonzero().min())
            assert packed.input_ids[r, w] == input_ids[b, column]
            assert packed.position_ids[r, w] == column - start
            assert packed.packed_index[b, column] == r * packed.input_ids.size(1) + w
            next_scored = (
                column + 1 < width and attention_mask[b, column + 1] and column + 1 >= width - completion_width
            )
            expected = input_ids[b, column + 1] if next_scored else IGNORE_INDEX
            assert packed.shift_labels[r, w] == expected
    assert seen == set(attention_mask.reshape(-1).nonzero().flatten().tolist())
    limit = width if budget is None else budget
    for r in range(packed.input_ids.size(0)):
        real = packed.token_index[r] >= 0
        sequences = int((packed.position_ids[r][real] == 0).sum())
        assert int(real.sum()) <= limit or sequences == 1


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


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3_moe"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_each_sequence_alone(make_model, model_type, attn):
    """A real model on the packed rows gives each sequence's log-probs as if it ran alone, unpadded (float64 ref)."""
    model = make_model(model_type, attn_implementation=attn).eval()
    input_ids, attention_mask, completion_width = ragged_batch(PROMPTS, COMPLETIONS, vocab=model.config.vocab_size)
    width = input_ids.size(1)
    packed = pack_sequences(input_ids, attention_mask, completion_width, max_row_tokens=16)
    assert packed.input_ids.size(0) > 1  # several rows, with filler
    with torch.no_grad():
        logits = model(**packed.model_inputs()).logits.double()
        per_position = torch.log_softmax(logits, -1).gather(-1, packed.shift_labels.clamp(min=0)[..., None])[..., 0]
        unpacked = unpack_completion_values(packed, per_position, completion_width)
        for b in range(input_ids.size(0)):
            real = input_ids[b][attention_mask[b].bool()]
            alone = torch.log_softmax(model(real[None]).logits.double()[0], -1)
            completion_length = COMPLETIONS[b]
            for c in range(completion_width):
                if c >= completion_length:
                    assert unpacked[b, c] == 0
                    continue
                position = len(real) - completion_length + c
                expected = alone[position - 1, real[position]]
                torch.testing.assert_close(unpacked[b, c], expected, atol=1e-5, rtol=0)
    assert width > completion_width
