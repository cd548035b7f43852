"""Small verifiable tasks generated in code, and a supervised warm start, for the CPU demo.

Every task is a string transformation with one exact answer, so a reward needs no model and no label
noise: `exact_match` (trl_gspo.rewards) scores a completion 1.0 if it equals the answer.

- ``sort_digits``: ``"sort 52819"`` -> ``"12589"`` (five digits, repeats allowed)
- ``reverse``: ``"reverse bdzqa"`` -> ``"aqzdb"`` (five lowercase letters)
- ``add``: ``"47+85="`` -> ``"132"`` (two 2-digit numbers)
- ``place``: ``"set 3 x abcde"`` -> ``"abxde"`` (copy five letters, put a given letter at a given position): a
  local-precision task. Its span reward ``mismatch_spans`` (``Task.span_reward``) marks the wrong characters, so
  GSPO-token can put the blame on them (trl_gspo.token_rewards).
- ``swap``: ``"swap 2 abcde"`` -> ``"acbde"`` (copy five letters, exchanging those at positions k and k+1): one
  local decision decides the answer. Its span reward ``first_mismatch_span`` marks only the first wrong character,
  so its sum says no more than exact match: groups whose completions are all wrong still differ in where they went
  wrong, a signal only per-token credit can use.

The span rewards (`SPAN_REWARDS`, by name) return spans for GSPO-token (trl_gspo.token_rewards).

Rows are conversational, in TRL's format: ``{"prompt": [{"role": "user", "content": ...}], "answer": ...}``.
``make_splits`` draws train/dev/test splits deterministically from a seed; no prompt appears in two splits.

A randomly initialised model never produces a right answer, so a reward alone gives no signal (every
completion of a group scores 0, every advantage is 0). ``warm_start`` therefore runs plain supervised steps
until greedy dev accuracy reaches a modest target (0.3 by default), and ``prepare_model`` builds, warm-starts
and caches that model once per settings, so later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trl_gspo.rewards import Completion, completion_text, exact_match
from trl_gspo.token_rewards import token_level_reward

# Bump when a task's prompt format or a split's drawing changes: it is part of the cache key.
TASKS_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path(".cache") / "trl_gspo"
# The notes' measured shape (hidden 128, intermediate 512, 2 layers, 4 heads, tied embeddings, ~0.5M parameters) as
# a Qwen3 model: a saved qwen2 folder reloads the char tokenizer lossily (see tiny.check_char_tokenizer_reloads).
DEFAULT_MODEL_KWARGS = {
    "model_type": "qwen3",
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_layers": 2,
    "num_heads": 4,
    "tie_word_embeddings": True,
}
DEFAULT_SPLIT_SIZES = {"train": 4000, "dev": 256, "test": 512}


@dataclass(frozen=True)
class Task:
    """A generated task: ``sample`` draws operands, ``prompt`` formats them, ``solve`` computes the answer.

    ``parse`` inverts ``prompt`` (used by ``check`` to recompute the answer from the prompt text alone).
    """

    name: str
    description: str
    sample: Callable[[random.Random], tuple]
    prompt: Callable[[tuple], str]
    parse: Callable[[str], tuple]
    solve: Callable[[tuple], str]
    max_answer_length: int
    # name in SPAN_REWARDS of a span reward marking the wrong part of a completion, if any
    span_reward: str | None = None

    def row(self, operands: tuple) -> dict:
        return {"prompt": [{"role": "user", "content": self.prompt(operands)}], "answer": self.solve(operands)}

    def check(self, prompt: str | list[dict], completion: str) -> bool:
        """True iff `completion` (stripped) is the exact answer to `prompt`, recomputed from the prompt text."""
        return completion.strip() == self.solve(self.parse(prompt_text(prompt)))


def _sort_parse(text: str) -> tuple:
    head, digits = text.split(" ")
    if head != "sort" or len(digits) != 5 or not digits.isdigit():
        raise ValueError(f"not a sort_digits prompt: {text!r}")
    return tuple(digits)


def _reverse_parse(text: str) -> tuple:
    head, letters = text.split(" ")
    if head != "reverse" or len(letters) != 5 or not letters.isalpha():
        raise ValueError(f"not a reverse prompt: {text!r}")
    return tuple(letters)


def _reverse_mixed_parse(text: str) -> tuple:
    head, letters = text.split(" ")
    if head != "reverse" or not 2 <= len(letters) <= 7 or not letters.isalpha():
        raise ValueError(f"not a reverse_mixed prompt: {text!r}")
    return tuple(letters)


def _add_parse(text: str) -> tuple:
    if not text.endswith("=") or text.count("+") != 1:
        raise ValueError(f"not an add prompt: {text!r}")
    a, b = text[:-1].split("+")
    return int(a), int(b)


def _place_parse(text: str) -> tuple:
    head, position, letter, word = text.split(" ")
    if head != "set" or position not in "12345" or len(position) != 1 or len(letter) != 1 or len(word) != 5:
        raise ValueError(f"not a place prompt: {text!r}")
    return int(position), letter, word


def _swap_parse(text: str) -> tuple:
    head, position, word = text.split(" ")
    if head != "swap" or len(position) != 1 or position not in "1234" or len(word) != 5 or not word.isalpha():
        raise ValueError(f"not a swap prompt: {text!r}")
    return int(position), word


def _swap_solve(operands: tuple) -> str:
    position, word = operands
    k = position - 1
    return word[:k] + word[k + 1] + word[k] + word[k + 2 :]


def _place_solve(operands: tuple) -> str:
    position, letter, word = operands
    return word[: position - 1] + letter + word[position:]


@token_level_reward
def mismatch_spans(completions: list[Completion], answer: list[Any], **kwargs) -> list[list[tuple] | float]:
    """Span reward marking the wrong characters of a completion, position by position against ``answer``.

    Compares the completion text with ``str(answer)`` character by character (no stripping: a leading space shifts
    every position and is wrong). Each wrong character gets a span ``(k, k + 1, -1.0)``; surplus characters beyond
    the answer's length one span ``(len(answer), len(text), -1.0)``; a completion that stops short gets -1 more on
    its last character. A right answer returns ``[]`` (no penalty, sum 0); an empty completion returns the number
    -1.0 (no character to mark). Needs importance_sampling_level="sequence_token"; its sum, the negated number of
    mistakes, is its sequence reward.
    """
    rewards: list[list[tuple] | float] = []
    for completion, gold in zip(completions, answer, strict=True):
        text, gold = completion_text(completion), str(gold)
        if not text:
            rewards.append(-1.0)
            continue
        penalties = [-1.0 if k >= len(gold) or text[k] != gold[k] else 0.0 for k in range(min(len(text), len(gold)))]
        if len(text) < len(gold):
            penalties[-1] -= 1.0
        spans = [(k, k + 1, p) for k, p in enumerate(penalties) if p]
        if len(text) > len(gold):
            spans.append((len(gold), len(text), -1.0))
        rewards.append(spans)
    return rewards


@token_level_reward
def first_mismatch_span(completions: list[Completion], answer: list[Any], **kwargs) -> list[list[tuple] | float]:
    """Span reward marking the first character where a completion departs from ``answer``, -1 on it.

    Compared without stripping, position by position: the first wrong character; else, for a completion longer
    than the answer, its first surplus character; else, for one that stops short, its last character. A right
    answer returns ``[]`` and an empty completion the number -1.0. The sum is -1 for every wrong completion and 0
    for a right one (``exact_match - 1`` when the completion has no surrounding whitespace), so the sequence reward
    GSPO-token sees with ``exact_match`` is an affine function of exact match alone and group-normalises to the
    same sequence advantage: the span only says where the decisive mistake is. Needs
    importance_sampling_level="sequence_token".
    """
    rewards: list[list[tuple] | float] = []
    for completion, gold in zip(completions, answer, strict=True):
        text, gold = completion_text(completion), str(gold)
        if not text:
            rewards.append(-1.0)
            continue
        first = next((k for k, (a, b) in enumerate(zip(text, gold)) if a != b), None)
        if first is None and len(text) != len(gold):
            first = len(gold) if len(text) > len(gold) else len(text) - 1
        rewards.append([] if first is None else [(first, first + 1, -1.0)])
    return rewards


# The span rewards of the tasks (GSPO-token, trl_gspo.token_rewards), by name
SPAN_REWARDS = {func.__name__: func for func in (mismatch_spans, first_mismatch_span)}


TASKS: dict[str, Task] = {
    "sort_digits": Task(
        name="sort_digits",
        description="sort 5 digits in ascending order",
        sample=lambda rng: tuple(rng.choice(string.digits) for _ in range(5)),
        prompt=lambda ops: "sort " + "".join(ops),
        parse=_sort_parse,
        solve=lambda ops: "".join(sorted(ops)),
        max_answer_length=5,
    ),
    "reverse": Task(
        name="reverse",
        description="reverse 5 lowercase letters",
        sample=lambda rng: tuple(rng.choice(string.ascii_lowercase) for _ in range(5)),
        prompt=lambda ops: "reverse " + "".join(ops),
        parse=_reverse_parse,
        solve=lambda ops: "".join(reversed(ops)),
        max_answer_length=5,
    ),
    "reverse_mixed": Task(
        name="reverse_mixed",
        description="reverse 2 to 7 lowercase letters (answers of every length in between: a length-bias probe)",
        sample=lambda rng: tuple(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))),
        prompt=lambda ops: "reverse " + "".join(ops),
        parse=_reverse_mixed_parse,
        solve=lambda ops: "".join(reversed(ops)),
        max_answer_length=7,
    ),
    "add": Task(
        name="add",
        description="add two 2-digit numbers",
        sample=lambda rng: (rng.randint(10, 99), rng.randint(10, 99)),
        prompt=lambda ops: f"{ops[0]}+{ops[1]}=",
        parse=_add_parse,
        solve=lambda ops: str(ops[0] + ops[1]),
        max_answer_length=3,
    ),
    "place": Task(
        name="place",
        description="copy 5 letters with a given letter put at a given position",
        sample=lambda rng: (
            rng.randint(1, 5),
            rng.choice(string.ascii_lowercase),
            "".join(rng.choice(string.ascii_lowercase) for _ in range(5)),
        ),
        prompt=lambda ops: f"set {ops[0]} {ops[1]} {ops[2]}",
        parse=_place_parse,
        solve=_place_solve,
        max_answer_length=5,
        span_reward="mismatch_spans",
    ),
    "swap": Task(
        name="swap",
        description="copy 5 letters with the letters at positions k and k+1 exchanged",
        sample=lambda rng: (rng.randint(1, 4), "".join(rng.choice(string.ascii_lowercase) for _ in range(5))),
        prompt=lambda ops: f"swap {ops[0]} {ops[1]}",
        parse=_swap_parse,
        solve=_swap_solve,
        max_answer_length=5,
        span_reward="first_mismatch_span",
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def prompt_text(prompt: str | list[dict]) -> str:
    """The user text of a row's prompt (a plain string, or the last message of a conversation)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def make_splits(task: str | Task, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Draw ``sizes`` (default DEFAULT_SPLIT_SIZES) distinct problems with ``random.Random(seed)`` and deal them out.

    The same (task, seed, sizes) always gives the same rows; a prompt never appears twice, so dev and test are
    disjoint from train and from each other. Held-out splits are drawn first, so their content does not depend on
    the train size.
    """
    task = get_task(task) if isinstance(task, str) else task
    sizes = dict(DEFAULT_SPLIT_SIZES if sizes is None else sizes)
    # Held-out splits first: the same seed gives the same test set whatever the train size.
    order = sorted(sizes, key=lambda name: (name == "train", name))
    rng = random.Random(f"{task.name}-{seed}")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for name in order:
        rows = []
        attempts = 0
        while len(rows) < sizes[name]:
            attempts += 1
            if attempts > 100 * sum(sizes.values()) + 1000:
                raise ValueError(f"task {task.name!r} has too few distinct problems for splits of sizes {sizes}")
            operands = task.sample(rng)
            text = task.prompt(operands)
            if text in seen:
                continue
            seen.add(text)
            rows.append(task.row(operands))
        splits[name] = rows
    return {name: splits[name] for name in sizes}


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write one JSON object per line; create the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_splits(splits: dict[str, list[dict]], folder: str | os.PathLike) -> dict[str, Path]:
    """Write each split to ``folder/<split>.jsonl``; returns split name -> path."""
    return {name: write_jsonl(rows, Path(folder) / f"{name}.jsonl") for name, rows in splits.items()}


# --- evaluation and supervised warm start ----------------------------------------------------------------------------


def _encode_prompts(tokenizer, rows: Sequence[dict]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True) for row in rows]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@torch.no_grad()
def greedy_completions(model, tokenizer, rows: Sequence[dict], batch_size: int = 256, max_new_tokens: int = 8):
    """Greedy completions (text, special tokens dropped) of each row's prompt under the chat template."""
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    device = next(model.parameters()).device
    outputs = []
    try:
        for start in range(0, len(rows), batch_size):
            encoded = _encode_prompts(tokenizer, rows[start : start + batch_size])
            width = max(len(ids) for ids in encoded)
            # left padding, as for generation
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in encoded])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
            )
            outputs.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs


def greedy_accuracy(model, tokenizer, rows: Sequence[dict], batch_size: int = 256, max_new_tokens: int = 8) -> float:
    """Fraction of rows whose greedy completion scores 1 under `exact_match`, the reward the demo trains on."""
    if not rows:
        raise ValueError("greedy_accuracy: no rows to evaluate")
    completions = greedy_completions(model, tokenizer, rows, batch_size, max_new_tokens)
    return completion_accuracy(completions, rows)


def completion_accuracy(completions: Sequence[str], rows: Sequence[dict]) -> float:
    """Fraction of `completions` that score 1 under `exact_match` against their row's answer."""
    return sum(exact_match(completions, answer=[row["answer"] for row in rows])) / len(rows)


def length_gap(completions: Sequence[str], rows: Sequence[dict]) -> float:
    """Mean of (characters of the stripped completion - characters of the answer): < 0 when answers come out short."""
    return sum(len(text.strip()) - len(row["answer"]) for text, row in zip(completions, rows, strict=True)) / len(rows)


class WarmStartError(RuntimeError):
    """Supervised warm start did not reach the target dev accuracy within its step budget."""


def _supervised_batch(tokenizer, rows: Sequence[dict]):
    """input_ids, attention_mask, labels (-100 except on the answer tokens and the closing eos), right-padded."""
    prompts = _encode_prompts(tokenizer, rows)
    answers = [
        tokenizer(str(row["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for row in rows
    ]
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    input_ids, attention_mask, labels = [], [], []
    for p, a in zip(prompts, answers):
        pad = width - len(p) - len(a)
        input_ids.append(p + a + [tokenizer.pad_token_id] * pad)
        attention_mask.append([1] * (len(p) + len(a)) + [0] * pad)
        labels.append([-100] * len(p) + a + [-100] * pad)
    return torch.tensor(input_ids), torch.tensor(attention_mask), torch.tensor(labels)


def warm_start(
    model,
    tokenizer,
    task_rows: Sequence[dict],
    dev_rows: Sequence[dict],
    target_accuracy: float = 0.3,
    learning_rate: float = 1e-3,
    batch_size: int = 64,
    eval_every: int = 5,
    max_steps: int = 2000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Supervised steps on ``task_rows`` until greedy accuracy on ``dev_rows`` reaches ``target_accuracy``.

    AdamW(learning_rate), batches of ``batch_size`` rows drawn without replacement (reshuffled each epoch), cross
    entropy on the answer tokens and the eos that closes them (the prompt is masked out). Greedy dev accuracy is
    checked every ``eval_every`` steps and training stops at the first check at or above the target: accuracy
    jumps steeply, so a fixed step count would overshoot. Raises WarmStartError after ``max_steps``.

    Returns ``{"steps", "dev_accuracy", "seconds", "history": [(step, dev_accuracy), ...]}``.
    """
    if not task_rows or not dev_rows:
        raise ValueError("warm_start needs non-empty task_rows and dev_rows")
    max_new_tokens = max(len(str(row["answer"])) for row in dev_rows) + 2
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order: list[int] = []
    history = []
    model.train()
    for step in range(1, max_steps + 1):
        if len(order) < batch_size:
            fresh = list(range(len(task_rows)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [task_rows[i] for i in order[:batch_size]]
        del order[:batch_size]
        input_ids, attention_mask, labels = _supervised_batch(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % eval_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, dev_rows, max_new_tokens=max_new_tokens)
            history.append((step, accuracy))
            if log is not None:
                log(f"warm start step {step}: loss {loss.item():.3f}, dev greedy accuracy {accuracy:.3f}")
            if accuracy >= target_accuracy:
                model.eval()
                return {
                    "steps": step,
                    "dev_accuracy": accuracy,
                    "seconds": time.perf_counter() - start,
                    "history": history,
                }
    best = max((acc for _, acc in history), default=float("nan"))
    raise WarmStartError(
        f"warm start did not reach dev greedy accuracy {target_accuracy} in {max_steps} supervised steps "
        f"(best {best:.3f}, lr {learning_rate}, batch {batch_size}); raise max_steps, the learning rate or the model "
        "size, or lower target_accuracy."
    )


def settings_hash(settings: dict) -> str:
    """A short stable hash of JSON-serialisable settings (the cache key)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def prepare_model(
    task: str,
    seed: int = 0,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    split_sizes: dict[str, int] | None = None,
    model_kwargs: dict | None = None,
    target_accuracy: float = 0.3,
    warm_start_kwargs: dict | None = None,
    log: Callable[[str], None] | None = print,
) -> tuple[Path, dict]:
    """Build a tiny char-level model, warm-start it on ``task`` and save it under ``cache_dir``; reuse it if there.

    The folder is ``cache_dir/<task>-<hash of every setting>``: model and tokenizer (``from_pretrained``-loadable)
    and ``warm_start.json`` (settings and warm-start result), written last so a half-written folder is never
    reused. Returns (folder, warm-start info with ``"cached": bool``).
    """
    from .tiny import build_char_tokenizer, build_tiny_causal_lm, check_char_tokenizer_reloads

    task_obj = get_task(task)
    split_sizes = dict(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
    model_kwargs = {**DEFAULT_MODEL_KWARGS, **(model_kwargs or {})}
    warm_start_kwargs = dict(warm_start_kwargs or {})
    settings = {
        "task": task_obj.name,
        "format_version": TASKS_FORMAT_VERSION,
        "seed": seed,
        "split_sizes": split_sizes,
        "model": model_kwargs,
        "target_accuracy": target_accuracy,
        "warm_start": warm_start_kwargs,
    }
    folder = Path(cache_dir) / f"{task_obj.name}-{settings_hash(settings)}"
    marker = folder / "warm_start.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        info["cached"] = True
        if log is not None:
            log(f"reusing the warm-started model cached in {folder}")
        return folder, info

    splits = make_splits(task_obj, seed, split_sizes)
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, seed=seed, **model_kwargs)
    if log is not None:
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"warm-starting a {n_params / 1e6:.2f}M-parameter model on {task_obj.name} (target dev accuracy {target_accuracy})"
        )
    result = warm_start(
        model,
        tokenizer,
        splits["train"],
        splits["dev"],
        target_accuracy=target_accuracy,
        seed=seed,
        log=log,
        **warm_start_kwargs,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        row = splits["dev"][0]
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        check_char_tokenizer_reloads(staging, text + row["answer"])
        info = {"settings": settings, **result}
        (staging / "warm_start.json").write_text(json.dumps(info, indent=2))
        if marker.is_file():  # another process finished the same model meanwhile: keep theirs
            shutil.rmtree(staging)
        else:
            if folder.exists():  # a stale, unmarked folder from an interrupted run
                shutil.rmtree(folder)
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info["cached"] = False
    if log is not None:
        log(
            f"warm start reached dev accuracy {result['dev_accuracy']:.3f} in {result['steps']} steps "
            f"({result['seconds']:.1f} s); cached in {folder}"
        )
    return folder, info


# --- a tiny recipe's model and data, built when missing --------------------------------------------------------------


def ensure_task_assets(
    task: str,
    model_path: str | os.PathLike,
    data_path: str | os.PathLike,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> Path:
    """The model folder a tiny recipe trains: ``model_path`` if it exists, else the warm-started model that
    ``prepare_model`` finds (or builds, about a minute on a CPU) in ``model_path``'s parent folder. Writes the
    task's train split to ``data_path`` if that file is missing. Each fallback is reported through ``log``.

    The splits and the model use the same ``seed`` as ``scripts/demo.py``, so the demo's cache is reused.
    """
    data_path = Path(data_path)
    if not data_path.is_file():
        rows = make_splits(task, seed)["train"]
        staging = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
        write_jsonl(rows, staging)
        os.replace(staging, data_path)  # atomic: a concurrent reader never sees half a file
        if log is not None:
            log(f"dataset_name={str(data_path)!r} was missing: wrote the {task} train split ({len(rows)} rows) there")
    model_path = Path(model_path)
    if model_path.is_dir():
        return model_path
    folder, info = prepare_model(task, seed=seed, cache_dir=model_path.parent, log=log)
    if log is not None:
        how = "found it in the cache" if info["cached"] else "built it"
        log(f"model_name_or_path={str(model_path)!r} does not exist: {how} ({folder}, warm-started on {task})")
    return folder


# The tiny recipes' model_name_or_path is TINY_CACHE_DIR/<task>-warm-start: a name, not a folder. The warm-started
# model is built (or found) in its parent folder, and only for a path of that name.
TINY_CACHE_DIR = str(DEFAULT_CACHE_DIR)
# Their dataset_name is runs/tiny/<task>/data/train.jsonl; a missing data file is written only under this name.
TINY_DATA_FILE_NAME = "train.jsonl"


def tiny_warm_start_name(task: str) -> str:
    return f"{task}-warm-start"


def prepare_tiny_recipe(script_args, training_args, model_args, *, task: str) -> None:
    """The tiny recipes' `prepare` function (GSPOScriptArguments.prepare, with prepare_kwargs {task: ...}): point
    the run at the task's warm-started model and data, building them when missing (`ensure_task_assets`).

    A missing model is built only when model_name_or_path is named `<task>-warm-start` (the recipe's path, or one
    the user chose in that form), missing data is written only to a file named `train.jsonl`; any other missing
    path is an error. The command line calls this under
    `training_args.main_process_first`: with several processes the main one builds, the others find it built.
    """
    if task not in TASKS:
        raise ValueError(f"prepare_kwargs task={task!r} is not a task; expected one of {sorted(TASKS)}.")
    if not script_args.dataset_name or not model_args.model_name_or_path:
        raise ValueError(f"task {task!r} needs model_name_or_path and dataset_name: where to find or build them.")
    data_path = Path(script_args.dataset_name)
    if not data_path.is_file() and data_path.name != TINY_DATA_FILE_NAME:
        # a mistyped data file must not silently become the task's generated data
        raise FileNotFoundError(
            f"dataset_name={script_args.dataset_name!r}: no such file. For task {task!r} missing data is written only "
            f"to a file named {TINY_DATA_FILE_NAME!r} (the recipe's runs/tiny/{task}/data/{TINY_DATA_FILE_NAME}); "
            "give an existing data file or such a path."
        )
    model_path, warm_start_name = Path(model_args.model_name_or_path), tiny_warm_start_name(task)
    if not model_path.is_dir() and model_path.name != warm_start_name:
        # a mistyped path must not silently become a newly built model
        raise FileNotFoundError(
            f"model_name_or_path={model_args.model_name_or_path!r}: no such model folder. For task {task!r} a "
            f"missing model is built only at a path named {warm_start_name!r} (the recipe's "
            f"{TINY_CACHE_DIR}/{warm_start_name}); give an existing model folder or such a path."
        )
    rank = training_args.process_index

    def log(message: str) -> None:  # every rank says what it did: the main one built, the others found it
        print(f"[rank {rank}] {message}" if training_args.world_size > 1 else message, flush=True)

    model_args.model_name_or_path = str(
        ensure_task_assets(
            task, model_args.model_name_or_path, script_args.dataset_name, seed=training_args.seed, log=log
        )
    )


class HeldoutAccuracyCallback(TrainerCallback):
    """Every `every` optimizer steps (and before the first), log greedy exact-match accuracy on `rows`.

    The values go into `state.log_history` as `{"heldout_accuracy": ..., "heldout_length_gap": ..., "step": ...}`
    (`length_gap` of the same greedy completions), the form `Trainer.log` writes, so it is saved in trainer_state.json and drawn by trl_gspo.plotting; `history` keeps (step, accuracy)
    pairs. With `log`, each measurement is also reported as a line of text (with the latest mean rollout reward).
    """

    def __init__(self, tokenizer, rows, every: int, log: Callable[[str], None] | None = None):
        self.tokenizer, self.rows, self.every, self.log = tokenizer, list(rows), every, log
        self.history: list[tuple[int, float]] = []

    def _record(self, state, model):
        completions = greedy_completions(model, self.tokenizer, self.rows)
        accuracy = completion_accuracy(completions, self.rows)
        state.log_history.append(
            {
                "heldout_accuracy": accuracy,
                "heldout_length_gap": length_gap(completions, self.rows),
                "step": state.global_step,
            }
        )
        self.history.append((state.global_step, accuracy))
        if self.log is None:
            return
        reward = next((e["reward"] for e in reversed(state.log_history) if "reward" in e), None)
        reward_text = "" if reward is None else f", mean rollout reward {reward:.3f}"
        self.log(
            f"[held-out] step {state.global_step}/{state.max_steps}: greedy accuracy {accuracy:.3f} "
            f"on {len(self.rows)} test prompts{reward_text}"
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:  # not again when resuming
            self._record(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state, model)
