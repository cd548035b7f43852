"""Padding-free log-prob passes: pack a padded (B, L) batch into rows without padding, unpack the results.

GRPOTrainer feeds the model `cat([prompt_ids, completion_ids])` of shape (B, L): prompts left-padded, completions
right-padded, so every sequence's real tokens form one contiguous span of columns. `pack_sequences` moves those
spans into rows of at most `max_row_tokens` tokens (first-fit decreasing), with `position_ids` that restart at 0
for each sequence. Called with `attention_mask=None` and no cache, transformers detects the packing from the
position ids and masks attention block-diagonally, so each sequence sees only itself. The tail of a row shorter
than the widest row is filled with one filler "sequence" (pad tokens, positions from 0, no labels), which attends
only to itself.

The labels are pre-shifted (`shift_labels`, as TRL's fused LM head accepts them): the label of a packed position
is the next token of the same sequence when that token is a scored completion token, else -100, so no position is
scored across a sequence boundary. `unpack_completion_values` maps the per-position results (log-probs,
entropies) back to the (B, T) completion layout of the padded path, with zeros where the padded path has zeros.

Which models pack exactly is established by measurement and accepted positively (`packing_support_problem`): an
allowlist of text-config `model_type`s in trl_gspo/packing_models.py, written by scripts/sweep_packing_models.py
(docs/PACKING.md: how it measures, the table and the numbers); a type the sweep did not measure is refused as not
verified. An allowlist rather than a construction-time probe: a probe forward would have to run on sharded (ZeRO-3,
FSDP) or bf16 models, where it is a collective and its error is swamped by rounding.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import packing_models

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """Model inputs for one padding-free forward, and the maps between the padded and the packed layouts.

    input_ids, position_ids, shift_labels: (R, W) rows of packed sequences (see the module docstring).
    packed_index: (B, L) flat index r * W + w of each real token in the packed rows, -1 for padding.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    packed_index: torch.Tensor

    def to_model_order(self, values: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) per-position values of the padded layout -> (R * W, ...) in the order the model sees the
        tokens; zero (False) at the filler."""
        index = self.packed_index.reshape(-1)
        real = index >= 0
        flat = values.reshape(index.numel(), *values.shape[2:])
        out = torch.zeros(self.input_ids.numel(), *values.shape[2:], dtype=values.dtype, device=values.device)
        out[index[real]] = flat[real.to(values.device)]
        return out

    def from_model_order(self, values: torch.Tensor) -> torch.Tensor:
        """(R * W, ...) values in model order -> (B, L, ...) of the padded layout; zero (False) at padding."""
        index = self.packed_index
        gathered = values[index.clamp(min=0).reshape(-1)].view(*index.shape, *values.shape[1:])
        real = (index >= 0).view(*index.shape, *([1] * (values.dim() - 1)))
        return torch.where(real, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


@dataclass
class PaddedLayout:
    """The padded (B, L) batch as the model sees it: model order is the row-major flattening (`PackedBatch`'s
    counterpart for the padded forward)."""

    attention_mask: torch.Tensor

    def to_model_order(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(self.attention_mask.numel(), *values.shape[2:])

    def from_model_order(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(*self.attention_mask.shape, *values.shape[1:])


def assign_rows(lengths: list[int], max_row_tokens: int) -> list[list[int]]:
    """Indices of the sequences in each row: first-fit decreasing into rows of at most `max_row_tokens` tokens.

    A sequence longer than `max_row_tokens` gets a row of its own. Empty sequences (length 0) are left out.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep batch order
        length = lengths[index]
        if length == 0:
            continue
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(max_row_tokens - length)
    return rows


def pack_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    max_row_tokens: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack the real tokens of a padded batch into rows; see the module docstring.

    Args:
        input_ids, attention_mask: (B, L), the last `logits_to_keep` columns are the completion.
        logits_to_keep: T, the number of completion columns whose tokens are scored.
        max_row_tokens: token budget per row; None uses L, so no row is longer than the padded batch and the
            (quadratic) attention of a row never costs more than that of one padded sequence.
        pad_token_id: token of the row-tail filler (never scored).

    Raises ValueError when a sequence's attended tokens are not one contiguous span (a hole in the mask): packing
    would change the positions across the hole.
    """
    batch_size, width = input_ids.shape
    device = input_ids.device
    mask = attention_mask.bool()
    lengths_t = mask.sum(1)
    starts_t = torch.where(lengths_t > 0, mask.int().argmax(1), 0)
    columns = torch.arange(width, device=device)
    span = (columns >= starts_t[:, None]) & (columns < (starts_t + lengths_t)[:, None])
    if not torch.equal(span, mask):
        bad = (span != mask).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"pack_sequences: the attention mask of sequence(s) {bad} has a hole (its attended tokens are not one "
            "contiguous span); such a batch cannot be packed without changing positions."
        )
    lengths, starts = lengths_t.tolist(), starts_t.tolist()  # one device-to-host transfer
    budget = width if max_row_tokens is None else max_row_tokens
    rows = assign_rows(lengths, budget)
    row_width = max((sum(lengths[i] for i in row) for row in rows), default=1)

    # flat (B, L) source index and position of each packed slot, row by row; filler: index -1, positions 0, 1, ...
    sources, positions = [], []
    for row in rows:
        row_sources = [torch.arange(starts[i], starts[i] + lengths[i]) + i * width for i in row]
        row_positions = [torch.arange(lengths[i]) for i in row]
        filler = row_width - sum(lengths[i] for i in row)
        if filler:
            row_sources.append(torch.full((filler,), -1))
            row_positions.append(torch.arange(filler))
        sources.append(torch.cat(row_sources))
        positions.append(torch.cat(row_positions))
    if not rows:  # every sequence empty: one filler token, nothing scored
        sources, positions = [torch.full((1,), -1)], [torch.zeros(1, dtype=torch.long)]
    token_index = torch.stack(sources).to(device)
    position_ids = torch.stack(positions).to(device)

    is_token = token_index >= 0
    safe_index = token_index.clamp(min=0)
    flat_ids = input_ids.reshape(-1)
    packed_ids = torch.where(is_token, flat_ids[safe_index], pad_token_id)
    # label = the next token of the same sequence, where that token is a completion token; else ignored
    next_index = safe_index + 1
    next_column = next_index % width
    next_in_span = is_token & (next_column != 0) & mask.reshape(-1)[next_index.clamp(max=flat_ids.numel() - 1)]
    scored = next_in_span & (next_column >= width - logits_to_keep)
    shift_labels = torch.where(scored, flat_ids[next_index.clamp(max=flat_ids.numel() - 1)], IGNORE_INDEX)

    packed_index = torch.full((batch_size * width,), -1, dtype=torch.long, device=device)
    packed_index[token_index[is_token]] = torch.arange(token_index.numel(), device=device)[is_token.reshape(-1)]
    return PackedBatch(
        input_ids=packed_ids,
        position_ids=position_ids,
        shift_labels=shift_labels,
        packed_index=packed_index.view(batch_size, width),
    )


def unpack_completion_values(packed: PackedBatch, values: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Per-position results of the packed forward, (R, W), as the padded path's (B, T) completion values.

    The value for completion token (b, c) is the one computed at the packed position of its predecessor (the model
    scores the next token). Positions the padded path leaves at zero (padding, the first token of a sequence) are
    zero here too. Differentiable: gradients flow back to `values`.
    """
    index = packed.packed_index
    # column l's predecessor is column l - 1; column 0 has none
    shifted = torch.cat([torch.full_like(index[:, :1], -1), index[:, :-1]], dim=1)
    predecessor = shifted[:, index.size(1) - logits_to_keep :]
    scored = (predecessor >= 0) & (index[:, index.size(1) - logits_to_keep :] >= 0)
    gathered = values.reshape(-1)[predecessor.clamp(min=0)]
    return torch.where(scored, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


# Exactness is established per model type by measurement, never assumed (module docstring): the registry is written
# by the sweep, and tests/unit/test_packing.py::test_allowed_model_type_packs_exactly repeats the measurement for each
# accepted type, so an entry cannot exist without its passing test.
PACKING_EXACT_MODEL_TYPES = frozenset(packing_models.EXACT)
# model_type -> why it is refused, with the measured error (as the construction-time refusal states it)
PACKING_INEXACT_MODEL_TYPES = {
    model_type: why if error is None else f"{why} (packed log-prob error {error:.2g})"
    for model_type, (why, error) in packing_models.REFUSED.items()
}


def _unverified_reason(model_type) -> str:
    not_measured = packing_models.NOT_MEASURED.get(model_type)
    if not_measured:
        return f"is not verified to pack exactly (not measured: {not_measured})"
    return (
        "is not verified to pack exactly (never measured: the measurement covers the causal-LM types of "
        f"transformers {packing_models.TRANSFORMERS_VERSION})"
    )


# Attention implementations tested: sdpa and eager take the block-diagonal mask masking_utils builds from packed
# position ids; flash-attention derives cu_seqlens from the position ids, but only for a batch of ONE row
# (`_is_packed_sequence`), so with it every chunk is packed into a single row (`packs_into_one_row`).
PACKING_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
FLASH_ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
# Layer kinds of `config.layer_types` measured exact (sliding windows are applied on the per-sequence positions).
PACKING_LAYER_TYPES = ("full_attention", "sliding_attention")
# RoPE variants whose frequencies depend on the position only. "dynamic" and "longrope" rescale them from the
# longest position in the row (`dynamic_rope_update`), i.e. from the other sequences packed with a sequence.
PACKING_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_types(config) -> set[str]:
    """The rope_type of every RoPE parameter set of `config` (one, or one per layer type as in Gemma 3)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in parameters or "rope_theta" in parameters:
        parameters = {"all": parameters}
    return {p.get("rope_type", "default") for p in parameters.values() if isinstance(p, dict)}


def packing_support_problem(model) -> str | None:
    """Why `model` cannot run padding-free passes, or None when packing is known to be exact for it."""
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} has no config"
    if config.get_text_config() is not config:
        return (
            f"{type(model).__name__} is a vision-language model: its image inputs are laid out per padded sequence "
            "and cannot be packed"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKING_EXACT_MODEL_TYPES:
        reason = PACKING_INEXACT_MODEL_TYPES.get(model_type) or _unverified_reason(model_type)
        return (
            f"model_type={model_type!r} {reason}; the {len(PACKING_EXACT_MODEL_TYPES)} model types measured exact "
            "are trl_gspo.packing.PACKING_EXACT_MODEL_TYPES (docs/PACKING.md)"
        )
    return config_packing_problem(config)


def config_packing_problem(config) -> str | None:
    """Why a text config of an accepted model type cannot be packed (attention, layer kinds, RoPE), or None."""
    model_type = getattr(config, "model_type", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKING_ATTENTION_IMPLEMENTATIONS:
        return (
            f"attn_implementation={attention!r} is not tested with packed sequences (supported: "
            f"{PACKING_ATTENTION_IMPLEMENTATIONS}); each sequence could attend to the ones packed before it"
        )
    other_layers = sorted(set(getattr(config, "layer_types", None) or ()) - set(PACKING_LAYER_TYPES))
    if other_layers:
        return (
            f"model_type={model_type!r} has layer_types {other_layers}, not verified to pack exactly (supported: "
            f"{PACKING_LAYER_TYPES})"
        )
    rope_types = sorted(_rope_types(config) - set(PACKING_ROPE_TYPES))
    if rope_types:
        return (
            f"model_type={model_type!r} uses rope_type {rope_types}: its frequencies depend on the longest position "
            f"in the row, i.e. on the other sequences packed with each one (supported: {PACKING_ROPE_TYPES})"
        )
    return None


def packs_into_one_row(model) -> bool:
    """Whether `model`'s passes must pack each chunk into a single row: flash-attention finds the sequence
    boundaries from the position ids only in a batch of one row; with several it would attend across them."""
    return getattr(model.config, "_attn_implementation", None) in FLASH_ATTENTION_IMPLEMENTATIONS


def packed_logps_and_entropies(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    batch_size: int | None = None,
    compute_entropy: bool = False,
    compute_aux_loss: bool = False,
    max_row_tokens: int | None = None,
    pad_token_id: int = 0,
    autocast=None,
    one_row: bool = False,
    around_forward=None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """GRPOTrainer._get_per_token_logps_and_entropies on packed rows: same inputs, same (B, T) outputs.

    `model` carries TRL's fused LM head (`fused_lm_head=True` with pre-shifted `shift_labels` scores exactly the
    labelled positions). Chunks of `batch_size` sequences are packed and run one forward each, as TRL chunks the
    padded batch, so the number of forward calls per pass is TRL's (collective-safe under ZeRO-3).

    With `one_row` (flash-attention, see `packs_into_one_row`) or `compute_aux_loss` each chunk is packed into a
    single row without filler. For the aux loss: the MoE load-balancing loss then averages over exactly the chunk's
    real tokens, as the padded path's (which masks padding with the attention mask) does; rows with filler would
    count the filler tokens. `autocast` is a factory of the autocast context (one per chunk); `around_forward(packed)`
    one of a context around each chunk's forward, given the chunk's `PackedBatch` (the MoE routing maps its record
    through it).
    """
    batch_size = batch_size or input_ids.size(0)
    all_logps, all_entropies, all_aux = [], [], []
    for start in range(0, input_ids.size(0), batch_size):
        end = min(start + batch_size, input_ids.size(0))
        packed = pack_sequences(
            input_ids[start:end],
            attention_mask[start:end],
            logits_to_keep,
            max_row_tokens=attention_mask.numel() if one_row or compute_aux_loss else max_row_tokens,
            pad_token_id=pad_token_id,
        )
        # transformers detects packing only without an attention mask and without a cache
        model_inputs = {
            "input_ids": packed.input_ids,
            "position_ids": packed.position_ids,
            "attention_mask": None,
            "use_cache": False,
        }
        if compute_aux_loss:
            model_inputs["output_router_logits"] = True
        with (
            autocast() if autocast is not None else nullcontext(),
            around_forward(packed) if around_forward is not None else nullcontext(),
        ):
            outputs = model(**model_inputs, shift_labels=packed.shift_labels, fused_lm_head=True)
        all_logps.append(unpack_completion_values(packed, outputs.log_probs, logits_to_keep))
        if compute_entropy:
            all_entropies.append(unpack_completion_values(packed, outputs.entropy, logits_to_keep))
        if compute_aux_loss:
            all_aux.append(outputs.aux_loss)
    logps = torch.cat(all_logps, dim=0)
    entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
    aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
    return logps, entropies, aux_loss


class PaddedForward:
    """The default forward backend: GRPOTrainer's own padded log-prob pass (`trl_pass`, its bound
    `_get_per_token_logps_and_entropies`, to which `args` and `model_inputs` go unchanged), with the routing's
    `around_forward` given the padded layout (the routed passes are one chunk)."""

    def __init__(self, trl_pass):
        self.trl_pass = trl_pass

    def __call__(self, model, input_ids, attention_mask, *args, around_forward=None, **model_inputs):
        with around_forward(PaddedLayout(attention_mask)) if around_forward is not None else nullcontext():
            return self.trl_pass(model, input_ids, attention_mask, *args, **model_inputs)


class PackedForward:
    """The forward backend of `padding_free=True`: every log-prob pass (policy, pi_old, reference) on packed rows,
    with the (B, T) outputs of the padded pass.

    Refuses at construction a model (or reference model) for which packing is not known to be exact, naming why
    (`packing_support_problem`), and packs each chunk into one row where flash-attention needs it.
    """

    def __init__(self, models: dict, row_tokens: int | None, autocast):
        self.row_tokens, self.autocast, self.one_row = row_tokens, autocast, False
        for name, model in models.items():
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            problem = packing_support_problem(base)
            if problem:
                raise ValueError(
                    f"padding_free=True cannot be used with this {name} ({type(base).__name__}): {problem}. Set "
                    "padding_free=False."
                )
            self.one_row |= packs_into_one_row(base)

    def __call__(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size,
        compute_entropy,
        compute_aux_loss,
        around_forward=None,
        **model_inputs,
    ):
        extra = sorted(key for key, value in model_inputs.items() if value is not None)
        if extra:  # vision-language models are refused at construction; never drop their inputs silently
            raise ValueError(f"padding_free=True cannot pack a batch with model inputs {extra}.")
        return packed_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=batch_size,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            max_row_tokens=self.row_tokens,
            autocast=self.autocast,
            one_row=self.one_row,
            around_forward=around_forward,
        )
