"""Train-mode randomness in a model: find it, switch it off, and name what no setting switches off.

GSPO's sequence ratio s_i compares two forward passes of the same weights, both in train mode: the pi_old pass of a
rollout and the policy pass of each optimizer step. A random draw in either (a dropout mask, a layer skipped, a
router's input jitter) moves s_i with nothing learned, by far more than the paper's 3e-4 clip band (docs/NOISE.md).
TRL's `disable_dropout` sets `p = 0` on `nn.Dropout` modules only; most transformers decoders pass their attention
dropout to the attention function as a float, and MoE jitter is a float too. `switch_off_train_mode_noise` zeroes
every kind listed below; `find_train_mode_noise` names what is still active; `make_ratio_passes_deterministic` is the
trainer's check (GSPOConfig.disable_dropout).

The kinds, each with how it is switched off (docs/NOISE.md has the survey of transformers and PEFT behind them):
`nn.Dropout`-family modules (`p = 0`), module attributes in `NOISE_ATTRIBUTES`, config fields in
`CONFIG_NOISE_FIELDS`, PEFT's per-adapter dropout dicts and multiplicative dropout (0); `UNSWITCHABLE` modules sample
whatever their settings and are named, never switched off. Deterministic train-mode branches (gradient
checkpointing, Mamba's kernel path, ...) need nothing: both passes take the same branch.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial

from torch import nn
from transformers import PretrainedConfig

from .config import SEQUENCE_LEVELS, pi_old_pass_runs

DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

# Module attributes that transformers modules read in train mode as a dropout / layer-drop probability or a jitter
# scale, with the value that switches them off. Not here: PhiMoE's `router_jitter_noise`, a deterministic
# sparsity threshold of its router (the random part of that router is in UNSWITCHABLE).
NOISE_ATTRIBUTES = {
    "attention_dropout": 0.0,  # passed to the attention function (Llama, Qwen2/3, Mistral, Gemma, ... most decoders)
    "dropout": 0.0,  # F.dropout(p=self.dropout): OPT, XGLM, BioGPT, Llama 4, ...
    "activation_dropout": 0.0,  # Bart-style decoders
    "attn_dropout": 0.0,  # GPT-BigCode
    "attn_dropout_p": 0.0,  # MPT
    "hidden_dropout": 0.0,  # Bloom, MPT, Falcon, Doge
    "resid_pdrop": 0.0,  # DBRX
    "residual_dropout": 0.0,  # Starcoder2, Seed-OSS
    "embedding_dropout": 0.0,  # Starcoder2
    "layerdrop": 0.0,  # OPT, XGLM, BioGPT, Bart-style: skips whole layers at random
    "drop_prob": 0.0,  # drop path (stochastic depth)
    "jitter_noise": 0.0,  # Mixtral, MiniMax: router_jitter_noise, the input scaled by U(1 - j, 1 + j)
    "input_jitter_noise": 0.0,  # PhiMoE
    "moe_jitter_eps": None,  # DBRX
}
# Config fields some models read inside forward rather than copying them to a module (Falcon, GPT-Neo, Persimmon,
# BLT, ProphetNet, Data2Vec): zeroed on every config the model holds.
CONFIG_NOISE_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "layerdrop", "attention_probs_dropout_prob")
# PEFT LoHa / LoKr: {adapter name: probability} dicts on each adapted layer
ADAPTER_NOISE_DICTS = ("rank_dropout", "module_dropout")
# PEFT OFT / BOFT: a module class with a probability `p` that is not an nn.Dropout
MULTIPLICATIVE_DROPOUT_CLASS = "MultiplicativeDropoutLayer"
# Class name (anywhere in the module's MRO) -> why it samples in train mode with no setting to switch it off.
UNSWITCHABLE = {
    "PhimoeTopKRouter": "PhiMoE's router Gumbel-samples its experts in train mode (sparsemixer)",
    "PolyRouter": "PEFT Poly samples its routing (RelaxedBernoulli) in train mode",
    "MontecloraSampler": "PEFT MonteCLoRA samples its adapter weights",
    "PveraLayer": "PEFT PVeRA samples its adapter in train mode",
    "LSHSelfAttention": "Reformer's LSH attention draws random rotations on every pass unless config.hash_seed is set",
}


@dataclass(frozen=True)
class NoiseSource:
    """One active source: `where` is a module path and attribute ("model.layers.0.self_attn.attention_dropout"),
    `value` what it is set to, `switchable` whether `switch_off_train_mode_noise` turns it off."""

    where: str
    value: str
    switchable: bool = True

    def __str__(self) -> str:
        return f"{self.where}={self.value}" if self.switchable else f"{self.where} ({self.value})"


def _is_active(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _configs(model: nn.Module):
    """Every PretrainedConfig the model's modules hold, nested ones (text_config, ...) included, each once."""
    seen, stack = {}, [getattr(module, "config", None) for module in model.modules()]
    while stack:
        config = stack.pop()
        if not isinstance(config, PretrainedConfig) or id(config) in seen:
            continue
        seen[id(config)] = config
        stack.extend(value for value in vars(config).values() if isinstance(value, PretrainedConfig))
    return list(seen.values())


def _unswitchable_reason(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        reason = UNSWITCHABLE.get(cls.__name__)
        if reason is None:
            continue
        if cls.__name__ == "LSHSelfAttention" and getattr(module, "hash_seed", None) is not None:
            return None
        return reason
    return None


def _active_sources(model: nn.Module):
    """(source, switch_off) for every active source of train-mode randomness in `model`, in module order, then its
    configs; switch_off is None for the UNSWITCHABLE ones. The one walk both public functions below read."""
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        reason = _unswitchable_reason(module)
        if reason is not None:
            yield NoiseSource(path or type(module).__name__, reason, switchable=False), None
        if isinstance(module, DROPOUT_MODULES) or type(module).__name__ == MULTIPLICATIVE_DROPOUT_CLASS:
            if _is_active(getattr(module, "p", 0)):
                yield NoiseSource(path, f"{type(module).__name__}(p={module.p})"), partial(setattr, module, "p", 0.0)
        attributes = vars(module)
        for name, off in NOISE_ATTRIBUTES.items():
            if _is_active(attributes.get(name)):
                yield NoiseSource(prefix + name, str(attributes[name])), partial(setattr, module, name, off)
        for name in ADAPTER_NOISE_DICTS:
            per_adapter = attributes.get(name)
            if isinstance(per_adapter, dict):
                for adapter, value in per_adapter.items():
                    if _is_active(value):
                        source = NoiseSource(f"{prefix}{name}[{adapter!r}]", str(value))
                        yield source, partial(per_adapter.__setitem__, adapter, 0.0)
    for config in _configs(model):
        for name in CONFIG_NOISE_FIELDS:
            if _is_active(getattr(config, name, None)):
                yield (
                    NoiseSource(f"{type(config).__name__}.{name}", str(getattr(config, name))),
                    partial(setattr, config, name, 0.0),
                )


def find_train_mode_noise(model: nn.Module) -> list[NoiseSource]:
    """Every source of train-mode randomness still active in `model` (module docstring), in module order."""
    return [source for source, _ in _active_sources(model)]


def switch_off_train_mode_noise(model: nn.Module) -> None:
    """Switch off every switchable source of `find_train_mode_noise` in place (the UNSWITCHABLE ones stay)."""
    for _, switch_off in list(_active_sources(model)):  # listed first: switching off changes what the walk sees
        if switch_off is not None:
            switch_off()


def describe_sources(sources: list[NoiseSource]) -> str:
    """One line for a list of sources: layer indices folded into '*', repeats counted."""
    counts = Counter(str(replace(source, where=re.sub(r"\.\d+(?=\.|$)", ".*", source.where))) for source in sources)
    return "; ".join(line + (f" (x{count})" if count > 1 else "") for line, count in counts.items())


def make_ratio_passes_deterministic(args, model: nn.Module, ref_model: nn.Module | None = None) -> None:
    """GSPOTrainer's construction step, at the sequence levels (docs/NOISE.md, "What GSPO does"): with
    disable_dropout, switch off every switchable source in the policy and reference models; then, if a pi_old pass
    runs, refuse what is still active."""
    level = args.importance_sampling_level
    if level not in SEQUENCE_LEVELS:
        return
    if args.disable_dropout:
        for each in (model, ref_model):
            if each is not None:
                switch_off_train_mode_noise(each)
    if not pi_old_pass_runs(args):
        return  # the policy pass is its own pi_old: one draw, s_i = 1 exactly
    sources = find_train_mode_noise(model)
    if not sources:
        return
    schedule = (
        f"gradient_accumulation_steps={args.gradient_accumulation_steps}, steps_per_generation="
        f"{args.steps_per_generation}, num_iterations={args.num_iterations}"
    )
    why = (
        f"With importance_sampling_level={level!r} and a pi_old pass ({schedule}) the pi_old and policy passes "
        "draw different random numbers, so the sequence ratio moves by more than the clip band with nothing "
        "learned (docs/NOISE.md)."
    )
    if not args.disable_dropout:
        raise ValueError(
            f"GSPOConfig.disable_dropout=False leaves the model's train-mode randomness on: "
            f"{describe_sources(sources)}. {why} Set disable_dropout=True (GSPOConfig's default), which switches "
            "it off."
        )
    raise ValueError(
        f"GSPOTrainer: the model samples in train mode whatever its settings: {describe_sources(sources)}. {why} "
        "Use an on-policy schedule (steps_per_generation == gradient_accumulation_steps, num_iterations=1, no "
        "vLLM importance correction) or another model or adapter type."
    )
