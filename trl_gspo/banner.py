"""The line a GSPO run prints once at start, on the main process: what the run is and how it is distributed.

GSPO run: world size 2, backend DDP, mixed precision bf16 (from the launch config / ACCELERATE_MIXED_PRECISION:
it overrides bf16=False in the config) | importance_sampling_level='sequence', clip range [1-0.0003, 1+0.0004],
4 optimizer steps per rollout (off-policy) | padding_free
"""

from __future__ import annotations

from dataclasses import fields

from trl import GRPOConfig

from .config import GSPOConfig

# GSPOConfig's own switches, off by default, each named in the line when it is on
SWITCHES = tuple(
    f.name for f in fields(GSPOConfig) if f.default is False and f.name not in {g.name for g in fields(GRPOConfig)}
)


def distributed_backend(accelerator) -> str:
    """'DeepSpeed ZeRO-<stage>', 'FSDP<version>', 'DDP' or 'single process' for an accelerate Accelerator."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        return f"DeepSpeed ZeRO-{state.deepspeed_plugin.zero_stage}"
    if getattr(state, "fsdp_plugin", None) is not None:
        return f"FSDP{getattr(state.fsdp_plugin, 'fsdp_version', '')}"
    return "DDP" if accelerator.num_processes > 1 else "single process"


def optimizer_steps_per_rollout(args) -> float:
    """Optimizer steps each generated batch feeds: steps_per_generation * num_iterations / accumulation."""
    return args.steps_per_generation * args.num_iterations / args.gradient_accumulation_steps


def computed_precision(mixed_precision: str, device_type: str) -> str:
    """What a run computes in, from accelerate's `mixed_precision` ('no', 'bf16', 'fp16') and the device type: fp16
    on the CPU is float32 ('no'), since accelerate enables fp16 autocast and its GradScaler only on an accelerator
    (the condition of `Accelerator.native_amp`; trl_gspo.config.fp16_runs_in_float32 is the same from the config)."""
    return "no" if mixed_precision == "fp16" and device_type == "cpu" else mixed_precision


def start_banner(world_size: int, backend: str, mixed_precision: str, args, device_type: str) -> str:
    """One line naming world size, backend, what the run computes in (`computed_precision`) and the GSPO settings
    that matter (see module doc). Half precision while the config says bf16=False and fp16=False was set by the
    launch environment, and the line says so."""
    computed = computed_precision(mixed_precision, device_type)
    precision = "none (float32)" if computed == "no" else computed
    if computed != mixed_precision:
        precision = (
            "none (float32: fp16 has no effect on the CPU, accelerate runs fp16 autocast only on an accelerator)"
        )
    elif mixed_precision != "no" and not (args.bf16 or args.fp16):
        precision += (
            " (from the launch config / ACCELERATE_MIXED_PRECISION: it overrides bf16=False in the config; "
            "pass --mixed_precision no to accelerate launch for float32)"
        )
    steps = optimizer_steps_per_rollout(args)
    policy = "on-policy: the ratio is 1" if args.is_on_policy else "off-policy"
    clip_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    line = (
        f"GSPO run: world size {world_size}, backend {backend}, mixed precision {precision} | "
        f"importance_sampling_level={args.importance_sampling_level!r}, clip range [1-{args.epsilon:g}, "
        f"1+{clip_high:g}], {steps:g} optimizer steps per rollout ({policy})"
    )
    options = [name for name in SWITCHES if getattr(args, name)]
    if args.importance_sampling_level == "sequence_token":
        options.append(f"token_advantage_weight={args.token_advantage_weight:g}")
    return line + (" | " + ", ".join(options) if options else "")
