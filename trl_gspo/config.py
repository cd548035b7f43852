"""GSPOConfig: GRPOConfig with the GSPO paper's defaults, validated at construction."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields

import torch
from transformers.utils import is_torch_bf16_gpu_available
from trl import GRPOConfig

from .objective import DEFAULT_LOG_RATIO_BOUND

GSPO_TOKEN_LEVEL = "sequence_token"  # GSPO-token: the sequence ratio, per-token advantages
SEQUENCE_LEVELS = ("sequence", GSPO_TOKEN_LEVEL)
PAPER_EPSILON_LOW = 3e-4
PAPER_EPSILON_HIGH = 4e-4
PAPER_MINIBATCHES_PER_ROLLOUT = 4
# Above this a sequence-level clip range looks like a token-level (GRPO) one: the sequence ratio is a geometric
# mean over hundreds of tokens and moves far less than a token ratio, so such a clip never fires.
GRPO_LIKE_EPSILON = 0.05
# GRPOConfig's own clip range, which the token level (TRL's loss) keeps when the user sets none
GRPO_EPSILON = next(f.default for f in fields(GRPOConfig) if f.name == "epsilon")
ROLLOUT_LOGPROBS_CHECK_INTERVAL = 10  # GSPOConfig.rollout_logprobs_check_interval default
# GSPOConfig.vllm_dtype values: "auto" is vLLM's own choice (TRL's colocate mode passes none)
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")

# generation_kwargs that change the sampling distribution the rollout log-probs describe: transformers' generate
# (before SampledTokenLogProbs sees it) and vLLM's SamplingParams (min_tokens masks eos out of vLLM's processed
# log-probs, docs/VLLM.md)
DISTRIBUTION_CHANGING_KWARGS = (
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "suppress_tokens",
    "begin_suppress_tokens",
    "bad_words_ids",
    "sequence_bias",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "temperature",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "logits_processors",
)
# generation_kwargs that truncate the distribution (after the record with transformers; inside vLLM's log-probs)
TRUNCATING_KWARGS = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")


# loss_type values and why they cannot aggregate a sequence-level ratio.
_LENGTH_WEIGHTED_LOSSES = ("dapo", "bnpo", "dr_grpo")
_OTHER_OBJECTIVES = ("cispo", "sapo", "vespo", "luspo")


def truncates(key: str, value) -> bool:
    """Whether a sampling setting truncates the distribution: top_k (an int) is off at 0 or -1, so top_k=1 (== 1.0
    in Python) truncates; the float settings (top_p, min_p, typical_p, cutoffs) are off at 0 or 1.0."""
    if value is None:
        return False
    return value not in ((0, -1) if key == "top_k" else (0, 1.0))


def is_off_policy_schedule(args: GRPOConfig) -> bool:
    """Whether some optimizer steps of a rollout see data from an older policy (any GRPOConfig)."""
    return args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0


def pi_old_pass_runs(args: GRPOConfig) -> bool:
    """Whether GRPOTrainer computes old_per_token_logps in a rollout (its own condition, for any GRPOConfig): when
    the schedule is off-policy, or vLLM's importance correction needs pi_old to compare the engine's log-probs with."""
    return is_off_policy_schedule(args) or (args.use_vllm and args.vllm_importance_sampling_correction)


def fp16_runs_in_float32(use_cpu: bool) -> bool:
    """Whether fp16=True computes in float32: accelerate enables fp16 autocast and its GradScaler only off the CPU."""
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS and out-of-tree devices alike
        return use_cpu or not torch.accelerator.is_available()
    return use_cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available())


def default_bf16(use_cpu: bool) -> bool:
    """GSPOConfig's bf16 when left unset: True only on an accelerator with bf16 support, never with use_cpu."""
    return not use_cpu and is_torch_bf16_gpu_available()


# GRPOConfig's default for activation checkpointing, which it sets under the deprecated name gradient_checkpointing
GRPO_ACTIVATION_CHECKPOINTING = next(f.default for f in fields(GRPOConfig) if f.name == "gradient_checkpointing")
# newer transformers 5 releases name the field activation_checkpointing; older ones have only the old name, which is
# not deprecated there
HAS_ACTIVATION_CHECKPOINTING = any(f.name == "activation_checkpointing" for f in fields(GRPOConfig))


class GSPOOnPolicyWarning(UserWarning):
    """The configuration makes pi_old == pi_theta at every step: the ratio is 1 and GSPO equals GRPO."""


class GSPOPrecisionWarning(UserWarning):
    """Mixed-precision log-probs too coarse for the sequence clip band, or fp16 that has no effect on the CPU
    (see docs/PRECISION.md)."""


class GSPOClipRangeWarning(UserWarning):
    """A clip range sized for the other level: GRPO's at a sequence level (never reached), GSPO's at the token level
    (clips most tokens)."""


class GSPOUnusedSettingWarning(UserWarning):
    """A GSPO field set to a non-default value that the rest of the configuration never reads."""


@dataclass
class GSPOConfig(GRPOConfig):
    r"""
    Configuration for [`GSPOTrainer`]: every [`~trl.GRPOConfig`] field, with the GSPO paper's defaults.

    Every field GSPO adds or whose default it changes is documented in its `help=` (`trl-gspo-train --help` prints
    them). Two GRPOConfig defaults change without a field of their own:

    - `bf16` left unset: True only where the accelerator supports bf16 (GRPOConfig: True unless fp16, which fails
      on a CPU-only machine without `use_cpu`); float32 on a CPU (README, "Precision").
    - `steps_per_generation = 4 * gradient_accumulation_steps` when neither it nor `generation_batch_size` is
      set (GRPOConfig: `gradient_accumulation_steps`): the paper's 4 minibatches, i.e. optimizer steps, per rollout.
      On-policy (1 step per rollout) the ratio is exactly 1 and GSPO reduces to GRPO.

    Refused at construction (`ValueError`) with a sequence-level ratio: a length-weighted or non-GSPO
    `loss_type`, `delta` (two-sided clip), `use_adaptive_entropy`, `top_entropy_quantile < 1` with plain
    `"sequence"` (use `"sequence_token"`), and a `"token_*"` vLLM importance-sampling mode with plain
    `"sequence"`. Everything else GRPOConfig offers works as in GRPOTrainer.
    """

    importance_sampling_level: str = field(
        default="sequence",
        metadata={
            "help": "'sequence' (GSPO's length-normalised sequence ratio, the default; GRPOConfig: 'token'), "
            "'sequence_token' (GSPO-token, per-token advantages allowed) or 'token' (plain GRPO, for A/B comparisons).",
        },
    )
    epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Lower clip range eps_low. None: the paper's 3e-4 at the sequence levels, whose ratio moves orders "
            "of magnitude less than a token ratio; GRPOConfig's default (0.2) at the token level."
        },
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={
            "help": "Upper clip range eps_high. None: the paper's 4e-4 at the sequence levels; at the token level "
            "GRPOConfig's rule (equal to epsilon)."
        },
    )
    beta: float = field(
        default=0.0, metadata={"help": "KL coefficient; the paper uses none (0.0, GRPOConfig's default too)."}
    )
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "Aggregation (GRPOConfig: 'dapo'). Under a sequence-level ratio only 'grpo' (one weight per "
            "sequence, mean over sequences) is GSPO; the token-sum losses ('dapo', 'bnpo', 'dr_grpo') weight sequences "
            "by their length and are refused there."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Switch off the model's train-mode randomness (GRPOConfig: False). With a sequence-level ratio "
            "GSPOTrainer zeroes every kind trl_gspo.noise finds (dropout modules and probabilities, layer drop, MoE "
            "router jitter, PEFT adapter dropout), whose different draws in the pi_old and policy passes would move "
            "s_i past the clip band (docs/NOISE.md); False with such randomness and a pi_old pass is refused by the "
            "trainer. With 'token' TRL's behaviour applies."
        },
    )
    log_ratio_bound: float = field(
        default=DEFAULT_LOG_RATIO_BOUND,
        metadata={"help": "Clamp of the (length-normalised) log importance ratio before exp, so it cannot overflow."},
    )
    token_advantage_weight: float = field(
        default=1.0,
        metadata={
            "help": "GSPO-token with token or span rewards: weight lambda of the group-normalised token component in "
            "A_it = A_i + lambda * (r_it - mu_g) / (sigma_g + 1e-4) (see trl_gspo.token_rewards). 0 ignores the "
            "token detail (the rewards' sums still count as sequence rewards)."
        },
    )
    vllm_importance_sampling_length_normalized: bool = field(
        default=True,
        metadata={
            "help": "With vLLM and a 'sequence_*' vllm_importance_sampling_mode, use the geometric mean of the token "
            "ratios (GSPO's form) instead of their product, which collapses long sequences (docs/VLLM.md); "
            "sampling/importance_sampling_ratio/* log these weights."
        },
    )

    # --- padding-free passes (trl_gspo/packing.py) ---
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Run every log-prob pass (policy, pi_old, reference) on the micro-batch's sequences packed without "
            "padding (position ids restarting per sequence, no attention mask) and unpack the results to the (B, T) "
            "layout. Only model types measured exact when packed (trl_gspo.packing.PACKING_EXACT_MODEL_TYPES, "
            "docs/PACKING.md); any other is refused when the trainer is built. Off by default: its speed is measured "
            "on CPU only (BENCHMARKS.md), and on GPUs the dense block-diagonal sdpa mask is untested."
        },
    )
    padding_free_row_tokens: int | None = field(
        default=None,
        metadata={
            "help": "With padding_free: token budget of one packed row. None uses the padded width of the batch, so "
            "no row's attention (quadratic in its length with sdpa/eager) costs more than a padded sequence's."
        },
    )

    # --- rollout log-probs as pi_old (trl_gspo/rollout_logprobs.py) ---
    use_rollout_logprobs: bool = field(
        default=False,
        metadata={
            "help": "Use the log-probs computed while sampling (transformers generation, vLLM or a rollout_func) as "
            "pi_old instead of running a separate pi_old forward. Refused for on-policy schedules, continuous "
            "batching, repetition penalty and other distribution-changing generation settings, and, with vLLM, for "
            "its importance-sampling correction and for top-k/top-p truncation."
        },
    )
    rollout_logprobs_check_interval: int = field(
        default=ROLLOUT_LOGPROBS_CHECK_INTERVAL,
        metadata={
            "help": "With use_rollout_logprobs: every this many rollouts, also run the pi_old forward and log the "
            "sequence-level mismatch (gspo/rollout_logprobs/*). 0 never checks."
        },
    )

    max_consecutive_nonfinite_reward_rollouts: int = field(
        default=5,
        metadata={
            "help": "Stop (ValueError naming the reward functions) after this many consecutive rollouts with no finite "
            "reward in which some reward function returned NaN or inf (a bug, not 'does not apply'); one such rollout "
            "trains on with zero advantages. The streak is logged as gspo/consecutive_nonfinite_reward_rollouts. "
            "All-None rollouts (TRL: the reward does not apply) warn and never count."
        },
    )

    # MoE routing (trl_gspo/moe.py); no effect on dense models except routing_replay, which they refuse
    log_routing_drift: bool = field(
        default=True,
        metadata={
            "help": "MoE models: log moe/routing_drift/{token_layer,token_any_layer}, the fraction of completion "
            "(token, layer) pairs and of tokens whose top-k experts changed between the pi_old pass and the "
            "policy pass (docs/MOE.md); with use_rollout_logprobs, against the rollout's routing (recorded with "
            "rollout_routing_replay only). Needs an off-policy schedule (pi_old is the current policy otherwise)."
        },
    )
    routing_replay: bool = field(
        default=False,
        metadata={
            "help": "MoE models: reuse the experts chosen in the pi_old pass in the policy pass (R2 routing replay), "
            "with the router's own forward computing the weights at those experts, so the router still learns. Refused "
            "for dense models, routers outside trl_gspo.moe.REPLAY_ROUTER_CLASSES, on-policy schedules (no pi_old "
            "pass) and with use_rollout_logprobs (no pi_old pass either: use rollout_routing_replay)."
        },
    )
    rollout_routing_replay: bool = field(
        default=False,
        metadata={
            "help": "MoE models, transformers generation: record the experts generate() chose for every token it fed "
            "(prompt prefill and cached decoding) and replay them in every training pass (R3, arXiv 2510.11370); "
            "positions generation did not route (the last completion token, padding) feed no scored log-prob and "
            "route themselves. Composes with padding_free and use_rollout_logprobs. Same routers as routing_replay; "
            "refused with use_vllm, use_transformers_continuous_batching, tools and a rollout_func."
        },
    )

    # vLLM colocate engine (trl_gspo/vllm_cpu.py)
    vllm_dtype: str = field(
        default="auto",
        metadata={
            "help": "vllm_mode='colocate': dtype of the vLLM engine's weights and compute. 'auto' is TRL's behaviour "
            "(vLLM's choice: bfloat16 for a float32 checkpoint on a CPU, a training-inference mismatch); 'float32' "
            "makes the engine's log-probs those of the float32 trainer. The server sets its own (`trl vllm-serve`)."
        },
    )
    # GRPOConfig's default (True) sits on newer transformers' deprecated name, which then warns on every config:
    # unset here, and the same default goes to `activation_checkpointing` (to this field on older transformers, where
    # it is the only name). Setting the old name still works (and warns where it is deprecated).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated name of activation_checkpointing (transformers 5); set that one instead."},
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:  # GRPOConfig would pick bf16 even where the hardware has none
            self.bf16 = default_bf16(self.use_cpu)
        self._resolve_clip_range()
        if self.gradient_checkpointing is None:
            if not HAS_ACTIVATION_CHECKPOINTING:
                self.gradient_checkpointing = GRPO_ACTIVATION_CHECKPOINTING
            elif self.activation_checkpointing is None:
                self.activation_checkpointing = GRPO_ACTIVATION_CHECKPOINTING
        self._validate_field_values()
        self._validate_gspo_fields()
        if self.steps_per_generation is None and self.generation_batch_size is None:
            self.steps_per_generation = PAPER_MINIBATCHES_PER_ROLLOUT * self.gradient_accumulation_steps
        generation_batch_size_set = self.generation_batch_size is not None
        try:
            super().__post_init__()
        except ValueError as error:
            if "must be divisible by num_generations" not in str(error):
                raise
            raise ValueError(self._num_generations_message(generation_batch_size_set)) from None
        self._validate_rollout_logprobs_fields()
        self._validate_routing_fields()
        self._validate_vllm_fields()
        self._warn_on_suspicious_setup()
        self._warn_on_unused_settings()

    def _num_generations_message(self, generation_batch_size_set: bool) -> str:
        """TRL's "generation_batch_size must be divisible by num_generations", in the fields the user set."""
        rollout = self.generation_batch_size
        if generation_batch_size_set:
            made_of = f"generation_batch_size={rollout}"
        else:
            made_of = (
                f"per_device_train_batch_size={self.per_device_train_batch_size} x {self.world_size} process(es) x "
                f"steps_per_generation={self.steps_per_generation} = {rollout}"
            )
        return (
            f"GSPOConfig.num_generations={self.num_generations} must divide the number of completions per rollout, "
            f"{made_of}: every prompt's group of num_generations completions must fit in one rollout. Choose a "
            f"num_generations that divides {rollout}, or a batch size that is a multiple of {self.num_generations}."
        )

    def _resolve_clip_range(self):
        """An unset clip range takes the level's own: the paper's band for a sequence ratio, TRL's for a token ratio
        (a token ratio moves orders of magnitude more than a sequence ratio, so neither band suits the other)."""
        if self.is_sequence_level:
            if self.epsilon is None:
                self.epsilon = PAPER_EPSILON_LOW
            if self.epsilon_high is None:
                self.epsilon_high = PAPER_EPSILON_HIGH
        elif self.epsilon is None:
            self.epsilon = GRPO_EPSILON

    @property
    def is_sequence_level(self) -> bool:
        return self.importance_sampling_level in SEQUENCE_LEVELS

    @property
    def is_on_policy(self) -> bool:
        """True when every optimizer step sees data from the current policy (TRL then skips pi_old)."""
        return not is_off_policy_schedule(self)

    def _schedule(self) -> str:
        """The fields that decide whether a schedule is on-policy, for messages."""
        return (
            f"gradient_accumulation_steps={self.gradient_accumulation_steps}, steps_per_generation="
            f"{self.steps_per_generation}, num_iterations={self.num_iterations}"
        )

    def _validate_gspo_fields(self):
        level = self.importance_sampling_level
        if not self.is_sequence_level:
            return  # plain GRPO: TRL's own loss and checks apply
        if self.loss_type in _LENGTH_WEIGHTED_LOSSES:
            raise ValueError(
                f"GSPOConfig.loss_type={self.loss_type!r} sums token losses, which weights each sequence by its "
                f"length; with importance_sampling_level={level!r} that is no longer GSPO. Use loss_type='grpo' "
                "(one weight per sequence, mean over sequences)."
            )
        if self.loss_type in _OTHER_OBJECTIVES:
            raise ValueError(
                f"GSPOConfig.loss_type={self.loss_type!r} is a different objective from GSPO's clipped sequence "
                "ratio. Use loss_type='grpo' here, or TRL's GRPOTrainer for that loss."
            )
        if self.loss_type != "grpo":
            raise ValueError(
                f"GSPOConfig.loss_type={self.loss_type!r} is unknown; with importance_sampling_level={level!r} "
                "the only allowed value is 'grpo'."
            )
        if self.delta is not None:
            raise ValueError(
                f"GSPOConfig.delta={self.delta} (two-sided token clipping) is not defined for a sequence-level "
                "ratio; leave it None."
            )
        if self.use_adaptive_entropy:
            raise ValueError(
                "GSPOConfig.use_adaptive_entropy=True is not supported by GSPOTrainer; use a fixed entropy_coef, or "
                "importance_sampling_level='token' (TRL's GRPO loss)."
            )
        if level == "sequence" and self.top_entropy_quantile < 1.0:
            raise ValueError(
                f"GSPOConfig.top_entropy_quantile={self.top_entropy_quantile} masks tokens out of the policy "
                "gradient, but GSPO ('sequence') has one term per sequence. Use importance_sampling_level="
                "'sequence_token', which applies the mask per token, or top_entropy_quantile=1.0."
            )
        if (
            level == "sequence"
            and self.use_vllm
            and self.vllm_importance_sampling_correction
            and self.vllm_importance_sampling_mode.startswith("token")
        ):
            raise ValueError(
                f"GSPOConfig.vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} weights tokens, "
                "but GSPO ('sequence') has one term per sequence. Use 'sequence_mask' or 'sequence_truncate'."
            )

    def _validate_field_values(self):
        """Each field's own range. Batch, sampling and optimiser numbers are checked here because transformers, torch
        or TRL would refuse them only after the model has loaded (or divide by them), in their own names."""

        def positive_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        def in_range(value, low: float, high: float, low_open: bool) -> bool:
            return isinstance(value, (int, float)) and (low < value if low_open else low <= value) and value <= high

        checks = (
            (
                "importance_sampling_level",
                self.importance_sampling_level in ("sequence", GSPO_TOKEN_LEVEL, "token"),
                "one of 'sequence' (GSPO), 'sequence_token' (GSPO-token), 'token' (GRPO)",
            ),
            ("epsilon", 0 < self.epsilon < 1, f"in (0, 1) (paper: {PAPER_EPSILON_LOW})"),
            (
                "epsilon_high",
                not self.is_sequence_level or self.epsilon_high is None or 0 < self.epsilon_high < 1,
                f"in (0, 1) at a sequence level (paper: {PAPER_EPSILON_HIGH})",
            ),
            ("beta", self.beta >= 0, ">= 0 (0 disables the KL term)"),
            ("num_iterations", self.num_iterations >= 1, ">= 1"),
            ("log_ratio_bound", self.log_ratio_bound > 0, "> 0"),
            (
                "max_consecutive_nonfinite_reward_rollouts",
                positive_int(self.max_consecutive_nonfinite_reward_rollouts),
                "an integer >= 1: the number of consecutive rollouts without any finite reward (NaN or inf returned) "
                "that stops training",
            ),
            (
                "token_advantage_weight",
                math.isfinite(self.token_advantage_weight) and self.token_advantage_weight >= 0,
                "a finite number >= 0",
            ),
            (
                "padding_free_row_tokens",
                self.padding_free_row_tokens is None or self.padding_free_row_tokens >= 1,
                "a positive number of tokens, or None (the padded width of each batch)",
            ),
            (
                "rollout_logprobs_check_interval",
                self.rollout_logprobs_check_interval >= 0,
                ">= 0 (0: never recompute pi_old to check the rollout log-probs)",
            ),
            ("per_device_train_batch_size", positive_int(self.per_device_train_batch_size), "a positive integer"),
            ("gradient_accumulation_steps", positive_int(self.gradient_accumulation_steps), "a positive integer"),
            (
                "steps_per_generation",
                self.steps_per_generation is None or positive_int(self.steps_per_generation),
                "a positive integer (optimizer steps per rollout), or unset",
            ),
            (
                "generation_batch_size",
                self.generation_batch_size is None or positive_int(self.generation_batch_size),
                "a positive integer (completions per rollout), or unset",
            ),
            (
                "num_generations",
                positive_int(self.num_generations) and self.num_generations >= 2,
                "an integer >= 2: each completion's advantage compares its reward with the other completions of "
                "its prompt's group",
            ),
            (
                "max_completion_length",
                self.max_completion_length is None or positive_int(self.max_completion_length),
                "a positive number of tokens",
            ),
            (
                "temperature",
                isinstance(self.temperature, (int, float))
                and math.isfinite(self.temperature)
                and self.temperature > 0,
                "a number > 0: training samples its completions (greedy decoding would give every completion of a "
                "group the same text, hence no advantage)",
            ),
            ("top_p", in_range(self.top_p, 0.0, 1.0, low_open=True), "in (0, 1] (1.0: no nucleus truncation)"),
            (
                "top_k",  # vLLM also takes -1 for "off"; transformers' generate refuses it
                self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= (-1 if self.use_vllm else 0)),
                "an integer >= 0 (0: no top-k truncation)",
            ),
            ("min_p", self.min_p is None or in_range(self.min_p, 0.0, 1.0, low_open=False), "in [0, 1], or unset"),
            (
                "repetition_penalty",
                isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0,
                "a number > 0 (1.0: no penalty)",
            ),
            ("learning_rate", self.learning_rate >= 0, "a number >= 0"),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**32, "an integer in [0, 2**32 - 1]"),
        )
        for name, valid, expected in checks:
            if not valid:
                raise ValueError(f"GSPOConfig.{name}={getattr(self, name)!r} must be {expected}.")

    def _validate_rollout_logprobs_fields(self):
        if not self.use_rollout_logprobs:
            return
        refuse = "GSPOConfig.use_rollout_logprobs=True"
        if self.is_on_policy:
            raise ValueError(
                f"{refuse} replaces the pi_old forward, which this on-policy schedule ({self._schedule()}) does not "
                "run: pi_old is the detached current policy."
            )
        if self.use_transformers_continuous_batching:
            raise ValueError(f"{refuse}: use_transformers_continuous_batching=True returns no log-probs.")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError(
                f"{refuse} with vllm_importance_sampling_correction=True: the correction compares the recomputed pi_old "
                "with vLLM's log-probs, which would then be the same tensor. Set vllm_importance_sampling_correction="
                "False (the gspo/rollout_logprobs/* metrics report the mismatch instead)."
            )
        generation = dict(self.generation_kwargs or {})
        changed = [key for key in DISTRIBUTION_CHANGING_KWARGS if key in generation]
        if self.repetition_penalty != 1.0:
            changed.append(f"repetition_penalty={self.repetition_penalty}")
        if changed:
            raise ValueError(
                f"{refuse} with {changed}: these change the sampling distribution, so the rollout log-probs are not "
                "those of the policy the trainer computes pi_old from. Remove them or set use_rollout_logprobs=False."
            )
        truncating = [key for key in TRUNCATING_KWARGS if truncates(key, generation.get(key))]
        truncating += [
            f"{key}={value}"
            for key, value in (("top_p", self.top_p), ("top_k", self.top_k), ("min_p", self.min_p))
            if truncates(key, value)
        ]
        if self.use_vllm and truncating:
            raise ValueError(
                f"{refuse} with vLLM and {truncating}: vLLM's log-probs are then of the truncated distribution, and "
                "a ratio against them measures the kept probability mass, not a policy change (TRL issue 6789)."
            )

    def _validate_routing_fields(self):
        if self.routing_replay and self.use_rollout_logprobs:
            raise ValueError(
                "GSPOConfig.routing_replay=True cannot be combined with use_rollout_logprobs=True: routing_replay (R2) "
                "replays the routing of the pi_old forward, which the rollout log-probs replace. Use "
                "rollout_routing_replay=True (R3), which replays the sampler's routing, or set routing_replay=False."
            )
        if self.routing_replay and not pi_old_pass_runs(self):
            raise ValueError(
                f"GSPOConfig.routing_replay=True with {self._schedule()}: every step is on-policy, so there is no "
                "pi_old pass and no routing to replay. Set steps_per_generation to a multiple > 1 of "
                "gradient_accumulation_steps (or num_iterations > 1), or routing_replay=False."
            )
        if self.rollout_routing_replay and self.use_vllm:
            raise ValueError(
                "GSPOConfig.rollout_routing_replay=True cannot be combined with use_vllm=True: it replays the routing "
                "recorded in transformers generation, and TRL's vLLM client does not pass vLLM's routed experts on "
                "(vLLM 0.31 returns them, with enable_return_routed_experts, only from its Model Runner V2, which needs "
                "Triton, i.e. a GPU; docs/MOE.md says what an engine adapter needs). Set use_vllm=False or "
                "rollout_routing_replay=False."
            )
        if self.rollout_routing_replay and self.use_transformers_continuous_batching:
            raise ValueError(
                "GSPOConfig.rollout_routing_replay=True cannot be combined with use_transformers_continuous_batching="
                "True: the routing is recorded from generate() on left-padded rows, and continuous batching schedules "
                "tokens of different requests into one forward. Set one of them to False."
            )

    def _validate_vllm_fields(self):
        if self.vllm_dtype not in VLLM_DTYPES:
            raise ValueError(
                f"GSPOConfig.vllm_dtype={self.vllm_dtype!r} is not supported; expected one of {VLLM_DTYPES}."
            )
        if self.vllm_dtype != "auto" and self.use_vllm and self.vllm_mode != "colocate":
            raise ValueError(
                f"GSPOConfig.vllm_dtype={self.vllm_dtype!r} sets the colocated engine's dtype; with vllm_mode="
                f"{self.vllm_mode!r} the server chooses its own (`trl vllm-serve --dtype {self.vllm_dtype}`). "
                "Leave vllm_dtype='auto'."
            )

    def _warn_on_unused_settings(self):
        """Warn (not refuse: a recipe override may set them harmlessly) about GSPO fields nothing reads."""
        unused = []
        if self.token_advantage_weight != 1.0 and self.importance_sampling_level != "sequence_token":
            unused.append(
                f"token_advantage_weight={self.token_advantage_weight} is only used with importance_sampling_level="
                f"'sequence_token', not {self.importance_sampling_level!r}"
            )
        if self.padding_free_row_tokens is not None and not self.padding_free:
            unused.append(f"padding_free_row_tokens={self.padding_free_row_tokens} needs padding_free=True")
        if self.rollout_logprobs_check_interval != ROLLOUT_LOGPROBS_CHECK_INTERVAL and not self.use_rollout_logprobs:
            unused.append(
                f"rollout_logprobs_check_interval={self.rollout_logprobs_check_interval} needs use_rollout_logprobs=True"
            )
        if self.vllm_dtype != "auto" and not self.use_vllm:
            unused.append(f"vllm_dtype={self.vllm_dtype!r} needs use_vllm=True")
        for message in unused:
            warnings.warn(f"GSPOConfig: {message}; it has no effect here.", GSPOUnusedSettingWarning, stacklevel=3)

    def _warn_on_suspicious_setup(self):
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if not self.is_sequence_level:
            if max(self.epsilon, eps_high) < GRPO_LIKE_EPSILON:
                warnings.warn(
                    f"GSPOConfig: epsilon={self.epsilon}, epsilon_high={eps_high} look like a sequence-level (GSPO) "
                    "clip range, but importance_sampling_level='token' clips each token's own ratio, which moves far "
                    "more: most tokens would be clipped after the first optimizer step of a rollout, a crippled GRPO "
                    f"baseline. Leave epsilon and epsilon_high unset for GRPOConfig's {GRPO_EPSILON}.",
                    GSPOClipRangeWarning,
                    stacklevel=3,
                )
            return
        # mixed_precision is set by bf16/fp16 or by the accelerate launch config
        fp16_is_float32 = self.mixed_precision == "fp16" and fp16_runs_in_float32(self.use_cpu)
        if fp16_is_float32:
            warnings.warn(
                "GSPOConfig: fp16 mixed precision on the CPU: accelerate enables fp16 autocast and its GradScaler "
                "only on an accelerator device, so this run computes in float32 and fp16 has no effect "
                "(docs/PRECISION.md).",
                GSPOPrecisionWarning,
                stacklevel=3,
            )
        if self.is_on_policy:
            warnings.warn(
                f"GSPOConfig: {self._schedule()} make every optimizer step on-policy: the sequence ratio is exactly "
                "1, clipping never fires and GSPO equals GRPO. To go off-policy set steps_per_generation to a "
                "multiple > 1 of gradient_accumulation_steps (the paper uses 4), or num_iterations > 1.",
                GSPOOnPolicyWarning,
                stacklevel=3,
            )
        elif self.mixed_precision == "bf16":
            warnings.warn(
                "GSPOConfig: bf16 mixed precision with an off-policy schedule: bf16 log-probs can get the sequence "
                f"log-ratio wrong by more than the clip band (epsilon={self.epsilon}) after one optimizer step, so "
                "rounding decides many clips. On a GPU pick float32 with TF32 off (bf16=False, tf32 unset; with "
                "accelerate launch also --mixed_precision no), the only precision measured inside eps_low/10; "
                "where that is too slow, fp16=True (the Trainer scales the loss) is several times more accurate "
                "than bf16 and flips fewer clip decisions, but is still not inside the band, nor is TF32. "
                "Measurements: docs/PRECISION.md.",
                GSPOPrecisionWarning,
                stacklevel=3,
            )
        elif self.mixed_precision == "fp16" and not fp16_is_float32:
            warnings.warn(
                "GSPOConfig: fp16 mixed precision with an off-policy schedule: fp16 log-probs are several times "
                "more accurate than bf16 but not enough: they can still get the sequence log-ratio wrong by as "
                f"much as the clip band (epsilon={self.epsilon}), most for short completions, so rounding still "
                "decides some clips. On a GPU, float32 with TF32 off (fp16=False, tf32 unset; with accelerate "
                "launch also --mixed_precision no) is the only precision measured inside eps_low/10; fp16 is the "
                "faster second choice, ahead of bf16. Measurements: docs/PRECISION.md.",
                GSPOPrecisionWarning,
                stacklevel=3,
            )
        if max(self.epsilon, eps_high) >= GRPO_LIKE_EPSILON:
            warnings.warn(
                f"GSPOConfig: epsilon={self.epsilon}, epsilon_high={eps_high} look like a GRPO (token-level) clip "
                f"range. The sequence ratio rarely leaves [1 - 0.05, 1 + 0.05], so this clip will almost never "
                f"fire; the paper uses {PAPER_EPSILON_LOW} / {PAPER_EPSILON_HIGH}.",
                GSPOClipRangeWarning,
                stacklevel=3,
            )


# --- A GRPOConfig handed to GSPOTrainer: which of its fields are kept, which take GSPO's defaults (the rule is
# docs/USAGE.md's), and the notice that says so.

# Batch-shape fields TRL derives from the others: carried only when the user chose them.
DERIVED_FIELDS = ("steps_per_generation", "generation_batch_size")


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
    if "epsilon" in kept or "epsilon_high" in kept:  # the clip range is one setting
        kept["epsilon"] = args.epsilon
        kept["epsilon_high"] = args.epsilon if args.epsilon_high is None else args.epsilon_high
    return kept


def upgrade_grpo_config(args: GRPOConfig) -> tuple[GSPOConfig, str]:
    """(the GSPOConfig for `args`, the notice naming the fields kept and the GSPO defaults taken)."""
    kept = user_set_fields(args)
    config = GSPOConfig(output_dir=args.output_dir, use_cpu=args.use_cpu, **kept)

    def listing(values: dict) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in sorted(values.items())) or "none"

    notice = (
        "GSPOTrainer got a GRPOConfig and turned it into a GSPOConfig. Kept, as you set them: "
        f"{listing(kept)}. Took GSPO's defaults: {listing(gspo_defaults_taken(args, config, kept))}. A field equal "
        "to GRPOConfig's default counts as not set; the clip range is kept as a pair when either bound was set. Pass "
        "a GSPOConfig to choose every value and silence this."
    )
    return config, notice


def gspo_defaults_taken(args: GRPOConfig, config: GSPOConfig, kept: dict) -> dict:
    """The fields the upgrade did not keep and where `config` differs from `args`: GSPO's defaults, fixed or resolved
    in __post_init__ (clip range, steps_per_generation, bf16), where they differ from GRPOConfig's. Not
    generation_batch_size, which TRL derives from steps_per_generation."""
    return {
        f.name: getattr(config, f.name)
        for f in fields(GRPOConfig)
        if f.init
        and f.name not in kept
        and f.name != "generation_batch_size"
        and getattr(config, f.name) != getattr(args, f.name)
    }
