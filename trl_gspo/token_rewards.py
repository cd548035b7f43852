"""Token and span rewards for GSPO-token, and the checks on every reward a reward function returns.

docs/REWARDS.md is the user's guide: what a reward function may return per completion (a number or ``None`` as in
TRL, a span list ``[(start_char, end_char, value), ...]`` over the completion's text, or a per-token list with one
value per generated token, the closing eos included), how NaN and inf are handled, and the advantage formula. The
precise rules:

- Spans must lie inside the text (``0 <= start_char < end_char <= len(text)``), must not overlap each other (touching
  is fine), and their values must be finite; an empty list means "no token-level detail".
- Spans become token values through the tokenizer's character offsets (`token_char_offsets`). A token whose character
  range ``[a, b)`` intersects a span's (``a < end_char`` and ``start_char < b``) carries the span's whole value; a
  token touching two adjacent spans carries the sum of both; tokens without characters (eos, other special tokens)
  carry none. A token's range holds every character it carries a byte of, however the completion was tokenised.
- ``r^k_it`` is the value of token t of completion i under reward function k (0 where k returned a number or ``None``
  for completion i); the sequence reward TRL sees for a token-level output is its sum. With ``w_k`` the trainer's
  ``reward_weights`` and ``lambda`` ``GSPOConfig.token_advantage_weight``:

      r_it  = sum_k w_k r^k_it
      A_it  = A_i + lambda * (r_it - mu_g) / (sigma_g + 1e-4)

  ``mu_g`` and ``sigma_g`` are the mean and the unbiased standard deviation of ``r_it`` over every loss token
  (completion mask times tool mask) of the prompt's group, unscorable completions (no finite reward; TRL gives them
  advantage 0) left out and given no token component. A group whose tokens all carry the same value gets exactly 0.
  A subclass of GSPOTrainer may form the component otherwise by overriding `GSPOTrainer.token_advantage_component`
  (gspo_examples.token_advantages compares some).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers.utils import logging
from trl.trainer.utils import is_async_callable

from .config import GSPO_TOKEN_LEVEL
from .metrics import CONSECUTIVE_NONFINITE_REWARD_ROLLOUTS, TOKEN_REWARD_COMPONENT_ABS_MEAN
from .rewards import (
    TOKEN_LEVEL_ATTRIBUTE,
    TokenRewardError,
    check_reward_dependencies,
    completion_text,
    output_kind,
    reward_name,
    reward_output_kinds,
)
from .trl_api import loss_mask

logger = logging.get_logger(__name__)

# Added to the group standard deviation, as TRL does for the sequence advantage.
TOKEN_STD_EPS = 1e-4
# What decoders emit for the bytes of a character cut short at the end of a token prefix.
REPLACEMENT_CHARACTER = "\ufffd"


def token_level_reward(func: Callable) -> Callable:
    """Mark `func` as returning span lists or per-token lists (see the module docstring); returns `func`.

    Marked functions are refused at trainer construction unless importance_sampling_level="sequence_token".
    """
    setattr(func, TOKEN_LEVEL_ATTRIBUTE, True)
    return func


def check_token_reward_level(reward_funcs: Any, importance_sampling_level: str) -> None:
    """Raise TokenRewardError if a marked token-level reward function meets a level other than GSPO-token."""
    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    for func in funcs:
        if getattr(func, TOKEN_LEVEL_ATTRIBUTE, False) and importance_sampling_level != GSPO_TOKEN_LEVEL:
            raise TokenRewardError(token_level_mismatch_message(reward_name(func), importance_sampling_level))


def token_level_mismatch_message(name: str, importance_sampling_level: str) -> str:
    return (
        f"reward function {name!r} returns token-level rewards (spans or per-token lists), which need per-token "
        f"advantages: set importance_sampling_level='sequence_token' (GSPO-token), not "
        f"{importance_sampling_level!r}, or return one number per completion."
    )


def token_char_offsets(tokenizer, completion_ids: Sequence[int], text: str) -> list[tuple[int, int]]:
    """Character range [start, end) of each completion token inside `text`, its decoded completion.

    A range holds every character the token carries at least one byte of, so tokens that split a multi-byte
    character between them share it (their ranges overlap by that character). Special tokens such as eos get an
    empty range.

    First the fast tokenizer's ``offset_mapping`` of `text`, used when re-encoding `text` gives back the completion's
    tokens and the offsets tile the text (every character in some token's range: not so with ``trim_offsets``,
    which leaves the spaces out). Otherwise, e.g. when the sampled tokenization differs from the canonical one, the
    ranges come from decoding growing prefixes of the completion. Raises ValueError if neither reproduces `text`.
    """
    ids = [int(i) for i in completion_ids]
    special = set(getattr(tokenizer, "all_special_ids", []))
    kept = [i for i in ids if i not in special]
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        encoded = None
    if (
        encoded is not None
        and list(encoded["input_ids"]) == kept
        and _offsets_tile(encoded["offset_mapping"], len(text))
    ):
        mapping = iter(encoded["offset_mapping"])
        offsets, position = [], 0
        for token_id in ids:
            if token_id in special:
                offsets.append((position, position))
            else:
                start, end = next(mapping)
                offsets.append((start, end))
                position = end
        return offsets
    # complete: characters fully decoded so far; partial: the next one has some of its bytes decoded already, and
    # the token that follows carries more of them.
    offsets, complete, partial, previous = [], 0, False, ""
    for k, token_id in enumerate(ids, start=1):
        if token_id in special:
            offsets.append((complete, complete))
            continue
        start = complete
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if prefix == previous and prefix.endswith(REPLACEMENT_CHARACTER) and not partial:
            start -= 1  # more bytes of an invalid sequence the text ends in (a character cut at the length limit)
        elif text.startswith(prefix):
            complete, partial = max(complete, len(prefix)), False
        elif prefix.endswith(REPLACEMENT_CHARACTER):  # the prefix stops inside a character
            whole = prefix.rstrip(REPLACEMENT_CHARACTER)
            # ByteLevel decodes the complete characters, then one U+FFFD: this token may have finished some
            # characters before starting the cut one. ByteFallback turns every byte token of the run into U+FFFD,
            # but each of its tokens is a single byte or whole characters: the complete ones are known already.
            if len(whole) >= complete and text.startswith(whole):
                complete = len(whole)
            partial = True
        # otherwise the decoded prefix does not match the text yet: wait for the tokens that make it match
        offsets.append((start, max(start, complete + partial)))
        previous = prefix
    if complete != len(text) or partial:
        raise ValueError(
            f"cannot map the completion's {len(ids)} tokens onto its text {text!r}: decoding them gives "
            f"{tokenizer.decode(ids, skip_special_tokens=True)!r}."
        )
    return offsets


def _offsets_tile(offsets: Sequence[Sequence[int]], text_length: int) -> bool:
    """Whether non-empty ranges cover [0, text_length) in order, each starting at or before the previous end."""
    position = 0
    for start, end in offsets:
        if not start <= position <= end or start == end:
            return False
        position = end
    return position == text_length


def spans_to_token_values(
    spans: Sequence[Sequence[Any]], offsets: Sequence[tuple[int, int]], text_length: int, name: str, index: int
) -> list[float]:
    """Token values from character spans under the overlap rule (module docstring); validates the spans."""
    where = f"reward function {name!r}, completion {index}:"
    checked = []
    for span in spans:
        start, end, value = span
        if not (isinstance(start, numbers.Integral) and isinstance(end, numbers.Integral)):
            raise TokenRewardError(f"{where} span {tuple(span)!r} needs integer character positions.")
        if not 0 <= start < end <= text_length:
            raise TokenRewardError(
                f"{where} span {tuple(span)!r} lies outside the text of {text_length} characters (need 0 <= "
                f"start_char < end_char <= {text_length})."
            )
        if not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise TokenRewardError(f"{where} span {tuple(span)!r} has a non-finite value.")
        checked.append((int(start), int(end), float(value)))
    checked.sort()
    for (s0, e0, _), (s1, e1, _) in zip(checked, checked[1:]):
        if s1 < e0:
            raise TokenRewardError(
                f"{where} spans [{s0}, {e0}) and [{s1}, {e1}) overlap; spans must be disjoint (adjacent is fine)."
            )
    values = [0.0] * len(offsets)
    for start, end, value in checked:
        for t, (a, b) in enumerate(offsets):
            if a < b and a < end and start < b:  # tokens without characters carry nothing
                values[t] += value
    return values


def check_token_values(values: Sequence[Any], num_tokens: int, name: str, index: int) -> list[float]:
    """The per-token list as floats; TokenRewardError for a wrong length or a non-finite value."""
    where = f"reward function {name!r}, completion {index}:"
    if len(values) != num_tokens:
        raise TokenRewardError(
            f"{where} {len(values)} per-token values for a completion of {num_tokens} tokens (eos included)."
        )
    floats = [float(v) for v in values]
    bad = next((t for t, v in enumerate(floats) if not math.isfinite(v)), None)
    if bad is not None:
        raise TokenRewardError(f"{where} per-token value {floats[bad]} at token {bad} is not finite.")
    return floats


def check_groups(rows: int, num_generations: int) -> None:
    if rows % num_generations:
        raise ValueError(f"token advantage: {rows} rows are not a whole number of groups of {num_generations}")


def masked_spread_positive(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Whether the masked values along `dim` differ (max > min; False with no masked value), keepdim."""
    masked_max = torch.where(mask.bool(), values, torch.full_like(values, -math.inf)).amax(dim, keepdim=True)
    masked_min = torch.where(mask.bool(), values, torch.full_like(values, math.inf)).amin(dim, keepdim=True)
    return masked_max - masked_min > 0


def group_stats(
    values: torch.Tensor, mask: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, 1) mu_g, 1 / (sigma_g + eps), and whether the group's masked values are constant (or fewer than two).

    values, mask: (groups, G * T) float64, one group per row; sigma_g the unbiased std of the masked values.
    """
    count = mask.sum(-1, keepdim=True)
    mean = (values * mask).sum(-1, keepdim=True) / count.clamp(min=1.0)
    std = ((((values - mean) * mask) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1.0)).sqrt()
    constant = (count < 2) | ~masked_spread_positive(values, mask, -1)
    return mean, 1.0 / (std + eps), constant


def group_centred_component(
    token_rewards: torch.Tensor, mask: torch.Tensor, num_generations: int, eps: float = TOKEN_STD_EPS
) -> torch.Tensor:
    """(N, T) "group_centred" component (r_it - mu_g) / (sigma_g + eps), 0 off the mask.

    Args:
        token_rewards: (N, T) r_it, rows grouped by prompt in consecutive blocks of `num_generations` (TRL's order).
        mask: (N, T) 1 on the loss tokens.
        num_generations: G, the group size.

    mu_g and sigma_g (unbiased) are taken over the masked tokens of group g; a group with fewer than two masked
    tokens, or whose tokens all carry the same value, gets exactly 0. Every unmarked token (r_it = 0, the eos
    included) gets -mu_g / (sigma_g + eps): positive whenever the group's marks are negative on average.
    """
    rows, width = token_rewards.shape
    check_groups(rows, num_generations)
    r = token_rewards.double().reshape(-1, num_generations * width)
    m = mask.double().reshape(-1, num_generations * width)
    mean, inverse_scale, constant = group_stats(r, m, eps)
    component = torch.where(constant, torch.zeros_like(r), (r - mean) * m * inverse_scale)
    return component.reshape(rows, width).to(token_rewards.dtype)


class TokenRewardCollector:
    """Adapts reward functions for one scoring call: token-level outputs are kept here, TRL gets numbers.

    `wrap` returns a callable with the reward function's name and calling convention (async stays async). The
    wrapped call validates every entry (see the module docstring), stores the per-token values of token-level
    entries, hands TRL their sum, turns NaN and +-inf into NaN (TRL's "cannot score") and counts them for the
    trainer's warning.

    Attributes after the call:
        token_values: {function index: [per-token values or None, one per completion]}, token-level functions only.
        non_finite: {function name: (number of NaN, number of +-inf, number of completions)}.
    """

    def __init__(self, tokenizer, completion_ids: Sequence[Sequence[int]], completions: Sequence[Any], level: str):
        self.tokenizer = tokenizer
        self.completion_ids = completion_ids
        self.texts = [completion_text(c) for c in completions]
        self.level = level
        self.token_values: dict[int, list[list[float] | None]] = {}
        self.non_finite: dict[str, tuple[int, int, int]] = {}
        self._offsets: dict[int, list[tuple[int, int]]] = {}

    def offsets(self, index: int) -> list[tuple[int, int]]:
        if index not in self._offsets:
            self._offsets[index] = token_char_offsets(self.tokenizer, self.completion_ids[index], self.texts[index])
        return self._offsets[index]

    def convert(self, func_index: int, name: str, outputs: Sequence[Any]) -> list[Any]:
        """Validate one function's outputs; return what TRL expects (numbers or None), keep the token values."""
        kinds = reward_output_kinds(outputs, name, len(self.texts))
        scalars, token_values = [], []
        nan_count = inf_count = 0
        for index, (value, kind) in enumerate(zip(outputs, kinds)):
            if kind == "scalar":
                value = None if value is None else float(value)  # also unwraps 0-d tensors and numpy scalars
                if value is not None and math.isnan(value):
                    nan_count += 1
                elif value is not None and math.isinf(value):
                    inf_count += 1
                    value = float("nan")
                scalars.append(value)
                token_values.append(None)
                continue
            if self.level != GSPO_TOKEN_LEVEL:
                raise TokenRewardError(
                    token_level_mismatch_message(name, self.level) + f" (first seen at completion {index})"
                )
            if hasattr(value, "tolist"):  # torch tensors, numpy arrays
                value = value.tolist()
            num_tokens = len(self.completion_ids[index])
            if kind == "tokens":
                values = check_token_values(value, num_tokens, name, index)
                total = sum(values)
            else:
                try:
                    offsets = self.offsets(index)
                except ValueError as error:
                    raise TokenRewardError(f"reward function {name!r}, completion {index}: {error}") from error
                values = spans_to_token_values(value, offsets, len(self.texts[index]), name, index)
                total = sum(float(span[2]) for span in value)
            scalars.append(total)
            token_values.append(values)
        if any(v is not None for v in token_values):
            self.token_values[func_index] = token_values
        if nan_count or inf_count:
            self.non_finite[name] = (nan_count, inf_count, len(outputs))
        return scalars

    def wrap(self, func_index: int, func: Callable, name: str) -> Callable:
        if is_async_callable(func):

            async def wrapped_async(*args, **kwargs):
                return self.convert(func_index, name, await func(*args, **kwargs))

            wrapped_async.__name__ = name
            return wrapped_async

        def wrapped(*args, **kwargs):
            return self.convert(func_index, name, func(*args, **kwargs))

        wrapped.__name__ = name
        return wrapped

    def token_reward_matrix(self, weights: Sequence[float], width: int) -> torch.Tensor:
        """(B, width) float32 sum_k w_k r^k_it over the token-level functions; 0 past each completion's tokens."""
        matrix = torch.zeros(len(self.texts), width, dtype=torch.float32)
        for func_index, per_completion in self.token_values.items():
            for i, values in enumerate(per_completion):
                if values is not None:
                    matrix[i, : len(values)] += float(weights[func_index]) * torch.tensor(values[:width])
        return matrix


class _SummedReward:
    """A token-level reward function collapsed to one number per completion; see `summed_reward`."""

    def __init__(self, func: Callable):
        self.func = func
        self.__name__ = f"{reward_name(func)}_sum"

    def __call__(self, *, completions, **kwargs) -> list[float | None]:
        outputs = self.func(completions=completions, **kwargs)
        summed = []
        for index, value in enumerate(outputs):
            kind = output_kind(value, self.__name__, index)
            if kind == "scalar":
                summed.append(value)
            elif kind == "tokens":
                summed.append(float(sum(value)))
            else:
                summed.append(float(sum(span[2] for span in value)))
        return summed


def summed_reward(func: Callable) -> Callable:
    """The sequence-level version of a token-level reward: each completion's spans or token values summed.

    It is exactly the sequence reward GSPO-token sees for `func` (module docstring), without the per-token detail:
    train GSPO with it to compare the same reward information with and without per-token credit. Named
    `<name>_sum`; picklable if `func` is.
    """
    return _SummedReward(func)


class TokenRewards:
    """The rewards feature: span and per-token rewards become GSPO-token's (B, T) advantages (`advantages`), and every
    reward is checked at every level (`check`). Built at construction, where a reward function marked token-level is
    refused under another level."""

    def __init__(self, reward_funcs, args):
        check_reward_dependencies(reward_funcs)
        check_token_reward_level(reward_funcs, args.importance_sampling_level)
        self.args = args
        self.warned = set()  # reward function names already warned about NaN/inf
        self.nonfinite_streak = 0  # consecutive rollouts without a finite reward, NaN or inf among them
        self.nonfinite_names = set()  # the reward functions that returned NaN or inf during that streak

    def collector(self, tokenizer, completion_ids_list, completions) -> TokenRewardCollector:
        return TokenRewardCollector(tokenizer, completion_ids_list, completions, self.args.importance_sampling_level)

    @staticmethod
    def wrapped(collector: TokenRewardCollector, reward_funcs, reward_func_names) -> list:
        """The reward functions as TRL should call them: each callable through `collector` (`TokenRewardCollector`)."""
        return [
            func if isinstance(func, nn.Module) else collector.wrap(i, func, name)
            for i, (func, name) in enumerate(zip(reward_funcs, reward_func_names, strict=True))
        ]

    def check(self, rewards_per_func, collector, reward_func_names, accelerator, metrics) -> None:
        """Warn once per reward function that returned NaN or +-inf; stop a run whose rollouts keep having no finite
        reward, NaN or inf among them (docs/REWARDS.md). `rewards_per_func` is gathered over processes."""
        for name, (nan_count, inf_count, total) in collector.non_finite.items():
            if name not in self.warned:
                self.warned.add(name)
                logger.warning(
                    f"reward function {name!r} returned NaN for {nan_count / total:.1%} and +-inf for "
                    f"{inf_count / total:.1%} of the {total} completions of this rollout. Both are treated like None "
                    "(cannot score: left out of the group baseline, no advantage). Return None for a completion you "
                    "cannot score; NaN or inf usually means a bug. This warning is shown once per reward function."
                )
        if torch.isfinite(rewards_per_func).any():
            self.nonfinite_streak = 0
            self.nonfinite_names.clear()
        else:
            # every process sees the same gathered rewards and gets here; whether NaN or inf (not only None) took
            # part is known per process, so it is gathered too, and every process takes the same decision
            local = torch.tensor([float(bool(collector.non_finite))], device=rewards_per_func.device)
            if accelerator.gather(local).sum().item() > 0:
                self.nonfinite_streak += 1
                self.nonfinite_names.update(collector.non_finite)
        metrics[CONSECUTIVE_NONFINITE_REWARD_ROLLOUTS].append(float(self.nonfinite_streak))
        limit = self.args.max_consecutive_nonfinite_reward_rollouts
        if self.nonfinite_streak >= limit:
            culprits = ", ".join(map(repr, sorted(self.nonfinite_names))) or "a reward function on another process"
            raise ValueError(
                f"no completion got a finite reward in {self.nonfinite_streak} consecutive rollouts (GSPOConfig."
                f"max_consecutive_nonfinite_reward_rollouts={limit}); reward functions: "
                f"{', '.join(map(repr, reward_func_names))}; NaN or inf came from {culprits}. Training on would update "
                "on nothing: stopping. Fix the reward function, return None where a reward does not apply, or raise "
                "max_consecutive_nonfinite_reward_rollouts."
            )

    def advantages(
        self, output, collector, rewards_per_func, reward_weights, group_size, accelerator, metrics, component
    ) -> None:
        """GSPO-token: replace the rollout's (B,) advantages by (B, T) ones, A_it = A_i + weight * component_it,
        groups normalised over all processes (a group may straddle them); `component` (GSPOTrainer.
        token_advantage_component) maps (N, W) token rewards, their mask and G to the (N, W) component.

        The (B, T) tensor has the batch first and travels through TRL's shuffle and split with the rest of the
        rollout. Logs `token_rewards/component_abs_mean` (0 without token rewards, where A_it = A_i exactly).
        """
        advantages = output["advantages"]
        mask = loss_mask(output)
        width = output["completion_ids"].size(1)
        local = collector.token_reward_matrix(reward_weights.tolist(), width).to(advantages.device)
        local = torch.stack([local, mask.float()])  # (2, B, T): token rewards and mask, gathered together
        gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=2).transpose(0, 1))
        # unscorable completions (no finite reward, gathered like the rewards) keep TRL's advantage of 0
        scorable = ~torch.isnan(rewards_per_func).all(dim=1).to(gathered.device)
        all_mask = gathered[:, 1] * scorable.unsqueeze(1)
        all_component = component(gathered[:, 0], all_mask, group_size)
        abs_mean = (all_component.abs() * all_mask).sum() / all_mask.sum().clamp(min=1)
        first_row = accelerator.process_index * advantages.size(0)
        local = all_component[first_row : first_row + advantages.size(0), : mask.size(1)].to(advantages.dtype)
        output["advantages"] = advantages.unsqueeze(1) + self.args.token_advantage_weight * local * mask
        metrics[TOKEN_REWARD_COMPONENT_ABS_MEAN].append(abs_mean.item())
