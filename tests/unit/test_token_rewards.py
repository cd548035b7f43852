"""trl_gspo.token_rewards: spans -> tokens, validation, the per-token advantage, against naive float64 loops; the
comparison's other token components and span rewards (gspo_examples) too."""

import math
import random

import pytest
import torch
from helpers import reference_token_component

from gspo_examples.tasks import first_mismatch_span, get_task, mismatch_spans
from gspo_examples.token_advantages import TOKEN_ADVANTAGES, token_advantage_trainer
from trl_gspo.rewards import exact_match
from trl_gspo.token_rewards import (
    TokenRewardCollector,
    TokenRewardError,
    check_token_reward_level,
    check_token_values,
    group_centred_component,
    output_kind,
    spans_to_token_values,
    token_char_offsets,
    token_level_reward,
)


def test_output_kind():
    assert output_kind(1.0, "f", 0) == "scalar"
    assert output_kind(None, "f", 0) == "scalar"
    assert output_kind(float("nan"), "f", 0) == "scalar"
    assert output_kind([0.0, 1, -2.5], "f", 0) == "tokens"
    assert output_kind([(0, 2, 1.0)], "f", 0) == "spans"
    assert output_kind([], "f", 0) == "spans"
    with pytest.raises(TokenRewardError, match=r"'f'.*completion 3"):
        output_kind("good", "f", 3)
    with pytest.raises(TokenRewardError, match="completion 1"):
        output_kind([(0, 1)], "f", 1)


def test_offsets_char_tokenizer_with_eos(tokenizer):
    text = "ab 12"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert token_char_offsets(tokenizer, ids, text) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 5)]


class MultiCharTokenizer:
    """Decodes some ids to several characters; re-encoding is refused so the prefix-decoding path is used."""

    all_special_ids = [0]
    pieces = {0: "", 1: "ab", 2: "c", 3: "def"}

    def __call__(self, *args, **kwargs):
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_offsets_by_prefix_decoding_and_overlap_rule():
    tok = MultiCharTokenizer()
    ids, text = [1, 2, 3, 0], "abcdef"
    offsets = token_char_offsets(tok, ids, text)
    assert offsets == [(0, 2), (2, 3), (3, 6), (6, 6)]
    # a span touching part of a multi-character token gives that token its whole value; eos gets nothing
    assert spans_to_token_values([(1, 2, -1.0)], offsets, 6, "f", 0) == [-1.0, 0.0, 0.0, 0.0]
    # two adjacent spans inside one token: the token carries their sum
    assert spans_to_token_values([(3, 4, 1.0), (4, 6, 2.0)], offsets, 6, "f", 0) == [0.0, 0.0, 3.0, 0.0]
    # a span ending exactly where a token starts does not touch it
    assert spans_to_token_values([(0, 2, 5.0)], offsets, 6, "f", 0) == [5.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="cannot map"):
        token_char_offsets(tok, ids, "abcdeX")


def naive_span_values(spans, offsets):
    values = []
    for a, b in offsets:
        total = 0.0
        for s, e, v in spans:
            if any(s <= c < e for c in range(a, b)):  # the token shares at least one character with the span
                total += v
        values.append(total)
    return values


def test_spans_to_token_values_matches_character_loop():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(0, 3) for _ in range(rng.randint(1, 8))]
        offsets, pos = [], 0
        for n in lengths:
            offsets.append((pos, pos + n))
            pos += n
        if pos == 0:
            continue
        cuts = sorted(rng.sample(range(pos + 1), k=min(pos + 1, rng.randint(2, 6))))
        spans = [(s, e, rng.uniform(-2, 2)) for s, e in zip(cuts, cuts[1:]) if s < e and rng.random() < 0.7]
        got = spans_to_token_values(spans, offsets, pos, "f", 0)
        assert got == pytest.approx(naive_span_values(spans, offsets), abs=1e-12)


@pytest.mark.parametrize(
    "spans, pattern",
    [
        ([(0, 9, 1.0)], "outside the text"),
        ([(-1, 2, 1.0)], "outside the text"),
        ([(2, 2, 1.0)], "outside the text"),
        ([(0, 3, 1.0), (2, 4, 1.0)], "overlap"),
        ([(0, 1, float("nan"))], "non-finite"),
        ([(0, 1, float("inf"))], "non-finite"),
        ([(0.5, 1, 1.0)], "integer"),
    ],
)
def test_bad_spans_name_function_and_completion(spans, pattern):
    with pytest.raises(TokenRewardError, match=rf"'precision', completion 7: .*{pattern}"):
        spans_to_token_values(spans, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], 5, "precision", 7)


def test_check_token_values():
    assert check_token_values([1, 0, -1], 3, "f", 0) == [1.0, 0.0, -1.0]
    with pytest.raises(TokenRewardError, match=r"'f', completion 2: 2 per-token values for a completion of 3"):
        check_token_values([1, 0], 3, "f", 2)
    with pytest.raises(TokenRewardError, match=r"'f', completion 0: .*nan at token 1"):
        check_token_values([1, float("nan"), 0], 3, "f", 0)


def span_like_batch(seed=0, group_size=4, groups=4, width=7):
    """Rewards (mostly 0, marks of -1, -0.5 or 1), masks with gaps (tool tokens) and two degenerate groups."""
    generator = torch.Generator().manual_seed(seed)
    rows = group_size * groups
    marks = torch.tensor([-1.0, -0.5, 1.0])[torch.randint(0, 3, (rows, width), generator=generator)]
    rewards = torch.where(torch.rand(rows, width, generator=generator) < 0.3, marks, torch.zeros(rows, width))
    lengths = torch.randint(1, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    mask[1, 0] = 0.0  # a tool token inside a completion
    rewards[group_size : 2 * group_size] = 0.5  # a constant group
    mask[2 * group_size : 3 * group_size] = 0.0
    mask[2 * group_size, 0] = 1.0  # a group with one loss token
    return rewards, mask, group_size


@pytest.mark.parametrize("formulation", TOKEN_ADVANTAGES)
def test_token_advantage_formulations_match_naive_references(formulation):
    component = TOKEN_ADVANTAGES[formulation]
    for seed in range(3):
        rewards, mask, group_size = span_like_batch(seed)
        got = component(rewards, mask, group_size)
        expected = reference_token_component(formulation, rewards.tolist(), mask.tolist(), group_size)
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
        assert got.dtype == rewards.dtype
        assert torch.all(got[mask == 0] == 0)
        assert torch.all(got[2 * group_size : 3 * group_size] == 0)  # one loss token: no contrast
        assert got[3 * group_size :].abs().sum() > 0  # a real signal where the group has one
        # a group with no token rewards gets exactly 0 (a run without them trains as GSPO)
        assert torch.all(component(torch.zeros_like(rewards), mask, group_size) == 0)
    with pytest.raises(ValueError, match="groups of 5"):
        component(rewards, mask, 5)


def test_formulations_differ_on_unmarked_tokens_and_common_marks():
    # one group of 3 completions of 3 tokens, the last an eos without characters: every completion has its
    # first character marked wrong, the second completion its second character too
    rewards = torch.tensor([[-1.0, 0.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.ones(3, 3)
    centred = group_centred_component(rewards, mask, 3)
    assert torch.all(centred[:, 2] > 0)  # the eos gains credit from the others' marks: ending early pays
    for name in ("scaled", "marked_only", "position_baseline", "return_to_go"):
        assert torch.all(TOKEN_ADVANTAGES[name](rewards, mask, 3)[:, 2] == 0), name
    baseline = TOKEN_ADVANTAGES["position_baseline"](rewards, mask, 3)
    assert torch.all(baseline[:, 0] == 0)  # a mark every completion shares at that position cancels out
    assert baseline[1, 1] < 0 < baseline[0, 1]
    to_go = TOKEN_ADVANTAGES["return_to_go"](rewards, mask, 3)
    assert to_go[1, 0] < to_go[0, 0] < 0  # the later mistake also lowers the tokens before it


def test_group_centred_component_matches_naive_reference():
    torch.manual_seed(0)
    group_size, rows, width = 4, 12, 7
    rewards = torch.randn(rows, width)
    rewards[4:8] = 0.5  # a constant group: exactly 0
    lengths = torch.randint(0, width + 1, (rows,))
    lengths[8:12] = torch.tensor([0, 0, 0, 1])  # one masked token only: 0
    mask = (torch.arange(width) < lengths.unsqueeze(1)).float()
    got = group_centred_component(rewards, mask, group_size)
    expected = reference_token_component("group_centred", rewards.tolist(), mask.tolist(), group_size)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert torch.all(got[4:] == 0)
    assert torch.all(got[mask == 0] == 0)
    with pytest.raises(ValueError, match="groups of 5"):
        group_centred_component(rewards, mask, 5)


@token_level_reward
def span_reward(completions, **kwargs):
    return [[(0, 1, -1.0)] for _ in completions]


def test_marked_function_refused_outside_gspo_token():
    check_token_reward_level([span_reward], "sequence_token")
    check_token_reward_level(lambda **k: [], "sequence")
    for level in ("sequence", "token"):
        with pytest.raises(TokenRewardError, match=rf"'span_reward'.*sequence_token.*not '{level}'"):
            check_token_reward_level([span_reward], level)


def test_collector_converts_outputs(tokenizer):
    eos = tokenizer.eos_token_id
    texts = ["abc", "de", "", "xyz"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    collector = TokenRewardCollector(tokenizer, ids, texts, "sequence_token")

    def mixed(completions, **kwargs):
        return [[(1, 3, -1.0)], [0.5, 0.0, 1.0], None, 2.0]

    wrapped = collector.wrap(1, mixed, "mixed")
    assert wrapped.__name__ == "mixed"
    assert wrapped(completions=texts) == [-1.0, 1.5, None, 2.0]  # sums of spans / token lists; scalars unchanged
    assert collector.token_values[1] == [[0.0, -1.0, -1.0, 0.0], [0.5, 0.0, 1.0], None, None]
    matrix = collector.token_reward_matrix([0.0, 2.0], width=5)
    assert matrix.tolist() == [[0, -2, -2, 0, 0], [1, 0, 2, 0, 0], [0] * 5, [0] * 5]

    scalar = collector.wrap(0, lambda completions, **k: [1.0, float("nan"), float("inf"), None], "plain")
    out = scalar(completions=texts)
    assert out[0] == 1.0 and math.isnan(out[1]) and math.isnan(out[2]) and out[3] is None
    assert collector.non_finite == {"plain": (1, 1, 4)}
    assert 0 not in collector.token_values  # a plain function keeps the plain path


def test_collector_errors_name_function_and_completion(tokenizer):
    ids = [tokenizer("ab", add_special_tokens=False)["input_ids"]] * 2
    collector = TokenRewardCollector(tokenizer, ids, ["ab", "ab"], "sequence_token")
    with pytest.raises(TokenRewardError, match=r"'short', completion 1: 1 per-token values"):
        collector.wrap(0, lambda completions, **k: [[1, 2], [1]], "short")(completions=["ab", "ab"])
    with pytest.raises(TokenRewardError, match=r"'far', completion 0: span \(0, 5, 1.0\) lies outside"):
        collector.wrap(0, lambda completions, **k: [[(0, 5, 1.0)], 0.0], "far")(completions=["ab", "ab"])
    sequence = TokenRewardCollector(tokenizer, ids, ["ab", "ab"], "sequence")
    with pytest.raises(TokenRewardError, match=r"'spans'.*sequence_token.*completion 1"):
        sequence.wrap(0, lambda completions, **k: [1.0, [(0, 1, 1.0)]], "spans")(completions=["ab", "ab"])


@pytest.mark.parametrize(
    "outputs, error, pattern",
    [
        (
            None,
            TypeError,
            r"'f' returned NoneType None: expected a list with one entry per completion \(2 completions",
        ),
        ({"a": 1.0, "b": 0.0}, TypeError, r"'f' returned dict .*expected a list with one entry"),
        ([1.0], ValueError, r"'f' returned 1 rewards for 2 completions"),
        ([0.0, "1.0"], TokenRewardError, r"'f' returned '1.0' for completion 1: expected a number, None"),
    ],
)
def test_trainer_and_checked_wrapper_refuse_bad_outputs_alike(tokenizer, outputs, error, pattern):
    """GSPOTrainer's reward adapter and wrap_reward_checked share one check: same error, same message."""
    from trl_gspo.rewards import wrap_reward_checked

    def f(completions, **kwargs):
        return outputs

    ids = [tokenizer("ab", add_special_tokens=False)["input_ids"]] * 2
    collector = TokenRewardCollector(tokenizer, ids, ["ab", "ab"], "sequence_token")
    for call in (collector.wrap(0, f, "f"), wrap_reward_checked(f)):
        with pytest.raises(error, match=pattern):
            call(completions=["ab", "ab"])


def test_checked_wrapper_passes_token_level_outputs_and_keeps_the_marker():
    from trl_gspo.rewards import wrap_reward_checked

    checked = wrap_reward_checked(span_reward)
    assert checked.returns_token_rewards is True
    assert checked(completions=["ab", "c"]) == [[(0, 1, -1.0)], [(0, 1, -1.0)]]
    with pytest.raises(TokenRewardError, match="'span_reward'"):
        check_token_reward_level([checked], "sequence")


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_token_advantage_weight_is_validated(weight, tmp_path):
    from trl_gspo import GSPOConfig

    with pytest.raises(ValueError, match=rf"token_advantage_weight={weight}"):
        GSPOConfig(output_dir=str(tmp_path), use_cpu=True, token_advantage_weight=weight)


def test_token_advantage_trainer_names_the_formulations():
    from trl_gspo import GSPOTrainer

    assert token_advantage_trainer("group_centred") is GSPOTrainer
    scaled = token_advantage_trainer("scaled")
    assert issubclass(scaled, GSPOTrainer)
    rewards, mask, group_size = span_like_batch()
    torch.testing.assert_close(
        scaled.token_advantage_component(None, rewards, mask, group_size),
        TOKEN_ADVANTAGES["scaled"](rewards, mask, group_size),
    )
    with pytest.raises(ValueError, match=r"unknown token advantage 'centered'; expected one of group_centred, "):
        token_advantage_trainer("centered")


def naive_mismatch_total(text, gold):
    """Number of mistakes: wrong positions, one for any surplus, one for stopping short (-1 for an empty text)."""
    if not text:
        return -1.0
    wrong = sum(a != b for a, b in zip(text, gold))
    return -float(wrong + (len(text) > len(gold)) + (len(text) < len(gold)))


def test_mismatch_spans_marks_the_wrong_characters(tokenizer):
    assert get_task("place").span_reward == "mismatch_spans"
    assert mismatch_spans(["abxde", "abcde", "abxdeff", "ab", ""], ["abxde"] * 5) == [
        [],
        [(2, 3, -1.0)],
        [(5, 7, -1.0)],
        [(1, 2, -1.0)],
        -1.0,
    ]
    rng = random.Random(1)
    for _ in range(200):
        gold = "".join(rng.choice("abc") for _ in range(5))
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        (out,) = mismatch_spans([text], [gold])
        total = out if isinstance(out, float) else sum(v for _, _, v in out)
        assert total == naive_mismatch_total(text, gold)
        if not isinstance(out, float):  # valid spans: inside the text, disjoint
            spans_to_token_values(out, [(k, k + 1) for k in range(len(text))], len(text), "mismatch_spans", 0)


def test_first_mismatch_span_marks_the_first_wrong_character_only():
    assert get_task("swap").span_reward == "first_mismatch_span"
    assert first_mismatch_span(["acbde", "abcde", "acbdex", "acb", "xxxxx", ""], ["acbde"] * 6) == [
        [],
        [(1, 2, -1.0)],
        [(5, 6, -1.0)],
        [(2, 3, -1.0)],
        [(0, 1, -1.0)],
        -1.0,
    ]
    rng = random.Random(2)
    for _ in range(200):
        gold = "".join(rng.choice("ab") for _ in range(5))
        text = "".join(rng.choice("ab") for _ in range(rng.randint(1, 7)))
        (out,) = first_mismatch_span([text], [gold])
        assert sum(v for _, _, v in out) == exact_match([text], [gold])[0] - 1  # no more than exact match says
        wrong = [k for k in range(len(text)) if k >= len(gold) or text[k] != gold[k]]
        if wrong:
            assert out == [(wrong[0], wrong[0] + 1, -1.0)]
        elif len(text) < len(gold):
            assert out == [(len(text) - 1, len(text), -1.0)]
        else:
            assert out == []


def test_tensor_and_numpy_outputs_are_accepted():
    import numpy as np

    assert output_kind(torch.tensor(1.5), "f", 0) == "scalar"
    assert output_kind(np.float32(1.5), "f", 0) == "scalar"
    assert output_kind(torch.tensor([1.0, 0.0]), "f", 0) == "tokens"
    assert output_kind(np.array([1.0, 0.0]), "f", 0) == "tokens"
    assert output_kind(np.array([[0, 1, -1.0]]), "f", 0) == "spans"


def test_summed_reward_is_the_sequence_reward_gspo_token_sees(tokenizer):
    from trl_gspo.token_rewards import summed_reward

    def mixed(completions, **kwargs):
        return [[(0, 1, -1.0), (1, 2, 0.25)], [0.5, 0.5, 1.0], None, 3.0]

    texts = ["ab", "cd", "", "x"]
    summed = summed_reward(mixed)
    assert summed.__name__ == "mixed_sum"
    assert summed(completions=texts) == [-0.75, 2.0, None, 3.0]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    collector = TokenRewardCollector(tokenizer, ids, texts, "sequence_token")
    assert collector.wrap(0, mixed, "mixed")(completions=texts) == summed(completions=texts)


# ---------------------------------------------------------------- multi-byte characters under a byte-level BPE
BYTE_BPE_TRAINING = ["café née", "中文字", "😀👍", "é中😀"]
MULTI_BYTE_TEXTS = ["café née", "中文字", "😀👍", "é中😀", "x中é y", "naïve 字😀"]


def gpt2_byte_to_char():
    """GPT-2's printable stand-in for each byte (what the ByteLevel pre-tokenizer writes into token strings)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_bpe(trim_offsets):
    """A byte-level BPE trained on the spot: "é", "中" and "😀" are single tokens, "ï" is two byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if trim_offsets:  # GPT-2's setting: offsets leave the leading space out of a token
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(BYTE_BPE_TRAINING, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module", params=[False, True], ids=["offsets", "trimmed_offsets"])
def byte_bpe(request):
    return build_byte_bpe(request.param)


def byte_level_ids(tokenizer, pieces):
    """Ids of the given byte-level token strings, each of which must be in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[piece] for piece in pieces]


def random_segmentation(tokenizer, text, rng):
    """The bytes of `text` cut into random vocabulary tokens (mostly not the canonical tokenization)."""
    byte_to_char = gpt2_byte_to_char()
    encoded = "".join(byte_to_char[b] for b in text.encode("utf-8"))
    vocab = tokenizer.get_vocab()
    pieces, position = [], 0
    while position < len(encoded):
        choices = [p for p in vocab if p != "<eos>" and encoded.startswith(p, position)]
        piece = rng.choice(choices)
        pieces.append(piece)
        position += len(piece)
    return byte_level_ids(tokenizer, pieces)


def byte_level_token_bytes(tokenizer, ids):
    """Each token's bytes under the ByteLevel decoder (none for special tokens)."""
    char_to_byte = {c: b for b, c in gpt2_byte_to_char().items()}
    special = set(tokenizer.all_special_ids)
    return [b"" if i in special else bytes(char_to_byte[c] for c in tokenizer.convert_ids_to_tokens(i)) for i in ids]


def naive_byte_span_values(token_bytes, text, spans):
    """Each token's value from its own bytes: the characters it holds a byte of, and the spans over them.

    The text may end in an incomplete character (one U+FFFD for its leftover bytes); every other character is
    whole, so the bytes of text[:-1] re-encoded give each byte's character.
    """
    data = b"".join(token_bytes)
    assert data.decode("utf-8", errors="replace") == text
    char_of_byte = [c for c, ch in enumerate(text) for _ in ch.encode("utf-8")]
    if data.decode("utf-8", errors="replace") != data.decode("utf-8", errors="ignore"):  # a cut last character
        char_of_byte = [c for c, ch in enumerate(text[:-1]) for _ in ch.encode("utf-8")]
        char_of_byte += [len(text) - 1] * (len(data) - len(char_of_byte))
    assert len(char_of_byte) == len(data)
    values, position = [], 0
    for piece in token_bytes:
        chars = set(char_of_byte[position : position + len(piece)])
        position += len(piece)
        values.append(sum(v for s, e, v in spans if any(s <= c < e for c in chars)))
    return values


def assert_spans_follow_bytes(tokenizer, ids, text, rng, token_bytes=byte_level_token_bytes):
    offsets = token_char_offsets(tokenizer, ids, text)
    # one span per character, values 2**c: a token's value says exactly which characters it holds
    per_character = [(c, c + 1, 2.0**c) for c in range(len(text))]
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 4)))
    random_spans = [(s, e, rng.uniform(-2, 2)) for s, e in zip(cuts, cuts[1:])]
    for spans in (per_character, random_spans):
        got = spans_to_token_values(spans, offsets, len(text), "f", 0)
        expected = naive_byte_span_values(token_bytes(tokenizer, ids), text, spans)
        assert got == pytest.approx(expected, abs=1e-12), (text, tokenizer.convert_ids_to_tokens(ids), offsets)


def test_span_over_a_split_character_credits_every_byte_token(byte_bpe):
    eos = byte_bpe.eos_token_id
    canonical = byte_bpe("née", add_special_tokens=False)["input_ids"] + [eos]
    split = byte_level_ids(byte_bpe, ["n", "Ã", "©", "e"]) + [eos]  # "é" as its two bytes, by hand
    assert byte_bpe.decode(split, skip_special_tokens=True) == "née" and len(split) > len(canonical)
    values = spans_to_token_values([(1, 2, -1.0)], token_char_offsets(byte_bpe, split, "née"), 3, "f", 0)
    assert values == [0.0, -1.0, -1.0, 0.0, 0.0]
    canonical_values = spans_to_token_values([(1, 2, -1.0)], token_char_offsets(byte_bpe, canonical, "née"), 3, "f", 0)
    assert sum(v != 0 for v in canonical_values) == 1  # one token holds "é": it alone carries the span


@pytest.mark.parametrize("text", MULTI_BYTE_TEXTS)
def test_spans_follow_bytes_under_any_tokenization(byte_bpe, text):
    """Accented letters, CJK and emoji: canonical tokens, one token per byte, and random vocabulary cuts."""
    rng = random.Random(text)
    eos = byte_bpe.eos_token_id
    canonical = byte_bpe(text, add_special_tokens=False)["input_ids"]
    byte_to_char = gpt2_byte_to_char()
    one_per_byte = byte_level_ids(byte_bpe, [byte_to_char[b] for b in text.encode("utf-8")])
    sequences = [canonical, one_per_byte] + [random_segmentation(byte_bpe, text, rng) for _ in range(20)]
    assert any(s != canonical for s in sequences[2:]), "the random cuts must include non-canonical ones"
    for ids in sequences:
        assert byte_bpe.decode(ids) == text
        assert_spans_follow_bytes(byte_bpe, ids + [eos], text, rng)


def test_spans_on_a_character_cut_at_the_length_limit(byte_bpe):
    """A completion that stops inside an emoji: its text ends in U+FFFD, and each token of the cut bytes holds it."""
    rng = random.Random(2)
    byte_to_char = gpt2_byte_to_char()
    emoji = [byte_to_char[b] for b in "😀".encode()]
    for cut in (1, 2, 3):
        ids = byte_bpe("x中", add_special_tokens=False)["input_ids"] + byte_level_ids(byte_bpe, emoji[:cut])
        text = byte_bpe.decode(ids)
        assert text == "x中\ufffd"
        assert_spans_follow_bytes(byte_bpe, ids, text, rng)


def build_byte_fallback_tokenizer():
    """SentencePiece-style: whole characters where the vocabulary has them, else <0xXX> byte tokens, whose
    incomplete characters decode to one U+FFFD per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(["<unk>", "<eos>", "▁", "a", "x", "é", "中"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def byte_fallback_token_bytes(tokenizer, ids):
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return [
        b"" if i in special else bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.replace("▁", " ").encode()
        for i, p in zip(ids, pieces)
    ]


@pytest.mark.parametrize("text", ["xé a", "x中a", "é😀x"])
def test_spans_follow_bytes_with_byte_fallback_tokens(text):
    tokenizer = build_byte_fallback_tokenizer()
    vocab = tokenizer.get_vocab()
    rng = random.Random(text)
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
    sequences = [canonical]
    for _ in range(10):  # each character as its vocabulary token or as its bytes, at random
        ids = []
        for ch in text:
            piece = ch.replace(" ", "▁")
            if piece in vocab and rng.random() < 0.5:
                ids.append(vocab[piece])
            else:
                ids += [vocab[f"<0x{b:02X}>"] for b in ch.encode("utf-8")]
        sequences.append(ids)
    assert any(len(s) > len(canonical) for s in sequences), "some characters must be cut into byte tokens"
    for ids in sequences:
        assert tokenizer.decode(ids) == text
        assert_spans_follow_bytes(tokenizer, ids + [tokenizer.eos_token_id], text, rng, byte_fallback_token_bytes)
