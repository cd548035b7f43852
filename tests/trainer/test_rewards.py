"""Unit tests for trl_gspo.rewards: the reward functions, the registry and the checked wrapper."""

import math
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from trl_gspo.rewards import (
    REWARD_FACTORIES,
    REWARD_FUNCS,
    completion_text,
    exact_match,
    get_reward_func,
    load_reward_funcs,
    math_accuracy,
    soft_overlong_penalty,
    think_format,
    wrap_reward_checked,
)


def conversation(content):
    return [{"role": "assistant", "content": content}]


# --- completion_text -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("plain", "plain"),
        (conversation("chat"), "chat"),
        (conversation(None), ""),
        ([], ""),
        ([{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "last"}], "last"),
        (conversation([{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]), "ab"),
    ],
)
def test_completion_text(completion, expected):
    assert completion_text(completion) == expected


# --- math_accuracy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("The answer is \\boxed{42}.", "42", 1.0),
        ("The answer is \\boxed{41}.", "42", 0.0),
        ("So the total is 42", "42", 1.0),
        ("So the total is 41", "42", 0.0),
        ("\\boxed{42}", "\\boxed{42}", 1.0),
        ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
        ("0.75", "\\frac{3}{4}", 1.0),
        ("3/4", "\\dfrac{3}{4}", 1.0),
        ("\\boxed{\\frac{2}{3}}", "3/4", 0.0),
        ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
        ("\\boxed{2}", "2\\sqrt{3}", 0.0),
        ("She has 72 apples, so \\boxed{72}", "48 + 24 = <<48+24=72>>72 apples.\n#### 72", 1.0),
        ("\\boxed{48}", "48 + 24 = <<48+24=72>>72 apples.\n#### 72", 0.0),
        ("\\boxed{1000}", "#### 1,000", 1.0),
        # Only the text after "####" is the gold answer, even when the worked solution boxes something earlier.
        ("\\boxed{12}", "We get \\boxed{3} boxes of 4.\n#### 12", 1.0),
        ("<think>First 12, then 30 more.</think>\n<answer>42</answer>", "42", 1.0),
        ("<think>It is 42, surely.</think>\n<answer>12</answer>", "42", 0.0),
    ],
)
def test_math_accuracy_scores(completion, gold, expected):
    assert math_accuracy([completion], answer=[gold]) == [expected]


def test_math_accuracy_accepts_numeric_gold_and_conversational_completions():
    completions = [conversation("\\boxed{7}"), conversation("\\boxed{8}")]
    assert math_accuracy(completions, answer=[7, 7], completion_ids=[[1], [2]], prompts=["p", "p"]) == [1.0, 0.0]


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{", "{", None, "no digits here ####"])
def test_math_accuracy_unparseable_gold_is_skipped(gold):
    assert math_accuracy(["\\boxed{42}"], answer=[gold]) == [None]


@pytest.mark.parametrize(
    "completion",
    ["", conversation(None), conversation(""), "garbage !!! ???", "\\boxed{42", "\\boxed{", "}}}{{{", "\\frac{4}{"],
)
def test_math_accuracy_malformed_completion_scores_zero(completion):
    assert math_accuracy([completion], answer=["42"]) == [0.0]


def test_math_accuracy_mixed_batch():
    completions = ["\\boxed{1}", "\\boxed{3}", "\\boxed{5}"]
    assert math_accuracy(completions, answer=["1", "", "4"]) == [1.0, None, 0.0]


def test_math_accuracy_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        math_accuracy(["\\boxed{1}", "\\boxed{2}"], answer=["1"])


def test_math_accuracy_works_outside_the_main_thread():
    with ThreadPoolExecutor(max_workers=1) as pool:
        rewards = pool.submit(math_accuracy, ["\\boxed{42}", "\\boxed{41}"], answer=["42", "42"]).result()
    assert rewards == [1.0, 0.0]


def test_math_accuracy_without_math_verify_explains_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"pip install 'trl-gspo\[math\]'"):
        math_accuracy(["\\boxed{1}"], answer=["1"])


def test_math_accuracy_without_math_verify_is_refused_when_resolved(monkeypatch):
    """The default reward of the training script: its missing extra is named when the reward names are resolved
    (before the model loads), not at the first training step."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    for resolve in (
        lambda: get_reward_func("math_accuracy"),
        lambda: load_reward_funcs(["exact_match", "math_accuracy"]),
    ):
        with pytest.raises(ValueError, match=r"math_accuracy needs the math-verify package.*'trl-gspo\[math\]'"):
            resolve()
    assert get_reward_func("exact_match") is exact_match  # the other rewards do not need it


# --- think_format ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion",
    [
        "<think>reasoning</think><answer>42</answer>",
        "<think>\nline one\nline two\n</think>\n\n<answer>\n42\n</answer>\n",
        "  <think></think> <answer>x</answer>",
        conversation("<think>a</think>\n<answer>b</answer>"),
    ],
)
def test_think_format_accepts(completion):
    assert think_format([completion]) == [1.0]


@pytest.mark.parametrize(
    "completion",
    [
        "",
        "42",
        conversation(None),
        "<answer>42</answer>",
        "<think>reasoning</think>",
        "<think>reasoning</think>42",
        "<answer>42</answer><think>reasoning</think>",
        "Sure! <think>reasoning</think><answer>42</answer>",
        "<think>reasoning</think><answer>42</answer> Hope this helps.",
        "<think>reasoning</think> note <answer>42</answer>",
        "<think>reasoning<answer>42</answer>",
        "<think>a</think>junk</think><answer>42</answer>",
        "<think>a</think><answer>1</answer><answer>2</answer>",
        "<think>a</think><answer>42",
    ],
)
def test_think_format_rejects(completion):
    assert think_format([completion]) == [0.0]


# --- soft_overlong_penalty -------------------------------------------------------------------------------------------


def test_soft_overlong_penalty_boundaries():
    # max 100, cache 20: no penalty up to 80 tokens, linear to -1 at 100, -1 beyond.
    penalty = soft_overlong_penalty(max_completion_length=100, cache_length=20)
    lengths = [0, 79, 80, 81, 90, 95, 99, 100, 101, 500]
    expected = [0.0, 0.0, 0.0, -0.05, -0.5, -0.75, -0.95, -1.0, -1.0, -1.0]
    rewards = penalty(completions=[""] * len(lengths), completion_ids=[[7] * n for n in lengths])
    assert rewards == pytest.approx(expected)
    assert penalty.__name__ == "soft_overlong_penalty"


def test_soft_overlong_penalty_is_picklable():
    penalty = pickle.loads(pickle.dumps(soft_overlong_penalty(10, 4)))
    assert penalty(completion_ids=[[1] * 8]) == pytest.approx([-0.5])


@pytest.mark.parametrize(
    ("max_completion_length", "cache_length", "named"),
    [
        (0, 1, "max_completion_length"),
        (-5, 1, "max_completion_length"),
        (10.0, 2, "max_completion_length"),
        (True, 1, "max_completion_length"),
        (10, 0, "cache_length"),
        (10, -1, "cache_length"),
        (10, "2", "cache_length"),
        (10, 10, "cache_length"),
        (10, 11, "cache_length"),
    ],
)
def test_soft_overlong_penalty_validates_arguments(max_completion_length, cache_length, named):
    with pytest.raises(ValueError, match=named):
        soft_overlong_penalty(max_completion_length, cache_length)


# --- exact_match -----------------------------------------------------------------------------------------------------


def test_exact_match():
    completions = ["  cba\n", conversation("abc"), "abcd", conversation(None), "7"]
    assert exact_match(completions, answer=["cba", " abc ", "abc", "abc", 7]) == [1.0, 1.0, 0.0, 0.0, 1.0]


# --- registry --------------------------------------------------------------------------------------------------------


def test_registry_contents():
    assert set(REWARD_FUNCS) == {
        "math_accuracy",
        "think_format",
        "soft_overlong_penalty",
        "exact_match",
    }
    assert REWARD_FACTORIES <= set(REWARD_FUNCS)


def test_get_reward_func_by_name():
    assert get_reward_func("think_format") is think_format
    assert get_reward_func("math_accuracy") is math_accuracy


def test_get_reward_func_calls_factories_with_kwargs():
    penalty = get_reward_func("soft_overlong_penalty", max_completion_length=10, cache_length=5)
    assert penalty.__name__ == "soft_overlong_penalty"
    assert penalty(completion_ids=[[1] * 5, [1] * 10]) == pytest.approx([0.0, -1.0])


def test_get_reward_func_factory_without_kwargs_is_an_error():
    with pytest.raises(ValueError, match="soft_overlong_penalty"):
        get_reward_func("soft_overlong_penalty")


def test_get_reward_func_rejects_kwargs_for_plain_function():
    with pytest.raises(ValueError, match="exact_match"):
        get_reward_func("exact_match", strict=True)


@pytest.mark.parametrize("spec", ["trl_gspo.rewards.exact_match", "trl_gspo.rewards:exact_match"])
def test_get_reward_func_dotted_path(spec):
    assert get_reward_func(spec) is exact_match


def test_get_reward_func_dotted_path_factory_with_kwargs():
    penalty = get_reward_func("trl_gspo.rewards:soft_overlong_penalty", max_completion_length=4, cache_length=2)
    assert penalty(completion_ids=[[1, 2, 3]]) == pytest.approx([-0.5])


def test_get_reward_func_unknown_name_lists_choices():
    with pytest.raises(ValueError) as error:
        get_reward_func("accuracy")
    message = str(error.value)
    assert "'accuracy'" in message
    for name in REWARD_FUNCS:
        assert name in message
    assert "package" in message and ":" in message


@pytest.mark.parametrize(
    ("spec", "underlying"),
    [
        ("no_such_package_xyz.rewards:func", "No module named 'no_such_package_xyz'"),
        ("trl_gspo.rewards:no_such_func", "no_such_func"),
        ("trl_gspo.rewards.no_such_func", "no_such_func"),
    ],
)
def test_get_reward_func_import_failure_names_path_and_cause(spec, underlying):
    with pytest.raises(ValueError) as error:
        get_reward_func(spec)
    assert spec in str(error.value)
    assert underlying in str(error.value)
    assert error.value.__cause__ is not None


def test_get_reward_func_rejects_non_callable():
    with pytest.raises(ValueError, match="non-callable"):
        get_reward_func("trl_gspo.rewards:REWARD_FUNCS")


def test_load_reward_funcs():
    funcs = load_reward_funcs(
        [
            "math_accuracy",
            {"name": "think_format"},
            {"name": "soft_overlong_penalty", "kwargs": {"max_completion_length": 8, "cache_length": 2}},
        ]
    )
    assert [func.__name__ for func in funcs] == ["math_accuracy", "think_format", "soft_overlong_penalty"]
    assert funcs[2](completion_ids=[[1] * 7]) == pytest.approx([-0.5])


@pytest.mark.parametrize("spec", [{"kwargs": {}}, {"name": "think_format", "args": [1]}, 42])
def test_load_reward_funcs_rejects_malformed_specs(spec):
    with pytest.raises(ValueError, match="reward spec"):
        load_reward_funcs([spec])


# --- wrap_reward_checked ---------------------------------------------------------------------------------------------


def broken_reward(completions, **kwargs):
    raise KeyError("answer")


def nan_reward(completions, **kwargs):
    return [1.0, None, math.nan]


def short_reward(completions, **kwargs):
    return [1.0]


def test_wrap_reward_checked_passes_good_rewards_through():
    checked = wrap_reward_checked(math_accuracy)
    assert checked.__name__ == "math_accuracy"
    assert checked(prompts=["p", "p"], completions=["\\boxed{1}", "x"], answer=["1", ""]) == [1.0, None]


def test_wrap_reward_checked_reraises_with_name():
    with pytest.raises(RuntimeError, match="broken_reward") as error:
        wrap_reward_checked(broken_reward)(completions=["a"])
    assert isinstance(error.value.__cause__, KeyError)


def test_wrap_reward_checked_passes_nan_and_inf_on_to_the_trainer():
    """GSPOTrainer warns about NaN/inf and stops only when they persist: the wrapper must not end the run at once."""
    rewards = wrap_reward_checked(nan_reward)(completions=["a", "b", "c"])
    assert rewards[:2] == [1.0, None] and math.isnan(rewards[2])
    assert wrap_reward_checked(lambda completions, **kwargs: [0.0, math.inf])(completions=["a", "b"]) == [
        0.0,
        math.inf,
    ]


def test_wrap_reward_checked_rejects_non_numbers_with_index():
    checked = wrap_reward_checked(lambda completions, **kwargs: [0.0, "1.0"])
    with pytest.raises(ValueError, match=r"returned '1.0' for completion 1: expected a number, None"):
        checked(completions=["a", "b"])


def forgot_to_return(completions, **kwargs):
    [1.0 for _ in completions]


@pytest.mark.parametrize(("func", "returned"), [(forgot_to_return, "NoneType None"), (lambda **kw: 1.0, "float 1.0")])
def test_wrap_reward_checked_names_a_function_that_returns_no_list(func, returned):
    name = func.__name__
    with pytest.raises(
        TypeError,
        match=rf"reward function {name!r} returned {returned}: expected a list with one entry per completion \(2 completions",
    ):
        wrap_reward_checked(func)(completions=["a", "b"])


def test_wrap_reward_checked_rejects_wrong_length():
    with pytest.raises(ValueError, match=r"'short_reward' returned 1 rewards for 2 completions"):
        wrap_reward_checked(short_reward)(completions=["a", "b"])


def test_wrap_reward_checked_keeps_factory_names_and_pickles():
    checked = pickle.loads(pickle.dumps(wrap_reward_checked(soft_overlong_penalty(10, 5))))
    assert checked.__name__ == "soft_overlong_penalty"
    assert checked(completions=["a"], completion_ids=[[1] * 10]) == pytest.approx([-1.0])


# --- GSPOTrainer's checks on reward values: None follows TRL, NaN/inf stop a run only when they persist ---------------


def always_none(completions, **kwargs):
    return [None] * len(completions)


def all_nan(completions, **kwargs):
    return [math.nan] * len(completions)


def tiny_trainer(make_model, tokenizer, tmp_path, reward_funcs, **overrides):
    from conftest import small_trainer

    return small_trainer(make_model("qwen2"), tokenizer, tmp_path, reward_funcs, **overrides)


def streaks(trainer):
    """The logged streak of each rollout (logged with the first optimizer step of the rollout)."""
    key = "gspo/consecutive_nonfinite_reward_rollouts"
    return [e[key] for e in trainer.state.log_history if key in e]


def test_all_none_rewards_warn_and_train_on_as_in_trl(make_model, tokenizer, tmp_path, caplog):
    """TRL's test_warning_raised_all_rewards_none under GSPOTrainer: None means "does not apply"; a run whose
    rewards are all None warns (TRL's own warning) and trains to the end, far past the NaN limit."""
    trainer = tiny_trainer(
        make_model, tokenizer, tmp_path, always_none, max_steps=12, max_consecutive_nonfinite_reward_rollouts=1
    )
    with caplog.at_level("WARNING", logger="trl.trainer.grpo_trainer"):
        trainer.train()
    assert "All reward functions returned None for the following kwargs:" in caplog.text
    assert trainer.state.global_step == 12  # 3 rollouts of 4 optimizer steps
    assert streaks(trainer) == [0.0] * 3


def test_one_rollout_without_finite_reward_trains_on(make_model, tokenizer, tmp_path):
    """NaN everywhere in the first rollout only (a transient bug): it trains on with zero advantages, the streak
    metric shows it, and the next rollout's finite rewards reset it."""
    calls = []

    def nan_at_first(completions, **kwargs):
        calls.append(len(completions))
        return (
            [math.nan] * len(completions)
            if len(calls) == 1
            else [float(len(c[-1]["content"]) % 4) for c in completions]
        )

    trainer = tiny_trainer(
        make_model, tokenizer, tmp_path, nan_at_first, max_steps=8, max_consecutive_nonfinite_reward_rollouts=2
    )
    trainer.train()
    assert trainer.state.global_step == 8 and len(calls) == 2
    assert streaks(trainer) == [1.0, 0.0]


def test_consecutive_rollouts_without_finite_reward_stop_naming_the_field_and_function(
    make_model, tokenizer, tmp_path
):
    trainer = tiny_trainer(
        make_model,
        tokenizer,
        tmp_path,
        [all_nan, always_none],
        max_steps=40,
        max_consecutive_nonfinite_reward_rollouts=3,
    )
    with pytest.raises(ValueError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "3 consecutive rollouts" in message
    assert "max_consecutive_nonfinite_reward_rollouts=3" in message
    assert "NaN or inf came from 'all_nan'" in message and "'always_none'" in message
    assert trainer.state.global_step == 8  # two rollouts trained on, the third stopped before its first step


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_nonfinite_rollout_limit_is_validated(tmp_path, bad):
    from trl_gspo import GSPOConfig

    with pytest.raises(
        ValueError, match=rf"max_consecutive_nonfinite_reward_rollouts={bad!r} must be an integer >= 1"
    ):
        GSPOConfig(output_dir=str(tmp_path), use_cpu=True, max_consecutive_nonfinite_reward_rollouts=bad)


def test_math_accuracy_without_math_verify_is_refused_at_trainer_construction(
    monkeypatch, make_model, tokenizer, tmp_path
):
    """From Python too: GSPOTrainer(reward_funcs=math_accuracy) names the missing extra before any step runs."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError, match=r"'trl-gspo\[math\]'"):
        tiny_trainer(make_model, tokenizer, tmp_path, [math_accuracy])


@pytest.mark.parametrize("returned", [None, 1.0, "abc"])
def test_a_reward_returning_no_list_is_named_through_the_python_api(make_model, tokenizer, tmp_path, returned):
    def not_a_list(completions, **kwargs):
        return returned

    trainer = tiny_trainer(make_model, tokenizer, tmp_path, [not_a_list], max_steps=1)
    with pytest.raises(TypeError, match=r"reward function 'not_a_list' returned .*expected a list with one entry"):
        trainer.train()
