"""Tests for gspo_examples.tasks: checkers, deterministic disjoint splits, jsonl round trip, tokenizer coverage."""

import json
import random

import pytest

from gspo_examples.tasks import (
    TASKS,
    WarmStartError,
    completion_accuracy,
    get_task,
    greedy_accuracy,
    length_gap,
    make_splits,
    prompt_text,
    read_jsonl,
    settings_hash,
    warm_start,
    write_jsonl,
    write_splits,
)
from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm

SMALL = {"train": 300, "dev": 40, "test": 60}


def test_three_tasks_registered():
    assert {"sort_digits", "reverse", "add"} <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("multiply")


@pytest.mark.parametrize(
    "task, prompt, answer",
    [
        ("sort_digits", "sort 52819", "12589"),
        ("sort_digits", "sort 00900", "00009"),
        ("reverse", "reverse bdzqa", "aqzdb"),
        ("reverse", "reverse abcba", "abcba"),
        ("reverse_mixed", "reverse ab", "ba"),
        ("reverse_mixed", "reverse bdzqaxy", "yxaqzdb"),
        ("add", "47+85=", "132"),
        ("add", "10+10=", "20"),
        ("add", "99+99=", "198"),
        ("place", "set 3 x abcde", "abxde"),
        ("place", "set 1 a abcde", "abcde"),
        ("place", "set 5 q zzzzz", "zzzzq"),
        ("swap", "swap 2 abcde", "acbde"),
        ("swap", "swap 4 abcde", "abced"),
    ],
)
def test_checker_known_examples(task, prompt, answer):
    task = TASKS[task]
    assert task.check(prompt, answer)
    assert task.check([{"role": "user", "content": prompt}], f"  {answer}\n")  # surrounding whitespace is ignored
    assert not task.check(prompt, answer + "0")
    assert not task.check(prompt, answer[:-1])
    assert not task.check(prompt, "")


def test_checker_rejects_near_misses():
    assert not TASKS["sort_digits"].check("sort 52819", "98521")  # descending
    assert not TASKS["sort_digits"].check("sort 52819", "1258")  # dropped a digit
    assert not TASKS["reverse"].check("reverse bdzqa", "bdzqa")  # not reversed
    assert not TASKS["add"].check("47+85=", "122")  # no carry
    assert not TASKS["add"].check("47+85=", "1 32")


@pytest.mark.parametrize("prompt", ["reverse a", "reverse abcdefgh", "reverse ab1", "sort ab"])
def test_reverse_mixed_refuses_prompts_outside_its_lengths(prompt):
    with pytest.raises(ValueError, match="not a reverse_mixed prompt"):
        TASKS["reverse_mixed"].check(prompt, "x")


def swapped_letters(text):
    """swap k word: the word with its letters k and k+1 (1-based) exchanged."""
    _, position, word = text.split()
    letters, k = list(word), int(position) - 1
    letters[k], letters[k + 1] = letters[k + 1], letters[k]
    return "".join(letters)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_answers_agree_with_an_independent_solution(name):
    independent = {
        "sort_digits": lambda text: "".join(sorted(text.split()[1])),
        "reverse": lambda text: text.split()[1][::-1],
        "add": lambda text: str(sum(int(x) for x in text.rstrip("=").split("+"))),
        "reverse_mixed": lambda text: text.split()[1][::-1],
        "place": lambda text: "".join(
            text.split()[2] if k + 1 == int(text.split()[1]) else c for k, c in enumerate(text.split()[3])
        ),
        "swap": swapped_letters,
    }[name]
    rows = make_splits(name, seed=3, sizes={"train": 200, "dev": 0, "test": 0})["train"]
    for row in rows:
        text = prompt_text(row["prompt"])
        assert row["answer"] == independent(text)
        assert TASKS[name].check(row["prompt"], row["answer"])
    if name == "add":
        a, b = (int(x) for x in prompt_text(rows[0]["prompt"]).rstrip("=").split("+"))
        assert 10 <= a <= 99 and 10 <= b <= 99
    elif name == "reverse_mixed":  # every answer length from 2 to 7 letters
        assert {len(row["answer"]) for row in rows} == set(range(2, 8))
    else:
        assert all(len(row["answer"]) == 5 for row in rows)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_row_format_is_conversational(name):
    row = make_splits(name, seed=0, sizes={"train": 1})["train"][0]
    assert set(row) == {"prompt", "answer"}
    assert isinstance(row["answer"], str)
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_and_sized(name):
    splits = make_splits(name, seed=0, sizes=SMALL)
    prompts = {split: [prompt_text(r["prompt"]) for r in rows] for split, rows in splits.items()}
    for split, size in SMALL.items():
        assert len(prompts[split]) == size
        assert len(set(prompts[split])) == size  # no duplicates inside a split
    assert not set(prompts["train"]) & set(prompts["dev"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["dev"]) & set(prompts["test"])


def test_splits_are_deterministic_and_seed_dependent():
    assert make_splits("sort_digits", seed=1, sizes=SMALL) == make_splits("sort_digits", seed=1, sizes=SMALL)
    assert make_splits("sort_digits", seed=1, sizes=SMALL) != make_splits("sort_digits", seed=2, sizes=SMALL)
    # the held-out splits do not depend on the train size
    bigger = make_splits("sort_digits", seed=1, sizes={**SMALL, "train": 900})
    assert bigger["test"] == make_splits("sort_digits", seed=1, sizes=SMALL)["test"]


def test_splits_do_not_depend_on_global_random_state():
    random.seed(0)
    first = make_splits("add", seed=5, sizes=SMALL)
    random.seed(123)
    assert make_splits("add", seed=5, sizes=SMALL) == first


def test_too_many_rows_for_the_problem_space_is_an_error():
    with pytest.raises(ValueError, match="too few distinct problems"):
        make_splits("add", seed=0, sizes={"train": 90 * 90 + 1})


def test_jsonl_round_trip(tmp_path):
    splits = make_splits("reverse", seed=0, sizes=SMALL)
    paths = write_splits(splits, tmp_path / "data")
    assert {p.name for p in paths.values()} == {"train.jsonl", "dev.jsonl", "test.jsonl"}
    for name, path in paths.items():
        assert read_jsonl(path) == splits[name]
        assert len(path.read_text().splitlines()) == len(splits[name])
    single = write_jsonl(splits["dev"][:3], tmp_path / "nested" / "x.jsonl")
    assert [json.loads(line) for line in single.read_text().splitlines()] == splits["dev"][:3]


def test_jsonl_loads_with_datasets_in_trl_format(tmp_path):
    from datasets import load_dataset

    path = write_jsonl(make_splits("add", seed=0, sizes={"train": 20})["train"], tmp_path / "train.jsonl")
    dataset = load_dataset("json", data_files=str(path), split="train")
    assert dataset.column_names == ["prompt", "answer"]
    assert dataset[0]["prompt"][0]["role"] == "user"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tokenizer_round_trips_every_task_string(name, tmp_path):
    from transformers import AutoTokenizer

    from gspo_examples.tasks import DEFAULT_MODEL_KWARGS

    tokenizer = build_char_tokenizer()
    # saved next to a model of the demo's type and reloaded the way TRL loads it (AutoTokenizer)
    build_tiny_causal_lm(tokenizer, model_type=DEFAULT_MODEL_KWARGS["model_type"], hidden_size=16).save_pretrained(
        tmp_path
    )
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    splits = make_splits(name, seed=0, sizes=SMALL)
    for row in [r for rows in splits.values() for r in rows]:
        for text in (prompt_text(row["prompt"]), row["answer"]):
            for tok in (tokenizer, reloaded):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids
                assert len(ids) == len(text)  # one token per character
                assert tok.decode(ids) == text
        rendered = reloaded.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert prompt_text(row["prompt"]) in rendered
        assert reloaded.decode(reloaded(rendered, add_special_tokens=False)["input_ids"]) == rendered


def test_settings_hash_is_stable_and_sensitive():
    assert settings_hash({"a": 1, "b": [1, 2]}) == settings_hash({"b": [1, 2], "a": 1})
    assert settings_hash({"a": 1}) != settings_hash({"a": 2})


def _tiny_model():
    tokenizer = build_char_tokenizer()
    return build_tiny_causal_lm(tokenizer, model_type="qwen3", hidden_size=32, seed=0), tokenizer


def test_greedy_accuracy_counts_exact_matches():
    model, tokenizer = _tiny_model()
    rows = make_splits("sort_digits", seed=0, sizes={"test": 8})["test"]
    from gspo_examples.tasks import greedy_completions

    completions = greedy_completions(model, tokenizer, rows, batch_size=3, max_new_tokens=7)
    assert len(completions) == 8
    # score the model's own greedy outputs as the answers: every row then matches
    as_answers = [{**row, "answer": c.strip()} for row, c in zip(rows, completions)]
    assert greedy_accuracy(model, tokenizer, as_answers, batch_size=3, max_new_tokens=7) == 1.0
    wrong = [{**row, "answer": c.strip() + "x"} for row, c in zip(rows, completions)]
    assert greedy_accuracy(model, tokenizer, wrong, batch_size=3, max_new_tokens=7) == 0.0
    model.train()
    greedy_completions(model, tokenizer, rows[:2], max_new_tokens=2)
    assert model.training  # the mode it had is restored
    model.eval()
    greedy_completions(model, tokenizer, rows[:2], max_new_tokens=2)
    assert not model.training
    with pytest.raises(ValueError):
        greedy_accuracy(model, tokenizer, [])


def test_warm_start_raises_a_clear_error_when_the_target_is_unreachable():
    model, tokenizer = _tiny_model()
    splits = make_splits("sort_digits", seed=0, sizes={"train": 64, "dev": 16})
    with pytest.raises(WarmStartError, match="did not reach dev greedy accuracy 1.01 in 4 supervised steps"):
        warm_start(model, tokenizer, splits["train"], splits["dev"], target_accuracy=1.01, max_steps=4, eval_every=2)


@pytest.mark.slow
def test_warm_start_reaches_the_target_and_stops_there():
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, model_type="qwen3", hidden_size=128, intermediate_size=512, seed=0)
    splits = make_splits("sort_digits", seed=0, sizes={"train": 2000, "dev": 128})
    before = greedy_accuracy(model, tokenizer, splits["dev"])
    result = warm_start(model, tokenizer, splits["train"], splits["dev"], target_accuracy=0.2, max_steps=300)
    assert before < 0.05
    assert result["dev_accuracy"] >= 0.2
    assert result["steps"] % 5 == 0
    # it stopped at the first check at or above the target
    assert all(acc < 0.2 for _, acc in result["history"][:-1])
    assert greedy_accuracy(model, tokenizer, splits["dev"]) == pytest.approx(result["dev_accuracy"])


def test_prepare_model_caches_and_reuses(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo_examples.tasks import prepare_model

    kwargs = {
        "seed": 0,
        "cache_dir": tmp_path,
        "split_sizes": {"train": 64, "dev": 8, "test": 8},
        "model_kwargs": {"hidden_size": 16, "intermediate_size": 32},
        "target_accuracy": 0.0,  # reached at the first check
        "log": None,
    }
    folder, info = prepare_model("reverse", **kwargs)
    assert info["cached"] is False and info["steps"] == 5
    assert folder.parent == tmp_path and folder.name.startswith("reverse-")
    assert (folder / "warm_start.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(folder).config.hidden_size == 16
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.decode(tokenizer("reverse abcde", add_special_tokens=False)["input_ids"]) == "reverse abcde"

    again, info_again = prepare_model("reverse", **kwargs)
    assert again == folder and info_again["cached"] is True and info_again["steps"] == 5
    other, _ = prepare_model("reverse", **{**kwargs, "seed": 1})
    assert other != folder  # every setting is part of the key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name, other.name])  # no staging left


def test_prepare_model_refuses_a_model_type_whose_tokenizer_does_not_reload(tmp_path):
    from gspo_examples.tasks import prepare_model

    with pytest.raises(ValueError, match="Qwen2Tokenizer"):
        prepare_model(
            "sort_digits",
            cache_dir=tmp_path,
            split_sizes={"train": 64, "dev": 8, "test": 8},
            model_kwargs={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32},
            target_accuracy=0.0,
            log=None,
        )
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left to be reused


def test_heldout_accuracy_callback_schedule_and_log(monkeypatch):
    """Before the first step, every `every` steps and at the last; entries in log_history, history and the log."""
    from types import SimpleNamespace

    import gspo_examples.tasks as tasks

    rows = [{"prompt": "p", "answer": "ab"}] * 4
    # 1, 2, 3, 4 of the 4 completions right; the wrong ones one character short: gaps -3/4, -2/4, -1/4, 0
    measured = iter([["ab"] * k + ["a"] * (4 - k) for k in (1, 2, 3, 4)])
    monkeypatch.setattr(tasks, "greedy_completions", lambda model, tokenizer, rows: next(measured))
    lines = []
    callback = tasks.HeldoutAccuracyCallback(None, rows, every=2, log=lines.append)
    state = SimpleNamespace(global_step=0, max_steps=5, log_history=[])
    callback.on_train_begin(None, state, None)
    for step in range(1, 6):
        state.global_step = step
        state.log_history.append({"reward": step / 10, "step": step})
        callback.on_step_end(None, state, None)
    assert callback.history == [(0, 0.25), (2, 0.5), (4, 0.75), (5, 1.0)]
    heldout = [e for e in state.log_history if "heldout_accuracy" in e]
    assert heldout == [{"heldout_accuracy": a, "heldout_length_gap": a - 1, "step": s} for s, a in callback.history]
    assert lines[-1] == "[held-out] step 5/5: greedy accuracy 1.000 on 4 test prompts, mean rollout reward 0.500"
    assert lines[0] == "[held-out] step 0/5: greedy accuracy 0.250 on 4 test prompts"


def test_length_gap_and_accuracy_of_completions():
    rows = [
        {"prompt": "1+2=", "answer": "3"},
        {"prompt": "50+60=", "answer": "110"},
        {"prompt": "9+9=", "answer": "18"},
    ]
    completions = [" 3\n", "11", "1800"]  # right, one short, two long (surrounding whitespace does not count)
    assert length_gap(completions, rows) == (0 - 1 + 2) / 3
    assert completion_accuracy(completions, rows) == 1 / 3
    with pytest.raises(ValueError):
        length_gap(completions[:2], rows)  # one completion per row
