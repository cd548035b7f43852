"""Reward functions for GRPOTrainer / GSPOTrainer, and a registry that resolves them by name.

Every reward function follows TRL's calling convention: the trainer calls it with keyword arguments
``prompts=..., completions=..., completion_ids=...`` plus one list per dataset column (e.g. ``answer=[...]``), and it
returns one reward per completion. A ``None`` reward means "cannot score this sample": TRL turns it into NaN and leaves
it out of the group baseline. Completions are plain strings or conversational message lists; ``completion_text``
reads both. ``REWARD_FUNCS`` registers the reward functions by name; ``reward_output_kinds`` is the one check on a
call's outputs, GSPOTrainer's and ``wrap_reward_checked``'s.

Factories and the checked wrapper return instances of module-level classes rather than closures, so the resulting
reward functions can be pickled (TRL may send reward functions to a separate rollout process).
"""

from __future__ import annotations

import functools
import importlib
import numbers
import re
import reprlib
import threading
from collections.abc import Callable
from typing import Any

from trl.rewards import get_soft_overlong_punishment

Completion = str | list[dict[str, Any]]
RewardFunc = Callable[..., list[float | None]]

# Attribute a reward function carries to declare that it returns spans or per-token lists
# (trl_gspo.token_rewards.token_level_reward); GSPOTrainer then checks the level at construction.
TOKEN_LEVEL_ATTRIBUTE = "returns_token_rewards"
# Seconds math-verify may spend parsing or comparing one expression (only enforced in the main thread).
MATH_VERIFY_TIMEOUT_S = 5

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAG_FREE_TEXT = r"(?:(?!</?(?:think|answer)>).)*"
_THINK_ANSWER_FORMAT = re.compile(
    rf"\s*<think>{_TAG_FREE_TEXT}</think>\s*<answer>{_TAG_FREE_TEXT}</answer>\s*", re.DOTALL
)


def completion_text(completion: Completion | None) -> str:
    """Return the text of a completion: the string itself, or the content of the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    content = completion[-1].get("content")
    if isinstance(content, list):  # multimodal message: a list of typed parts
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content or ""


def check_reward_dependencies(reward_funcs) -> None:
    """Raise ImportError, naming the extra to install, for a reward function whose optional package is missing
    (today: math_accuracy without math-verify), at trainer construction rather than at the first step."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if any(getattr(func, "func", func) is math_accuracy for func in funcs):  # also wrapped in functools.partial
        _import_math_verify()


def _import_math_verify():
    """Import math-verify lazily (it is an optional extra) and return it with its timeout exception class."""
    try:
        import math_verify
        from math_verify.errors import TimeoutException
    except ImportError as error:
        raise ImportError(
            "math_accuracy needs the math-verify package, which is not installed: install the `math` extra with "
            "`pip install 'trl-gspo[math]'` (from a checkout: `pip install -e '.[math]'`)."
        ) from error
    return math_verify, TimeoutException


def _gold_latex(answer: Any) -> str:
    """Turn a gold answer ("42", "\\frac{3}{4}", "\\boxed{42}", "... #### 42") into text math-verify parses whole."""
    if answer is None:
        return ""
    text = str(answer).strip()
    if "####" in text:  # GSM8K: the final answer follows the last "####"
        text = text.rsplit("####", 1)[1].strip()
    if text and "$" not in text and "\\boxed" not in text:
        # Bare LaTeX is only parsed whole inside math delimiters: "2\sqrt{3}" alone would parse as 2.
        text = f"${text}$"
    return text


def _answer_region(text: str) -> str:
    """Return the content of the last <answer>...</answer> block if there is one, else the whole text."""
    answer_blocks = _ANSWER_BLOCK.findall(text)
    return answer_blocks[-1] if answer_blocks else text


def math_accuracy(completions: list[Completion], answer: list[Any], **kwargs) -> list[float | None]:
    """Score 1.0 if the completion's final answer equals the gold answer under math-verify, else 0.0.

    The completion's answer is taken from its last ``<answer>`` block if present, preferring ``\\boxed{...}`` and
    otherwise the final expression or number. Samples whose gold answer is missing or unparseable score ``None``.
    """
    math_verify, timeout_exception = _import_math_verify()
    # math-verify enforces timeouts with signal.alarm, which only works in the main thread; elsewhere use none
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    completion_extraction = [
        math_verify.LatexExtractionConfig(boxed_match_priority=0),
        math_verify.ExprExtractionConfig(),
    ]
    rewards: list[float | None] = []
    for completion, gold in zip(completions, answer, strict=True):
        try:
            # no_fallback: a gold answer that does not parse to an expression is skipped, not string-matched.
            gold_parsed = math_verify.parse(_gold_latex(gold), fallback_mode="no_fallback", parsing_timeout=timeout)
        except (Exception, timeout_exception):
            gold_parsed = []
        if not gold_parsed:
            rewards.append(None)
            continue
        text = _answer_region(completion_text(completion))
        try:
            predicted = math_verify.parse(text, extraction_config=completion_extraction, parsing_timeout=timeout)
            is_correct = bool(predicted) and math_verify.verify(gold_parsed, predicted, timeout_seconds=timeout)
        except (Exception, timeout_exception):
            is_correct = False
        rewards.append(1.0 if is_correct else 0.0)
    return rewards


def think_format(completions: list[Completion], **kwargs) -> list[float]:
    """Score 1.0 if the completion is ``<think>...</think>`` then ``<answer>...</answer>`` and nothing else, else 0.0."""
    return [1.0 if _THINK_ANSWER_FORMAT.fullmatch(completion_text(c)) else 0.0 for c in completions]


def exact_match(completions: list[Completion], answer: list[Any], **kwargs) -> list[float]:
    """Score 1.0 if the completion text, stripped of surrounding whitespace, equals ``str(answer).strip()``."""
    return [
        1.0 if completion_text(completion).strip() == str(gold).strip() else 0.0
        for completion, gold in zip(completions, answer, strict=True)
    ]


def soft_overlong_penalty(max_completion_length: int, cache_length: int) -> RewardFunc:
    """Build DAPO's soft overlong punishment (TRL's) for completions of length L tokens (from ``completion_ids``).

    The reward is 0 for ``L <= max_completion_length - cache_length``, falls linearly to -1 at
    ``L == max_completion_length``, and is -1 beyond.
    """
    for name, value in (("max_completion_length", max_completion_length), ("cache_length", cache_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cache_length >= max_completion_length:
        raise ValueError(
            f"cache_length ({cache_length}) must be smaller than max_completion_length ({max_completion_length})"
        )
    penalty = get_soft_overlong_punishment(max_completion_length, cache_length)  # picklable, as TRL builds it
    penalty.__name__ = "soft_overlong_penalty"  # the name its metrics are logged under
    return penalty


REWARD_FUNCS: dict[str, Callable[..., Any]] = {
    "math_accuracy": math_accuracy,
    "think_format": think_format,
    "soft_overlong_penalty": soft_overlong_penalty,
    "exact_match": exact_match,
}
# Registered names whose entry is a factory: it takes keyword arguments and returns the reward function.
REWARD_FACTORIES = frozenset({"soft_overlong_penalty"})


def split_import_path(path: str) -> tuple[str, str] | None:
    """(module, attribute) of ``package.module:attr`` or ``package.module.attr``; None for any other form."""
    module_name, _, attribute = path.rpartition(":") if ":" in path else path.rpartition(".")
    return (module_name, attribute) if module_name and attribute else None


def _import_dotted(path: str) -> Any:
    """Import ``package.module:attr`` or ``package.module.attr``, raising ValueError that names ``path`` on failure."""
    parts = split_import_path(path)
    if parts is None:
        raise ValueError(f"invalid reward import path {path!r}; use 'package.module:func' or 'package.module.func'")
    try:
        return getattr(importlib.import_module(parts[0]), parts[1])
    except Exception as error:
        raise ValueError(f"cannot import reward function {path!r}: {type(error).__name__}: {error}") from error


def get_reward_func(spec: str, **kwargs) -> RewardFunc:
    """Resolve a registered reward name or a dotted import path to a reward function.

    Registered factories (``REWARD_FACTORIES``) are called with ``kwargs``; ``kwargs`` for a registered plain function
    are a ValueError, and so is ``math_accuracy`` without math-verify. An imported object is called with ``kwargs``
    when they are given (it is taken to be a factory) and returned as is otherwise.
    """
    if spec in REWARD_FUNCS:
        target = REWARD_FUNCS[spec]
        is_factory = spec in REWARD_FACTORIES
        if kwargs and not is_factory:
            raise ValueError(f"reward function {spec!r} takes no arguments, got {sorted(kwargs)}")
        try:  # say so now, not at the first training step
            check_reward_dependencies([target])
        except ImportError as error:
            raise ValueError(str(error)) from error
    elif "." in spec or ":" in spec:
        target = _import_dotted(spec)
        is_factory = bool(kwargs)
    else:
        raise ValueError(
            f"unknown reward function {spec!r}; registered names: {', '.join(sorted(REWARD_FUNCS))}; "
            "or give a dotted import path such as 'my_package.my_module:my_reward' or 'my_package.my_module.my_reward'"
        )
    if is_factory:
        try:
            target = target(**kwargs)
        except TypeError as error:
            raise ValueError(f"reward factory {spec!r} rejected arguments {kwargs}: {error}") from error
    if not callable(target):
        raise ValueError(f"reward function {spec!r} resolved to a non-callable {type(target).__name__}")
    return target


def load_reward_funcs(specs: list[str | dict[str, Any]]) -> list[RewardFunc]:
    """Resolve each spec, a name/path string or a ``{"name": ..., "kwargs": {...}}`` dict, with ``get_reward_func``."""
    reward_funcs = []
    for spec in specs:
        if isinstance(spec, str):
            reward_funcs.append(get_reward_func(spec))
            continue
        if not isinstance(spec, dict) or "name" not in spec or not set(spec) <= {"name", "kwargs"}:
            raise ValueError(f"reward spec must be a string or a dict with keys 'name' and 'kwargs', got {spec!r}")
        reward_funcs.append(get_reward_func(spec["name"], **spec.get("kwargs", {})))
    return reward_funcs


class TokenRewardError(ValueError):
    """A reward function returned an entry that cannot be used; the message names it and the completion."""


def output_kind(value: Any, name: str, index: int) -> str:
    """'scalar' (a number or None), 'spans' or 'tokens' (trl_gspo.token_rewards); TokenRewardError for anything else.

    A list (or tuple) of numbers is a per-token list, a list of 3-item sequences a span list; an empty list is an
    empty span list. Tensors and numpy arrays count as the lists (or numbers) they hold.
    """
    if value is None or isinstance(value, numbers.Real):
        return "scalar"
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays
        value = value.tolist()
        if isinstance(value, numbers.Real):
            return "scalar"
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, numbers.Real) for v in value):
            return "tokens" if value else "spans"
        if all(isinstance(v, (list, tuple)) and len(v) == 3 for v in value):
            return "spans"
    raise TokenRewardError(
        f"reward function {name!r} returned {value!r} for completion {index}: expected a number, None, a list of "
        "(start_char, end_char, value) spans, or a list of per-token values."
    )


def reward_output_kinds(outputs: Any, name: str, num_completions: int) -> list[str]:
    """Check what reward function `name` returned for `num_completions` completions; each entry's `output_kind`.

    TypeError unless `outputs` is a list (or tensor, array) of entries, ValueError unless there is one entry per
    completion, TokenRewardError for an entry that is no number, None, span list or per-token list.
    """
    if outputs is None or isinstance(outputs, (str, bytes, dict, numbers.Number)) or not hasattr(outputs, "__len__"):
        raise TypeError(
            f"reward function {name!r} returned {type(outputs).__name__} {reprlib.repr(outputs)}: expected a list "
            f"with one entry per completion ({num_completions} completions here)."
        )
    if len(outputs) != num_completions:
        raise ValueError(f"reward function {name!r} returned {len(outputs)} rewards for {num_completions} completions")
    return [output_kind(value, name, index) for index, value in enumerate(outputs)]


def reward_name(func: Any) -> str:
    """The name TRL labels a reward function with in its logs."""
    return getattr(func, "__name__", type(func).__name__)


class _CheckedReward:
    """A reward function whose failures and malformed outputs raise errors naming it; see ``wrap_reward_checked``."""

    def __init__(self, func: RewardFunc):
        self.func = func
        self.__name__ = reward_name(func)
        functools.update_wrapper(self, func, updated=())
        setattr(self, TOKEN_LEVEL_ATTRIBUTE, getattr(func, TOKEN_LEVEL_ATTRIBUTE, False))  # the marker survives

    def __call__(self, *, completions: list[Completion], **kwargs) -> list[float | None]:
        try:
            rewards = self.func(completions=completions, **kwargs)
        except Exception as error:
            raise RuntimeError(f"reward function {self.__name__!r} raised {type(error).__name__}: {error}") from error
        reward_output_kinds(rewards, self.__name__, len(completions))
        return rewards


def wrap_reward_checked(func: RewardFunc) -> RewardFunc:
    """Wrap a reward function so that exceptions become RuntimeErrors and outputs that fail ``reward_output_kinds``
    errors naming it. The contents of span and per-token lists are left to GSPOTrainer, which knows the tokens, and
    so are NaN and inf: one bad rollout must not end a long run (docs/REWARDS.md). Keeps the function's name."""
    return _CheckedReward(func)
