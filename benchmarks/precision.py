#!/usr/bin/env python
"""How accurately does half-precision training compute GSPO's sequence log-ratio? A measurement against float64.

GSPO clips the sequence ratio s_i = exp(mean_t (logp_new - logp_old)) to [1 - 3e-4, 1 + 4e-4]: log s_i must be
right to well under 3e-4 or the clip decision is noise. This script builds a tiny causal LM (float32 master
weights), samples completions from it, takes ONE AdamW step on the on-policy GSPO loss, and computes log s_i
for the old and new weights by six routes:

    bf16         TRL's training route: `add_fused_lm_head(model, cast_lm_head_to_fp32=False,
                 outputs=("log_probs", "entropy"))`, then `model(..., labels=labels, fused_lm_head=True)` under
                 `torch.autocast(device, bfloat16)`, with labels -100 outside the completion, exactly as
                 `GRPOTrainer._get_per_token_logps_and_entropies` (GRPOConfig's default is bf16=True).
    bf16_head32  the same with `cast_lm_head_to_fp32=True`: the backbone under bf16 autocast, the LM-head
                 projection and log-softmax in float32 outside autocast.
    fp16         the bf16 route under `torch.autocast(device, float16)` over the float32 master weights: what
                 `TrainingArguments(fp16=True)` does (its GradScaler only scales the loss, not the forward).
                 CPU autocast runs float16 for real (torch 2.13), so this is not an emulation.
    fp16_weights the model itself cast to float16 (`model.half()`: weights rounded to float16, no autocast), the
                 fused head as in fp32: a half-precision pi_old/inference copy of the float32 master weights.
    fp32         the same fused head, no autocast: everything in float32.
    tf32         fp32 with every matmul reading its operands rounded to TF32 (10-bit mantissa), i.e. float32
                 training on an Ampere+ GPU with `allow_tf32=True` / `tf32=True`: emulated on the CPU, the real
                 tensor-core kernels on CUDA (`--device cuda`, where the other routes run with TF32 off).

Each is compared with a float64 recomputation from the same weights (a float64 copy of the model whose RMSNorm
and rotary embedding are patched to stay in float64; plain log_softmax over the full logits). The error reported
is |log s_i(route) - log s_i(float64)| per sequence, with |log s_i(float64)| (the signal) alongside.

    python scripts/measure_precision.py                       # lengths 16 64 256 1024, lr 1e-5 1e-6
    python scripts/measure_precision.py --lengths 16 128 --json /tmp/precision.json
    python scripts/measure_precision.py --device cuda          # the same on CUDA kernels (benchmarks/gpu_check.sh)

The old log-probs are those `_generate_and_score_completions` stores off-policy (steps_per_generation >
gradient_accumulation_steps or num_iterations > 1); on-policy TRL uses the detached current log-probs and s_i = 1
exactly. The functions are importable (tests/e2e/test_precision.py runs a small form of `measure`).
Results and conclusions: docs/PRECISION.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from transformers.modeling_outputs import CausalLMOutputWithPast
from trl.trainer.utils import add_fused_lm_head

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW
from trl_gspo.objective import compute_policy_objective, outside_clip_band, sequence_log_ratio

TARGET = PAPER_EPSILON_LOW / 10  # "well below eps_low"


@dataclass(frozen=True)
class Route:
    """One way of computing the per-token log-probs, as the trainer would."""

    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    cast_lm_head_to_fp32: bool
    label: str
    tf32: bool = False  # emulate TF32 tensor cores (GPU float32 with allow_tf32): not a real cost on CPU
    weights_dtype: torch.dtype = torch.float32  # the dtype the model's weights are held in


ROUTES = {
    "bf16": Route("bf16", torch.bfloat16, False, "bf16 autocast, fused head (TRL default)"),
    "bf16_head32": Route("bf16_head32", torch.bfloat16, True, "bf16 autocast + cast_lm_head_to_fp32"),
    "fp16": Route("fp16", torch.float16, False, "fp16 autocast, fused head (fp16=True)"),
    "fp16_weights": Route("fp16_weights", None, False, "model cast to float16", weights_dtype=torch.float16),
    "fp32": Route("fp32", None, False, "float32, no autocast"),
    "tf32": Route("tf32", None, False, "float32 with TF32 matmuls (emulated)", tf32=True),
}


@dataclass
class Settings:
    """Everything that defines a measurement (the command-line flags)."""

    lengths: tuple[int, ...] = (16, 64, 256, 1024)
    lrs: tuple[float, ...] = (1e-5, 1e-6)
    masks: tuple[str, ...] = ("full", "ragged")
    routes: tuple[str, ...] = tuple(ROUTES)
    model_type: str = "qwen2"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    tie_word_embeddings: bool = True
    logit_scale: float = 6.0
    batch_size: int = 16
    prompt_length: int = 16
    completions: str = "sampled"
    seed: int = 0
    timing_repeats: int = 2
    device: str = "cpu"


@dataclass
class Row:
    """The result for one (completion length, mask, learning rate, route)."""

    length: int
    mask: str
    lr: float
    route: str
    max_abs_err: float
    median_abs_err: float
    median_abs_signal: float
    max_abs_signal: float
    max_err_over_eps_low: float
    flipped_clip_decisions: int  # sequences the route puts on the other side of the clip band than float64 does
    errors: list[float] = field(default_factory=list)


# --- the routes under test -------------------------------------------------------------------------------------------


def trl_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
    """Labels as `GRPOTrainer._get_per_token_logps_and_entropies` builds them: -100 outside the completion."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-logits_to_keep] = -100
    return labels


def route_model(master: torch.nn.Module, route: Route, device: str = "cpu") -> torch.nn.Module:
    """A copy of `master` in the route's weight dtype, patched with TRL's fused LM head as `GRPOTrainer.__init__`."""
    model = build_like(master, route.weights_dtype).to(device)
    add_fused_lm_head(
        model, temperature=1.0, cast_lm_head_to_fp32=route.cast_lm_head_to_fp32, outputs=("log_probs", "entropy")
    )
    return model


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 `x` rounded to TF32's 10-bit mantissa (to nearest), the precision tensor cores read it at."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


class EmulateTF32(TorchFunctionMode):
    """Matmuls read their float32 operands rounded to TF32 and accumulate/output in float32.

    What `torch.backends.cuda.matmul.allow_tf32 = True` (or `TrainingArguments(tf32=True)`) does on an Ampere+ GPU,
    emulated: `linear` (input, weight; not the bias), `mm`/`matmul`/`bmm` (both operands, not `out`), `addmm` (the
    two factors) and `scaled_dot_product_attention` (q, k, v; the probabilities are not rounded, so it is a slight
    under-estimate for attention). The rounding makes copies: its time is no cost estimate.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name in ("linear", "mm", "matmul", "bmm", "__matmul__"):
            args = tuple(round_to_tf32(a) if i < 2 and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        elif name == "addmm":
            args = tuple(
                round_to_tf32(a) if i in (1, 2) and isinstance(a, torch.Tensor) else a for i, a in enumerate(args)
            )
        elif name == "scaled_dot_product_attention":
            args = tuple(round_to_tf32(a) if i < 3 and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


@contextmanager
def cuda_tf32(enabled: bool):
    """TF32 tensor cores on or off for CUDA matmuls and convolutions, as `TrainingArguments(tf32=...)` sets them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def matmul_precision(route: Route, device_type: str):
    """CUDA: real TF32 for the tf32 route and strict float32 for every other one (whatever the process default);
    CPU: the TF32 emulation for the tf32 route."""
    if device_type == "cuda":
        return cuda_tf32(route.tf32)
    return EmulateTF32() if route.tf32 else nullcontext()


def route_logps(
    model: torch.nn.Module, route: Route, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """(B, T) per-token log-probs of the completion by `route`, as the trainer computes them (float32 out)."""
    labels = trl_labels(input_ids, attention_mask, logits_to_keep)
    device_type = input_ids.device.type
    ctx = nullcontext() if route.autocast_dtype is None else torch.autocast(device_type, dtype=route.autocast_dtype)
    with ctx, matmul_precision(route, device_type):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -logits_to_keep:].float()


# --- the float64 reference -------------------------------------------------------------------------------------------


def _rms_norm_fp64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_fp64(self, x, position_ids):
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(device=x.device, dtype=torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def make_exact_float64(model: torch.nn.Module) -> torch.nn.Module:
    """Patch the modules that upcast only to float32 (RMSNorm, rotary embedding) to compute in float64."""
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_fp64, module)
        elif name.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            if getattr(module, "rope_type", "default") != "default":
                raise ValueError(f"make_exact_float64: rope type {module.rope_type!r} is not handled")
            module.forward = types.MethodType(_rotary_fp64, module)
    return model


@torch.no_grad()
def reference_logps(
    model64: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """(B, T) float64 log-probs of the completion: full logits, log_softmax, gather. No autocast, no fused head."""
    logits = model64(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, -logits_to_keep - 1 : -1].to(torch.float64)
    targets = input_ids[:, -logits_to_keep:]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def seq_log_ratio_fp64(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) float64 (1/|y_i|) sum_t mask_it (new_it - old_it): `sequence_log_ratio` without its float32 cast."""
    diff = torch.where(mask.bool(), new.double() - old.double(), torch.zeros((), dtype=torch.float64))
    return diff.sum(-1) / mask.sum(-1).double().clamp(min=1.0)


def ratio_errors(
    new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, reference_ratio: torch.Tensor
) -> torch.Tensor:
    """(B,) float64 |sequence_log_ratio(new, old, mask) - reference_ratio|: the trainer's own function, checked."""
    return (sequence_log_ratio(new, old, mask).double() - reference_ratio).abs()


def flipped_clip_decisions(
    new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, reference_ratio: torch.Tensor
) -> torch.Tensor:
    """(B,) bool: the route's s_i and float64's fall on different sides of the clip band [1 - eps_low, 1 + eps_high]
    (`outside_clip_band`, either side, whatever the advantage's sign): a clip that rounding decided."""
    route = outside_clip_band(sequence_log_ratio(new, old, mask).double(), PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH)
    return route != outside_clip_band(reference_ratio, PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH)


# --- model, data, optimizer step -------------------------------------------------------------------------------------


def build_master(settings: Settings, max_positions: int):
    """The tiny model in float32 with its final norm scaled by `logit_scale` (peaked, trained-like logits)."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tokenizer,
        model_type=settings.model_type,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        tie_word_embeddings=settings.tie_word_embeddings,
        max_position_embeddings=max_positions,
        seed=settings.seed,
        dtype=torch.float32,
    )
    with torch.no_grad():
        model.model.norm.weight.mul_(settings.logit_scale)
    model.eval()  # no dropout in the measured passes (GSPOConfig switches it off in training); qwen2 has none anyway
    return tokenizer, model


def build_like(master: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A fresh model of `master`'s config in `dtype`, holding `master`'s weights."""
    model = type(master)(master.config).to(dtype)
    model.load_state_dict(master.state_dict())
    model.eval()
    return model


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


def make_batch(tokenizer, model: torch.nn.Module, settings: Settings, max_length: int):
    """Prompts of random characters and completions of `max_length` tokens (sampled from the model or random)."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    n_special = 3  # <pad> <eos> <unk> come first in the char tokenizer
    vocab = len(tokenizer)
    prompt = torch.randint(n_special, vocab, (settings.batch_size, settings.prompt_length), generator=generator)
    if settings.completions == "random":
        completion = torch.randint(n_special, vocab, (settings.batch_size, max_length), generator=generator)
    elif settings.completions == "sampled":
        completion = sample_completions(model, prompt, max_length, n_special, generator)
    else:
        raise ValueError(f"completions={settings.completions!r}; expected 'sampled' or 'random'")
    return prompt, completion


# The KV cache's argument and output field: `cache` since transformers 5.18, `past_key_values` before (GPU
# machines with only torch, transformers, accelerate and peft, and .venv-vllm, may have 5.17).
KV_CACHE = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


@torch.no_grad()
def sample_completions(model, prompt, max_length, n_special, generator):
    """Ancestral sampling at temperature 1 (special tokens excluded) in float32, with the KV cache."""
    out = model(input_ids=prompt, use_cache=True)
    cache, logits = getattr(out, KV_CACHE), out.logits[:, -1]
    tokens = []
    for _ in range(max_length):
        logits = logits.double()
        logits[:, :n_special] = -math.inf
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        tokens.append(token)
        out = model(input_ids=token, **{KV_CACHE: cache}, use_cache=True)
        cache, logits = getattr(out, KV_CACHE), out.logits[:, -1]
    return torch.cat(tokens, dim=1)


def completion_mask(kind: str, batch_size: int, length: int, seed: int) -> torch.Tensor:
    """(B, T) 1/0: "full" all ones; "ragged" each row keeps a random prefix of length in [T/4, T] (row 0: T)."""
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if kind == "ragged":
        generator = torch.Generator().manual_seed(seed + 2)
        keep = torch.randint(max(1, length // 4), length + 1, (batch_size,), generator=generator)
        keep[0] = length
        mask = (torch.arange(length).unsqueeze(0) < keep.unsqueeze(1)).long()
    elif kind != "full":
        raise ValueError(f"mask={kind!r}; expected 'full' or 'ragged'")
    return mask


def gspo_gradients(model, route, input_ids, attention_mask, mask, advantages):
    """Gradients of the on-policy GSPO loss (old = detached current) by `route`: what one training step sees."""
    model.zero_grad(set_to_none=True)
    logps = route_logps(model, route, input_ids, attention_mask, mask.size(1))
    out = compute_policy_objective(
        "sequence", logps, logps.detach(), advantages, mask, PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH
    )
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def adamw_step(model, old_state, grads, lr):
    """The weights after one AdamW step from `old_state` (TRL's defaults: betas 0.9/0.999, eps 1e-8, no decay)."""
    load_weights(model, old_state)
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.grad = grads.get(name)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    optimizer.step()
    new_state = {name: param.detach().clone() for name, param in params.items()}
    model.zero_grad(set_to_none=True)
    return new_state


def half_changed_fraction(old_state, new_state, dtype=torch.bfloat16) -> float:
    """Fraction of the weights whose `dtype` rounding (what autocast feeds the matmuls) moved in the step."""
    changed = total = 0
    for name, old in old_state.items():
        changed += (old.to(dtype) != new_state[name].to(dtype)).sum().item()
        total += old.numel()
    return changed / total


# --- the measurement -------------------------------------------------------------------------------------------------


def measure(settings: Settings, log=print) -> dict:
    """Run the measurement: {"settings", "rows", "timing_ms_per_forward", "diagnostics", "total_seconds"}."""
    max_length = max(settings.lengths)
    device = settings.device
    tokenizer, master = build_master(settings, settings.prompt_length + max_length + 8)
    routes = {name: ROUTES[name] for name in settings.routes}
    models = {name: route_model(master, route, device) for name, route in routes.items()}
    train_route = ROUTES["bf16"]
    train_model = models["bf16"] if "bf16" in models else route_model(master, train_route, device)
    model64 = make_exact_float64(build_like(master, torch.float64)).to(device)
    old_state = {name: p.detach().to(device) for name, p in master.named_parameters()}

    start = time.perf_counter()
    prompt, completion_all = make_batch(tokenizer, master, settings, max_length)  # sampled on the CPU: same batch
    prompt, completion_all = prompt.to(device), completion_all.to(device)
    log(f"# batch ready ({settings.completions} completions, {time.perf_counter() - start:.1f}s)")

    rows, timing, diagnostics = [], {}, []
    for length in settings.lengths:
        completion = completion_all[:, :length]
        for mask_kind in settings.masks:
            mask = completion_mask(mask_kind, settings.batch_size, length, settings.seed).to(device)
            completion_ids = completion.masked_fill(mask == 0, tokenizer.pad_token_id)
            input_ids = torch.cat([prompt, completion_ids], dim=1)
            attention_mask = torch.cat([torch.ones_like(prompt), mask], dim=1)
            advantages = torch.randn(settings.batch_size, generator=torch.Generator().manual_seed(settings.seed + 3))
            advantages = advantages.to(device)

            grads = gspo_gradients(train_model, train_route, input_ids, attention_mask, mask, advantages)
            load_weights(model64, old_state)
            ref_old = reference_logps(model64, input_ids, attention_mask, length)
            entropy = token_entropy(model64, input_ids, attention_mask, length, mask)
            old_logps, token_errors = {}, {}
            for name, route in routes.items():
                load_weights(models[name], old_state)
                old_logps[name] = timed_logps(
                    models[name], route, input_ids, attention_mask, length, timing, name, settings.timing_repeats
                )
                token_err = (old_logps[name].double() - ref_old).abs()[mask.bool()]
                token_errors[name] = {"median": token_err.median().item(), "max": token_err.max().item()}

            for lr in settings.lrs:
                new_state = adamw_step(train_model, old_state, grads, lr)
                load_weights(model64, new_state)
                ref_new = reference_logps(model64, input_ids, attention_mask, length)
                ref_ratio = seq_log_ratio_fp64(ref_new, ref_old, mask)
                diagnostics.append(
                    {
                        "length": length,
                        "mask": mask_kind,
                        "lr": lr,
                        "bf16_changed_fraction": half_changed_fraction(old_state, new_state, torch.bfloat16),
                        "fp16_changed_fraction": half_changed_fraction(old_state, new_state, torch.float16),
                        "mean_token_entropy": entropy,
                        "mean_token_logp": ref_old[mask.bool()].mean().item(),
                        "token_logp_abs_err_old": token_errors,
                    }
                )
                for name, route in routes.items():
                    load_weights(models[name], new_state)
                    new = timed_logps(models[name], route, input_ids, attention_mask, length, timing, name, 1)
                    err = ratio_errors(new, old_logps[name], mask, ref_ratio)
                    flipped = flipped_clip_decisions(new, old_logps[name], mask, ref_ratio)
                    rows.append(
                        Row(
                            length=length,
                            mask=mask_kind,
                            lr=lr,
                            route=name,
                            max_abs_err=err.max().item(),
                            median_abs_err=err.median().item(),
                            median_abs_signal=ref_ratio.abs().median().item(),
                            max_abs_signal=ref_ratio.abs().max().item(),
                            max_err_over_eps_low=err.max().item() / PAPER_EPSILON_LOW,
                            flipped_clip_decisions=int(flipped.sum().item()),
                            errors=err.tolist(),
                        )
                    )
                load_weights(train_model, old_state)
            log(f"# length {length} mask {mask_kind} done ({time.perf_counter() - start:.1f}s)")
    timing_ms = {
        name: {str(length): 1e3 * statistics.median(timing[(name, length)]) for length in settings.lengths}
        for name in routes
    }
    return {
        "settings": asdict(settings),
        "rows": [asdict(row) for row in rows],
        "timing_ms_per_forward": timing_ms,
        "diagnostics": diagnostics,
        "total_seconds": time.perf_counter() - start,
    }


@torch.no_grad()
def timed_logps(model, route, input_ids, attention_mask, length, timing, name, repeats):
    """`route_logps` under no_grad, `repeats` times; the wall times go to timing[(name, length)]."""
    result = None
    for _ in range(max(1, repeats)):
        synchronize(input_ids.device)
        start = time.perf_counter()
        result = route_logps(model, route, input_ids, attention_mask, length)
        synchronize(input_ids.device)
        timing.setdefault((name, length), []).append(time.perf_counter() - start)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def token_entropy(model64, input_ids, attention_mask, length, mask) -> float:
    logits = model64(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -length - 1 : -1]
    logp = torch.log_softmax(logits.double(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy[mask.bool()].mean().item()


# --- report ----------------------------------------------------------------------------------------------------------


def markdown_table(result: dict) -> str:
    """The error table (one line per length, mask, lr; one column pair per route) and the timing table."""
    routes = result["settings"]["routes"]
    rows = result["rows"]
    keyed = {(r["length"], r["mask"], r["lr"], r["route"]): r for r in rows}
    diag = {(d["length"], d["mask"], d["lr"]): d for d in result["diagnostics"]}
    head = ["length", "mask", "lr", "median \\|log s\\| (fp64)", "bf16 weights moved", "fp16 weights moved"]
    for name in routes:
        head += [f"{name} max err", f"{name} median err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen = []
    for r in rows:
        key = (r["length"], r["mask"], r["lr"])
        if key in seen:
            continue
        seen.append(key)
        cells = [
            str(key[0]),
            key[1],
            f"{key[2]:.0e}",
            f"{r['median_abs_signal']:.2e}",
            f"{diag[key]['bf16_changed_fraction']:.1%}",
            f"{diag[key]['fp16_changed_fraction']:.1%}",
        ]
        for name in routes:
            entry = keyed[(*key, name)]
            mark = "" if entry["max_abs_err"] < TARGET else " ✗"
            cells += [f"{entry['max_abs_err']:.1e}{mark}", f"{entry['median_abs_err']:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"eps_low = {PAPER_EPSILON_LOW:.0e}, target max err < eps_low/10 = {TARGET:.0e} (✗ = target missed).")
    lines.append("")
    timing = result["timing_ms_per_forward"]
    lengths = list(next(iter(timing.values())))
    batch, prompt = result["settings"]["batch_size"], result["settings"]["prompt_length"]
    lines.append(
        f"| route (ms per no-grad forward, batch {batch}, prompt {prompt}) | "
        + " | ".join(f"T={n}" for n in lengths)
        + " |"
    )
    lines.append("|---|" + "---|" * len(lengths))
    for name in routes:
        lines.append(f"| {ROUTES[name].label} | " + " | ".join(f"{timing[name][n]:.1f}" for n in lengths) + " |")
    if "tf32" in routes:
        lines.append("")
        lines.append("The TF32 route's time is the cost of emulating it on a CPU, not what TF32 costs on a GPU.")
    return "\n".join(lines)


def summary_table(result: dict) -> str:
    """The one table per route: worst error of log s_i by completion length (over masks and learning rates), the
    rows that meet eps_low / 10, the clip decisions it flips against float64, the cost per forward and a verdict."""
    settings = result["settings"]
    lengths, device = settings["lengths"], settings["device"]
    timing = result["timing_ms_per_forward"]
    longest = str(max(lengths))
    head = ["route", *(f"max err T={n}" for n in lengths), "rows meeting 3e-5", "clip decisions flipped"]
    head += [f"ms per forward, T={longest} ({device}; x fp32)", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in settings["routes"]:
        rows = [row for row in result["rows"] if row["route"] == name and row["lr"] > 0]
        worst = {n: max(row["max_abs_err"] for row in rows if row["length"] == n) for n in lengths}
        meeting = sum(row["max_abs_err"] < TARGET for row in rows)
        flipped = sum(row["flipped_clip_decisions"] for row in rows)
        decisions = len(rows) * settings["batch_size"]
        cost = f"{timing[name][longest]:.1f}"
        if "fp32" in timing:
            cost += f" ({timing[name][longest] / timing['fp32'][longest]:.2f}x)"
        if ROUTES[name].tf32 and device == "cpu":
            cost += ", emulated: no cost figure"
        verdict = "meets eps_low/10 in every row" if meeting == len(rows) else "misses eps_low/10"
        cells = [name, *(f"{worst[n]:.1e}" for n in lengths), f"{meeting}/{len(rows)}"]
        cells += [f"{flipped}/{decisions} ({flipped / decisions:.1%})", cost, verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def forward_cost_ms(
    shape: dict, routes, batch_size: int, length: int, device: str, repeats: int = 3, num_layers: int | None = None
) -> dict[str, float]:
    """Median ms of one no-grad fused-head forward per route on a random model of `shape` (a
    gspo_benchmarks.trainer_ab.SHAPES entry: what a real model's LM head and layers cost), batch x (16 + length)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        shape["model_type"],
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=num_layers or shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        tie_word_embeddings=shape["tie_word_embeddings"],
        max_position_embeddings=length + 64,
    )
    torch.manual_seed(0)
    with torch.device(device):
        master = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    input_ids = torch.randint(0, shape["vocab_size"], (batch_size, 16 + length), device=device)
    attention_mask = torch.ones_like(input_ids)
    costs = {}
    for name in routes:
        route = ROUTES[name]
        model = copy.deepcopy(master).to(route.weights_dtype)
        add_fused_lm_head(
            model, temperature=1.0, cast_lm_head_to_fp32=route.cast_lm_head_to_fp32, outputs=("log_probs", "entropy")
        )
        timing = {}
        timed_logps(model, route, input_ids, attention_mask, length, {}, name, 1)  # warm-up
        timed_logps(model, route, input_ids, attention_mask, length, timing, name, repeats)
        costs[name] = 1e3 * statistics.median(timing[(name, length)])
        del model
    return costs


def parse_args(argv=None) -> tuple[Settings, argparse.Namespace]:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=list(defaults.lengths), help="completion lengths")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(defaults.lrs), help="AdamW learning rates")
    parser.add_argument("--masks", nargs="+", default=list(defaults.masks), choices=["full", "ragged"])
    parser.add_argument("--routes", nargs="+", default=list(defaults.routes), choices=list(ROUTES))
    parser.add_argument("--model-type", default=defaults.model_type)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--num-layers", type=int, default=defaults.num_layers)
    parser.add_argument("--num-heads", type=int, default=defaults.num_heads)
    parser.add_argument("--untied", action="store_true", help="separate lm_head and embedding weights")
    parser.add_argument(
        "--logit-scale",
        type=float,
        default=defaults.logit_scale,
        help="multiplies the final norm weight, so the logits are peaked like a trained model's (1 = random init)",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--prompt-length", type=int, default=defaults.prompt_length)
    parser.add_argument("--completions", choices=["sampled", "random"], default=defaults.completions)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--timing-repeats", type=int, default=defaults.timing_repeats)
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (TF32 is then real, not emulated)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the full result here")
    args = parser.parse_args(argv)
    settings = Settings(
        lengths=tuple(args.lengths),
        lrs=tuple(args.lrs),
        masks=tuple(args.masks),
        routes=tuple(args.routes),
        model_type=args.model_type,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        tie_word_embeddings=not args.untied,
        logit_scale=args.logit_scale,
        batch_size=args.batch_size,
        prompt_length=args.prompt_length,
        completions=args.completions,
        seed=args.seed,
        timing_repeats=args.timing_repeats,
        device=args.device,
    )
    return settings, args


def main(argv=None) -> int:
    settings, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(settings, log=lambda msg: print(msg, file=sys.stderr))
    diag = result["diagnostics"]
    entropy = statistics.mean(d["mean_token_entropy"] for d in diag)
    logp = statistics.mean(d["mean_token_logp"] for d in diag)
    print(markdown_table(result))
    print()
    print(summary_table(result))
    print()
    print(
        f"mean token entropy {entropy:.2f} nats, mean completion log-prob {logp:.2f}; total {result['total_seconds']:.0f}s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
