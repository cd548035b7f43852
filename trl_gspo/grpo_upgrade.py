"""A GRPOConfig handed to GSPOTrainer: which of its fields are kept, which take GSPO's defaults, and the notice.

The rule, also in README.md ("Use it from Python") and GSPOConfig.from_grpo_config:

- a field counts as set by the user when it differs from GRPOConfig's default (a dataclass does not record which
  arguments were passed, so a value set on purpose to GRPOConfig's default counts as not set); set fields are kept;
- the clip range is one setting: when epsilon or epsilon_high was set, both are kept as GRPOConfig means them
  (epsilon_high=None is epsilon); when neither was, both take GSPO's 3e-4 / 4e-4;
- every other field takes GSPOConfig's default; the notice names the ones where that differs from GRPOConfig's.
"""

from __future__ import annotations

from dataclasses import fields

from trl import GRPOConfig

from .config import GSPOConfig

CLIP_FIELDS = ("epsilon", "epsilon_high")
# Batch-shape fields TRL derives from the others: carried only when the user chose them.
DERIVED_FIELDS = ("steps_per_generation", "generation_batch_size")
# Fields whose GSPOConfig value differs from GRPOConfig's default (fixed defaults and derived ones).
GSPO_DEFAULT_FIELDS = (
    "importance_sampling_level",
    "epsilon",
    "epsilon_high",
    "loss_type",
    "steps_per_generation",
    "bf16",
)


def user_set_fields(args: GRPOConfig) -> dict:
    """The fields of `args` that differ from a fresh GRPOConfig's (same output_dir and use_cpu), clip range paired."""
    # use_cpu goes into the reference: without it GRPOConfig's bf16 default fails on a CPU-only machine
    reference = GRPOConfig(output_dir=args.output_dir, use_cpu=args.use_cpu)
    kept = {}
    for f in fields(GRPOConfig):
        if not f.init or f.name in DERIVED_FIELDS:
            continue
        value = getattr(args, f.name)
        if value != getattr(reference, f.name):
            kept[f.name] = value
    if args.steps_per_generation != args.gradient_accumulation_steps:
        kept["steps_per_generation"] = args.steps_per_generation
    if any(name in kept for name in CLIP_FIELDS):
        kept["epsilon"] = args.epsilon
        kept["epsilon_high"] = args.epsilon if args.epsilon_high is None else args.epsilon_high
    return kept


def upgrade_grpo_config(args: GRPOConfig) -> tuple[GSPOConfig, str]:
    """(the GSPOConfig for `args`, the notice naming the fields kept and the GSPO defaults taken)."""
    kept = user_set_fields(args)
    config = GSPOConfig(output_dir=args.output_dir, use_cpu=args.use_cpu, **kept)
    took_defaults = {name: getattr(config, name) for name in GSPO_DEFAULT_FIELDS if name not in kept}
    return config, upgrade_notice(kept, took_defaults)


def upgrade_notice(kept: dict, took_defaults: dict) -> str:
    def listing(values: dict) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in sorted(values.items())) or "none"

    return (
        "GSPOTrainer got a GRPOConfig and turned it into a GSPOConfig. Kept, as you set them: "
        f"{listing(kept)}. Took GSPO's defaults: {listing(took_defaults)}. A field equal to GRPOConfig's default "
        "counts as not set; the clip range is kept as a pair when either bound was set. Pass a GSPOConfig to "
        "choose every value and silence this."
    )
