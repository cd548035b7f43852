"""Which decoder-only model types pack exactly: every causal-LM type of the installed transformers, measured.

`GSPOConfig(padding_free=True)` accepts a model only if its text-config `model_type` was measured exact when packed
(trl_gspo/packing.py). This sweep is that measurement, for every type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:

1. Build a tiny random float32 model: `AutoConfig.for_model(model_type, **TINY_SHAPE, **TINY_OVERRIDES[model_type])`
   (consistent head/expert/layer sizes), weights at std 0.1, seed 0, and TRL's fused LM head (as the trainer does).
2. For each attention implementation the model class supports (eager, sdpa, flash-attention through transformers'
   own dispatch with reference kernels, `reference_flash_attention`), pack a ragged batch (left-padded prompts,
   right-padded completions) with `trl_gspo.packing.packed_logps_and_entropies` in each of LAYOUTS and compare the
   packed log-probs with each sequence run alone, unpadded (`packed_error`). Flash-attention is measured in one row
   only: that is how the trainer runs it (`packs_into_one_row`).
3. Exact when every error is below TOLERANCE and the config passes packing's other rules (layer kinds, RoPE);
   exact but refused by those rules is refused, saying so (EXACT_BUT_CONFIG). Otherwise the reason is diagnosed on
   the same model (`diagnose`), in this order: inexact with another attention than eager only; a forward without
   position ids; recurrent or convolution layers; inexact even with one sequence per row; the packed forward never
   reached transformers' detection of packed sequences from the position ids
   (masking_utils.find_packed_sequence_indices), i.e. the model builds its mask without them; else it mixes the
   sequences although its mask separates them.

Not measured (and listed with the reason): encoder-decoder and multimodal configs (vision, audio or speech
sub-configs), and types whose tiny model cannot be built or run here.

Each type runs in a forked child process with a timeout, so one that hangs or crashes is recorded, not fatal.
`main` writes the registry trl_gspo/packing_models.py (the allowlist and refusal reasons packing.py reads), the
table of docs/PACKING.md (between its markers) and docs/PERFORMANCE.md's list of supported model types.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import multiprocessing
import os
import platform
import re
import textwrap
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = ROOT / "trl_gspo" / "packing_models.py"
DOCS = ROOT / "docs" / "PACKING.md"
LIST_PAGE = ROOT / "docs" / "PERFORMANCE.md"  # the padding-free guide: its list of supported model types

TOLERANCE = 1e-5  # float32; the exact types measure 4e-7 to 3.1e-6 (docs/PACKING.md)
PROMPTS = [3, 7, 1, 5, 2, 6]
COMPLETIONS = [9, 0, 4, 12, 1, 6]  # with PROMPTS: lengths 12, 7, 5, 17, 3, 12 (one empty completion)
# row layouts of a packed pass: 16 tokens per row packs the batch into 4 rows; None uses the padded width (19)
LAYOUTS = {"several rows": dict(max_row_tokens=16), "padded width": dict(max_row_tokens=None), "one row": {}}
FLASH = "flash_attention_2"
ATTENTIONS = ("eager", "sdpa", FLASH)
WINDOW = 4  # tokens: sliding-window layers, where a type has them, are exercised (the sequences are up to 17 long)

TINY_SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=128,
    sliding_window=WINDOW,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # 5x transformers' default: with 0.02 a state carried across a packed boundary moves log-probs by only ~2e-5
    initializer_range=0.1,
    init_std=0.1,  # the same, as OPT, XGLM, XLM, TrOCR and CPM-Ant name it
    # the same tiny sizes under the names other families use (only the fields a type's config has are passed)
    rotary_dim=8,  # GPT-J, CodeGen: rotate the whole head
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,  # multi-head latent attention (DeepSeek V2/V3 and derivatives)
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    mamba_n_heads=4,  # Mamba-2 mixers: 4 heads of 16 = mamba_expand (2) x hidden_size
    mamba_d_head=16,
    mamba_d_state=4,
    mamba_chunk_size=8,
)
ATTENTION_LAYER_KINDS = ("full_attention", "sliding_attention")
# multi-head latent attention and some others require as many key/value heads as query heads
EQUAL_KV_HEADS = dict(num_key_value_heads=4)
# fields of TINY_SHAPE a type computes itself and refuses to be given
TINY_WITHOUT = {
    "falcon": ("head_dim",),
    "prophetnet": ("num_hidden_layers",),
    "xlnet": ("max_position_embeddings",),
    "xlstm": ("head_dim", "v_head_dim", "qk_nope_head_dim", "qk_rope_head_dim"),
}
# fields beyond TINY_SHAPE a type needs for consistent tiny sizes (its own names for them, expert counts, layer kinds)
TINY_OVERRIDES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    ),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "xglm": dict(d_model=32, ffn_dim=64, attention_heads=4, num_layers=2),
    "axk1": EQUAL_KV_HEADS,
    "axk2": EQUAL_KV_HEADS,
    "deepseek_v2": EQUAL_KV_HEADS,
    "deepseek_v3": EQUAL_KV_HEADS,
    "deepseek_v32": EQUAL_KV_HEADS,
    "dots3_note": EQUAL_KV_HEADS,
    "dots3_note_text": EQUAL_KV_HEADS,
    "glm4_moe_lite": EQUAL_KV_HEADS,
    "glm_moe_dsa": EQUAL_KV_HEADS,
    "longcat_flash": EQUAL_KV_HEADS,
    "minicpm3": EQUAL_KV_HEADS,
    "sarvam_mla": EQUAL_KV_HEADS,
    "youtu": EQUAL_KV_HEADS,
    "zaya": dict(num_experts_per_tok=1),
    "xlnet": dict(d_head=8),
    "cohere_compass_text": dict(
        rope_parameters={kind: dict(rope_type="default", rope_theta=10000.0) for kind in ATTENTION_LAYER_KINDS}
    ),
    "falcon_h1": dict(mamba_d_ssm=64),
    "gemma4_assistant": dict(hidden_size_per_layer_input=0),
    "kolibri1_1": dict(head_dim=16, num_attention_heads=2, num_key_value_heads=1, index_num_heads=2),  # rounds in 16s
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=4, head_dim=16, n_groups=1, state_size=4, chunk_size=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2),
    ),
    "electra": dict(embedding_size=32),
    "reformer": dict(  # its causal LM refuses to build unless is_decoder
        is_decoder=True, axial_pos_embds_dim=[16, 16], axial_pos_shape=[8, 16], attn_layers=["local", "local"]
    ),
    "rembert": dict(input_embedding_size=32, output_embedding_size=32),
    "jamba": dict(
        num_experts=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_dt_rank=4, mamba_expand=2
    ),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_ff_dim=64),
}


def _has_field(config, key) -> bool:
    try:
        getattr(config, key)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - e.g. a per-layer field that refuses a global read: the field exists
        return True
    return True


def tiny_config(model_type: str, **extra):
    from transformers import CONFIG_MAPPING, AutoConfig

    # only the fields the type's config has: a stray one (e.g. sliding_window) can still be read by its modules
    default = CONFIG_MAPPING[model_type]()
    shape = {
        key: value
        for key, value in TINY_SHAPE.items()
        if _has_field(default, key) and key not in TINY_WITHOUT.get(model_type, ())
    }
    return AutoConfig.for_model(model_type, **{**shape, **TINY_OVERRIDES.get(model_type, {}), **extra})


def tiny_causal_lm(model_type: str, attention: str = "eager", **extra):
    """A tiny random float32 model of `model_type` with TRL's fused LM head; flash-attention is set after loading
    (reference kernels, `reference_flash_attention`). Raises ValueError when the class refuses `attention`."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import add_fused_lm_head

    config = tiny_config(model_type, **extra)
    torch.manual_seed(0)
    flash = attention.startswith("flash")
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager" if flash else attention
    ).eval()
    if flash:
        if not model._supports_flash_attn:
            raise ValueError(f"{type(model).__name__} does not support flash-attention")
        model.config._attn_implementation = attention
    add_fused_lm_head(model)
    return model


def supported_attentions(model) -> list[str]:
    """The implementations of ATTENTIONS that `model`'s class accepts."""
    flags = {"eager": True, "sdpa": model._supports_sdpa, FLASH: model._supports_flash_attn}
    return [attention for attention in ATTENTIONS if flags[attention]]


def ragged_batch(prompt_lengths=PROMPTS, completion_lengths=COMPLETIONS, vocab: int = 40, seed: int = 0):
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


def alone_logps(model) -> list[torch.Tensor]:
    """Per sequence of the ragged batch, the float64 log-probs of its completion tokens when it runs alone, unpadded,
    with eager attention: the reference a packed pass must reproduce."""
    input_ids, attention_mask, _ = ragged_batch(vocab=model.config.get_text_config().vocab_size)
    attention = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    reference = []
    with torch.no_grad():
        for b, completion in enumerate(COMPLETIONS):
            real = input_ids[b][attention_mask[b].bool()]
            alone = torch.log_softmax(model(real[None], use_cache=False).logits.double()[0], -1)
            prompt_length = len(real) - completion
            reference.append(alone[prompt_length - 1 : -1].gather(-1, real[prompt_length:, None])[:, 0])
    model.config._attn_implementation = attention
    return reference


def packed_error(model, max_row_tokens=None, one_row=False, reference=None) -> float:
    """Largest |packed log-prob - `reference`| over the ragged batch's completion tokens; padding must come back
    exactly zero. `reference`: `alone_logps` of a model with the same weights (computed here when None)."""
    from trl_gspo.packing import packed_logps_and_entropies

    reference = alone_logps(model) if reference is None else reference
    input_ids, attention_mask, completion_width = ragged_batch(vocab=model.config.get_text_config().vocab_size)
    with torch.no_grad():
        packed, _, _ = packed_logps_and_entropies(
            model, input_ids, attention_mask, completion_width, max_row_tokens=max_row_tokens, one_row=one_row
        )
    error = 0.0
    for b, (completion, expected) in enumerate(zip(COMPLETIONS, reference, strict=True)):
        if completion:
            error = max(error, (packed[b, :completion] - expected).abs().max().item())
        assert torch.all(packed[b, completion:] == 0), "padding positions must stay zero"
    return error


def reference_attention(q, k, v, causal, scale, window_size, softcap):
    """Attention of one sequence, (S, H, D) layout as flash-attention takes it (grouped key/value heads)."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (q.size(-1) ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query, key = torch.arange(q.size(0))[:, None], torch.arange(k.size(0))[None, :]
    allowed = (key <= query) if causal else torch.ones_like(query == key)
    if window_size[0] >= 0:
        allowed &= query - key <= window_size[0]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@contextlib.contextmanager
def reference_flash_attention(calls: list | None = None):
    """transformers' flash-attention dispatch (`_flash_attention_forward`: packed-sequence detection, cu_seqlens
    from the position ids) with torch reference kernels in place of the CUDA ones, in float32. Each kernel call is
    appended to `calls`, when given: ("dense", batch size) or ("varlen", sequence lengths)."""
    from unittest import mock

    import transformers.integrations.flash_attention as flash_integration
    import transformers.modeling_flash_attention_utils as flash_utils

    calls = [] if calls is None else calls

    def flash_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        calls.append(("dense", q.size(0)))
        return torch.stack(
            [reference_attention(*t, causal, softmax_scale, window_size, softcap) for t in zip(q, k, v)]
        )

    def flash_varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                        softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):  # fmt: skip
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        bounds = cu_seqlens_q.tolist()
        calls.append(("varlen", [end - start for start, end in zip(bounds, bounds[1:])]))
        parts = [
            reference_attention(q[a:b], k[a:b], v[a:b], causal, softmax_scale, window_size, softcap)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(parts)

    functions = (flash_fn, flash_varlen_fn, None, flash_utils._pad_input, flash_utils._unpad_input)
    processing = (flash_utils._lazy_define_process_function(flash_varlen_fn), dict)
    with (
        mock.patch.object(flash_utils, "lazy_import_flash_attention", lambda *a, **k: (functions, processing)),
        mock.patch.object(flash_integration, "get_target_dtype", lambda query, module: None),
    ):
        yield


# --- why a type is inexact: measured on the same model ---

NO_POSITION_IDS = "its forward takes no position ids"
INEXACT_ALONE_IN_ROW = "differs from the sequence run alone even with one sequence per row"
MASK_WITHOUT_POSITION_IDS = (
    "builds its attention mask without the position ids, so every packed sequence attends to the ones packed before it"
)
RECURRENT_STATE = "has recurrent or convolution layers whose state carries across packed sequence boundaries"
LEAKS = "mixes packed sequences although its attention mask separates them"
EXACT_BUT_CONFIG = "packs exactly in the measurement, but its default config is refused for any model type"
# module class names of layers that carry a state along the sequence (not attention)
# (not transformers' Conv1D: GPT-2's name for a linear layer)
STATEFUL_LAYER = re.compile(
    r"mamba|conv(?!1d$)|rwkv|recurrent|lstm|linearattention|deltanet|ssm|lightning|retention", re.I
)


@contextlib.contextmanager
def packed_detection_calls():
    """Records whether masking_utils found packed sequences in the position ids during the forwards inside."""
    from unittest import mock

    import transformers.masking_utils as masking_utils

    found = []
    original = masking_utils.find_packed_sequence_indices

    def spy(position_ids):
        result = original(position_ids)
        found.append(result is not None)
        return result

    with mock.patch.object(masking_utils, "find_packed_sequence_indices", spy):
        yield found


def diagnose(model) -> str:
    """Why `model` (eager) packs inexactly: see the module docstring."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return NO_POSITION_IDS
    if any(isinstance(m, torch.nn.Conv1d) or STATEFUL_LAYER.search(type(m).__name__) for m in model.modules()):
        return RECURRENT_STATE
    alone_in_row = packed_error(model, max_row_tokens=1)  # every sequence longer than 1 token: a row each
    if alone_in_row >= TOLERANCE:
        return f"{INEXACT_ALONE_IN_ROW} (error {alone_in_row:.2g})"
    with packed_detection_calls() as found:
        packed_error(model, max_row_tokens=LAYOUTS["several rows"]["max_row_tokens"])
    return LEAKS if any(found) else MASK_WITHOUT_POSITION_IDS


MODALITY = re.compile(r"vision|audio|speech|image|video", re.I)  # sub-config names of other input kinds


def not_measured_reason(model_type: str) -> str | None:
    """Why `model_type` is outside the sweep (encoder-decoder, multimodal), or None."""
    config = tiny_config(model_type)
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder, not decoder-only"
    other_modalities = [key for key in getattr(config, "sub_configs", {}) if MODALITY.search(key)]
    if config.get_text_config() is not config or other_modalities:
        return "multimodal (its text part is measured under its own model_type where transformers has one)"
    return None


def measure(model_type: str) -> dict:
    """One type's record: status "exact", "inexact" or "not measured", the errors per attention and layout,
    and the reason."""
    skip = not_measured_reason(model_type)
    if skip:
        return dict(model_type=model_type, status="not measured", reason=skip)
    model = tiny_causal_lm(model_type)
    text_type = model.config.model_type
    reference = alone_logps(model)  # every attention implementation builds the same weights (seed 0)
    errors: dict[str, dict[str, float]] = {}
    for attention in supported_attentions(model):
        try:
            candidate = model if attention == "eager" else tiny_causal_lm(model_type, attention)
        except (ValueError, ImportError) as error:  # the class refuses this implementation for this config
            errors[attention] = {"refused by transformers": str(error).splitlines()[0][:120]}
            continue
        layouts = {"one row": {}} if attention == FLASH else LAYOUTS
        with reference_flash_attention() if attention == FLASH else contextlib.nullcontext():
            errors[attention] = {
                layout: packed_error(candidate, one_row=layout == "one row", reference=reference, **kwargs)
                for layout, kwargs in layouts.items()
            }
    numbers = [e for per_layout in errors.values() for e in per_layout.values() if isinstance(e, float)]
    record = dict(model_type=model_type, text_model_type=text_type, errors=errors, max_error=max(numbers))
    if max(numbers) < TOLERANCE:
        from trl_gspo.packing import config_packing_problem

        # exact, yet refused for every model whose config has these layer kinds or this RoPE: not accepted
        problem = config_packing_problem(model.config)
        if problem:
            problem = problem.removeprefix(f"model_type={model.config.model_type!r} ")
            return dict(record, status="inexact", max_error=None, reason=f"{EXACT_BUT_CONFIG}: {problem}")
        return dict(record, status="exact", reason=None)
    inexact = [
        a
        for a, per_layout in errors.items()
        if any(isinstance(e, float) and e >= TOLERANCE for e in per_layout.values())
    ]
    if "eager" not in inexact:  # the diagnosis runs eager attention; here the mask of another implementation fails
        return dict(
            record, status="inexact", reason=f"packs exactly with eager attention, not with {', '.join(inexact)}"
        )
    return dict(record, status="inexact", reason=diagnose(model))


def _child(model_type, queue):
    torch.set_num_threads(1)
    try:
        queue.put(measure(model_type))
    except TypeError as error:
        if "position_ids" in str(error):
            queue.put(dict(model_type=model_type, status="inexact", reason=NO_POSITION_IDS, max_error=None))
        else:
            queue.put(dict(model_type=model_type, status="not measured", reason=_failure(error)))
    except BaseException as error:  # noqa: BLE001 - any failure of a third-party model is a result to record
        queue.put(dict(model_type=model_type, status="not measured", reason=_failure(error)))


def _failure(error) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    message = " ".join(str(error).split())[:160]
    return f"tiny model fails: {type(error).__name__}: {message} ({Path(frame.filename).name}:{frame.lineno})"


def measure_in_child(model_type: str, timeout: float) -> dict:
    """`measure` in a forked child: a type that hangs or crashes is recorded as not measured."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(model_type, queue))
    child.start()
    try:
        return queue.get(timeout=timeout)
    except Exception:  # noqa: BLE001 - queue.Empty: the child hung or died
        if child.is_alive():
            child.kill()
            return dict(model_type=model_type, status="not measured", reason=f"timed out after {timeout:.0f} s")
        return dict(model_type=model_type, status="not measured", reason=f"crashed (exit code {child.exitcode})")
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(types: list[str], timeout: float, log=print) -> list[dict]:
    # imported once here, so each forked child starts with them loaded
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_flash_attention_utils  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    from trl.trainer import add_fused_lm_head  # noqa: F401

    import trl_gspo.packing  # noqa: F401

    records = []
    for model_type in types:
        start = time.perf_counter()
        record = measure_in_child(model_type, timeout)
        record["seconds"] = round(time.perf_counter() - start, 1)
        error = record.get("max_error")
        log(f"{model_type:28s} {record['status']:13s} {'' if error is None else f'{error:.2g}':9s} "
            f"{record['seconds']:6.1f} s  {record['reason'] or ''}")  # fmt: skip
        records.append(record)
    return records


# --- outputs: the registry trl_gspo.packing reads, the table of docs/PACKING.md, the list of docs/PERFORMANCE.md ---

TABLE_START, TABLE_END = "<!-- sweep table: start -->", "<!-- sweep table: end -->"
# docs/PERFORMANCE.md's list of the accepted types: "Supported, by measurement: model types a, b, ..., z;"
TYPE_LIST = re.compile(r"(Supported, by measurement: model types )([^;]*)(;)")


def registry_source(records: list[dict]) -> str:
    """trl_gspo/packing_models.py: EXACT, REFUSED and NOT_MEASURED keyed by the text-config model_type."""
    import transformers

    exact, inexact, not_measured = {}, {}, {}
    for record in records:
        key = record.get("text_model_type") or record["model_type"]
        if record["status"] == "exact":
            exact[key] = float(f"{record['max_error']:.2g}")
        elif record["status"] == "inexact":
            error = record.get("max_error")
            inexact[key] = (record["reason"], None if error is None else float(f"{error:.2g}"))
        else:
            not_measured[key] = record["reason"]

    def literal(value):  # as ruff formats it: strings in double quotes
        return json.dumps(value) if isinstance(value, str) else repr(value)

    def block(name, comment, entries):
        lines = [f"# {comment}", f"{name} = {{"]
        lines += [f"    {literal(key)}: {literal(value)}," for key, value in sorted(entries.items())]
        return "\n".join(lines + ["}"])

    def refused_block():  # each reason written once, over the model types it refuses
        by_reason = {}
        for key, (why, error) in inexact.items():
            by_reason.setdefault(why, {})[key] = error
        lines = ["# why a model_type is refused: {model_type: largest packed error or None}", "_REFUSED_BY_REASON = {"]
        for why, errors in sorted(by_reason.items()):
            lines.append(f"    {literal(why)}: {{")
            lines += [f"        {literal(key)}: {literal(error)}," for key, error in sorted(errors.items())]
            lines.append("    },")
        lines += [
            "}",
            "# model_type: (why it is refused, largest packed error or None)",
            "REFUSED = {",
            "    model_type: (why, error) for why, errors in _REFUSED_BY_REASON.items() for model_type, error in "
            "errors.items()",
            "}",
        ]
        return "\n".join(lines)

    docstring = (
        '"""How each causal-LM model type of transformers packs (padding_free), measured on a tiny float32 model.\n\n'
        "Written by scripts/sweep_packing_models.py (gspo_benchmarks.packing_sweep; docs/PACKING.md has the method\n"
        'and the table): do not edit by hand, rerun the sweep. trl_gspo.packing reads it.\n"""'
    )
    blocks = [
        docstring,
        f'TRANSFORMERS_VERSION = "{transformers.__version__}"',
        block("EXACT", "model_type: largest |packed - alone| log-prob error over attentions and row layouts", exact),
        refused_block(),
        block("NOT_MEASURED", "model_type: why the sweep could not measure it", not_measured),
    ]
    return "\n\n".join(blocks) + "\n"


def _cell(errors: dict | None) -> str:
    if not errors:
        return ""
    numbers = [value for value in errors.values() if isinstance(value, float)]
    return f"{max(numbers):.2g}" if numbers else "refused"


def docs_table(records: list[dict]) -> str:
    """The markdown table of docs/PACKING.md: one line per type, largest error per attention implementation."""
    lines = [
        "| model_type | verdict | eager | sdpa | flash (one row) | why refused / not measured |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {"exact": "accepted", "inexact": "refused", "not measured": "not measured"}
    for record in records:
        errors = record.get("errors") or {}
        name = record["model_type"]
        if record.get("text_model_type") not in (None, name):
            name += f" ({record['text_model_type']})"
        cells = [_cell(errors.get(attention)) for attention in ATTENTIONS]
        reason = (record["reason"] or "").replace("|", "/")
        lines.append(f"| {name} | {verdicts[record['status']]} | {' | '.join(cells)} | {reason} |")
    return "\n".join(lines)


def page_with_list(page: str, accepted: list[str]) -> str:
    """`page` with `accepted` as its list of supported model types, the lines holding the list rewrapped."""
    match = TYPE_LIST.search(page)
    line_start = page.rindex("\n", 0, match.start()) + 1
    line_end = page.index("\n", match.end())
    text = page[line_start : match.start(2)] + ", ".join(accepted) + page[match.end(2) : line_end]
    indent = len(text) - len(text.lstrip())
    wrapped = textwrap.fill(
        " ".join(text.split()),
        width=119,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + 2),
        break_on_hyphens=False,  # model types such as bert-generation stay whole
        break_long_words=False,
    )
    return page[:line_start] + wrapped + page[line_end:]


def write_outputs(records: list[dict], header: str) -> None:
    REGISTRY.write_text(registry_source(records))
    docs = DOCS.read_text()
    start, end = docs.index(TABLE_START) + len(TABLE_START), docs.index(TABLE_END)
    DOCS.write_text(f"{docs[:start]}\n{header}\n\n{docs_table(records)}\n{docs[end:]}")
    accepted = sorted({r.get("text_model_type") or r["model_type"] for r in records if r["status"] == "exact"})
    LIST_PAGE.write_text(page_with_list(LIST_PAGE.read_text(), accepted))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types to measure (default: every causal-LM type)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per model type")
    parser.add_argument("--json", help="also write the records here")
    parser.add_argument(
        "--from-json", help="write the outputs from the records of an earlier --json run instead of measuring"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        records, wall, date = saved["records"], saved["wall_seconds"], saved["date"]
    else:
        start = time.perf_counter()
        records = sweep(args.types or model_types(), args.timeout)
        wall, date = round(time.perf_counter() - start), datetime.date.today().isoformat()
        if args.json:
            Path(args.json).write_text(json.dumps(dict(records=records, wall_seconds=wall, date=date), indent=1))
    counts = {status: sum(r["status"] == status for r in records) for status in ("exact", "inexact", "not measured")}
    print(f"{len(records)} model types in {wall} s: {counts}")
    if args.types and not args.from_json:
        return 0  # a partial sweep measures; only the whole one writes the registry and the two docs pages
    import transformers

    accepted = {r.get("text_model_type") or r["model_type"] for r in records if r["status"] == "exact"}
    header = (
        f"Measured {date}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{platform.machine()} CPU ({os.cpu_count()} cores), {wall} s: {counts['exact']} accepted "
        f"({len(accepted)} text-config model types), {counts['inexact']} refused, {counts['not measured']} not "
        "measured (`python scripts/sweep_packing_models.py`)."
    )
    write_outputs(records, textwrap.fill(header, width=119, break_on_hyphens=False))
    return 0
