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
IMPORTANCE_SAMPLING_LEVELS = ("sequence", GSPO_TOKEN_LEVEL, "token")
SEQUENCE_LEVELS = ("sequence", GSPO_TOKEN_LEVEL)
PAPER_EPSILON_LOW = 3e-4
PAPER_EPSILON_HIGH = 4e-4
PAPER_MINIBATCHES_PER_ROLLOUT = 4
# Above this a sequence-level clip range looks like a token-level (GRPO) one: the sequence ratio is a geometric
# mean over hundreds of tokens and moves far less than a token ratio, so such a clip never fires.
GRPO_LIKE_EPSILON = 0.05
ROLLOUT_LOGPROBS_CHECK_INTERVAL = 10  # GSPOConfig.rollout_logprobs_check_interval default
MAX_CONSECUTIVE_NONFINITE_REWARD_ROLLOUTS = 5  # GSPOConfig.max_consecutive_nonfinite_reward_rollouts default
# GSPOConfig.vllm_dtype values: "auto" is vLLM's own choice (TRL's colocate mode passes none)
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
# GSPOConfig.token_advantage values: how GSPO-token turns token rewards into the token component (formulas in
# trl_gspo.token_rewards, one function each in TOKEN_ADVANTAGE_FUNCTIONS)
TOKEN_ADVANTAGES = ("group_centred", "scaled", "marked_only", "position_baseline", "return_to_go")

# generation_kwargs that change the sampling distribution the rollout log-probs describe: transformers' generate
# (before SampledTokenLogProbs sees it) and vLLM's SamplingParams (min_tokens masks eos out of vLLM's processed
# log-probs: 1.3e-2 per token against a float32 trainer, docs/VLLM.md)
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


class GSPOOnPolicyWarning(UserWarning):
    """The configuration makes pi_old == pi_theta at every step: the ratio is 1 and GSPO equals GRPO."""


class GSPOPrecisionWarning(UserWarning):
    """Mixed-precision log-probs too coarse for the sequence clip band, or fp16 that has no effect on the CPU
    (see docs/PRECISION.md)."""


class GSPOClipRangeWarning(UserWarning):
    """A sequence-level clip range of GRPO's magnitude, which the sequence ratio never reaches."""


class GSPOUnusedSettingWarning(UserWarning):
    """A GSPO field set to a non-default value that the rest of the configuration never reads."""


@dataclass
class GSPOConfig(GRPOConfig):
    r"""
    Configuration for [`GSPOTrainer`]: every [`~trl.GRPOConfig`] field, with the GSPO paper's defaults.

    Defaults that differ from `GRPOConfig`, and why:

    - `importance_sampling_level="sequence"` (GRPOConfig: `"token"`): GSPO's length-normalised sequence ratio.
      `"sequence_token"` is GSPO-token (per-token advantages allowed), `"token"` plain GRPO for A/B runs.
    - `epsilon=3e-4`, `epsilon_high=4e-4` (GRPOConfig: 0.2 and 0.2): the paper's sequence clip range. The
      sequence ratio is a geometric mean over the tokens and moves orders of magnitude less than a token ratio.
    - `beta=0.0` (same as GRPOConfig, kept explicit): the paper trains without a KL term.
    - `loss_type="grpo"` (GRPOConfig: `"dapo"`): the only aggregation that is GSPO's: one weight per sequence,
      mean over sequences. Token-sum losses ("dapo", "bnpo", "dr_grpo") weight sequences by their length and
      are refused under a sequence-level ratio.
    - `bf16` left unset: True only where the accelerator supports bf16 (GRPOConfig: True unless fp16, which fails
      on a CPU-only machine without `use_cpu`); float32 on a CPU. See "Precision" in the README for why GSPO
      prefers float32 where it can.
    - `steps_per_generation = 4 * gradient_accumulation_steps` when neither it nor `generation_batch_size` is
      set (GRPOConfig: `gradient_accumulation_steps`): the paper splits each rollout batch into 4 minibatches,
      i.e. 4 optimizer steps per generation. On-policy (1 step per rollout) the ratio is exactly 1, clipping
      never fires, and GSPO reduces to GRPO.

    Parameters added by GSPO:

        log_ratio_bound (`float`, defaults to `10.0`):
            Clamp of the (length-normalised) log-ratio before `exp`, so it cannot overflow.
        token_advantage_weight (`float`, defaults to `1.0`):
            With token or span rewards under `"sequence_token"`, the weight of the group-normalised token component
            of the per-token advantage (formula in `trl_gspo.token_rewards`).
        token_advantage (`str`, defaults to `"group_centred"`):
            How GSPO-token forms that token component from the token rewards: `"group_centred"` (centred on the
            group's mean token reward), `"scaled"` (no centring), `"marked_only"` (only tokens a reward marked),
            `"position_baseline"` (centred per position across the group), `"return_to_go"` (each token credited
            with the token rewards from it to the end). Formulas in `trl_gspo.token_rewards`.
        vllm_importance_sampling_length_normalized (`bool`, defaults to `True`):
            With vLLM and a `"sequence_*"` `vllm_importance_sampling_mode`, correct for the engine/trainer
            mismatch with the geometric mean of the token ratios (GSPO's form) rather than TRL's product over
            all tokens, which collapses long sequences. `sampling/importance_sampling_ratio/*` then log these
            weights. With TRL's default `vllm_importance_sampling_clip_max=3`, `"sequence_mask"` drops only
            sequences whose mean per-token log-ratio exceeds ln 3 (1.1): precision mismatch stays orders of
            magnitude below (docs/VLLM.md), so it guards against gross disagreement and changes nothing else.
        log_routing_drift (`bool`, defaults to `True`):
            MoE models: log `moe/routing_drift/token_layer` and `moe/routing_drift/token_any_layer` (see
            docs/MOE.md). Ignored by dense models and when no pi_old pass runs (on-policy schedule).
        routing_replay (`bool`, defaults to `False`):
            MoE models: replay the pi_old pass's experts in the policy pass (R2), weights from the current router.
            Refused with an on-policy schedule here, and for a dense model by the trainer.
        rollout_routing_replay (`bool`, defaults to `False`):
            MoE models, transformers generation: replay the experts generate() chose (R3) in the pi_old and policy
            passes. Refused with vLLM, continuous batching, padding-free or rollout log-probs, on-policy schedules.

        padding_free (`bool`, defaults to `False`):
            Run every log-prob pass (policy, pi_old, reference) on packed rows without padding (trl_gspo/packing.py);
            same results as the padded path. Off by default: measured on CPU only (BENCHMARKS.md); on GPUs the dense
            block-diagonal sdpa mask is untested. Only model types measured exact when packed
            (trl_gspo.packing.PACKING_EXACT_MODEL_TYPES, docs/PACKING.md) with sdpa, eager or flash-attention; any
            other is refused when the trainer is built. For
            a MoE model with an aux loss, the policy pass packs each chunk into one row (the load-balancing loss then
            sees exactly the padded path's tokens) at the cost of attention quadratic in that row.
        padding_free_row_tokens (`int` or `None`, defaults to `None`):
            Token budget of one packed row; None uses the padded width of each batch.
        use_rollout_logprobs (`bool`, defaults to `False`):
            Use the log-probs computed while sampling as pi_old and skip the pi_old forward
            (trl_gspo/rollout_logprobs.py). Refused for on-policy schedules, continuous batching, repetition
            penalty and other distribution-changing generation settings, and, with vLLM, for its importance-sampling
            correction and for top-k/top-p truncation.
        rollout_logprobs_check_interval (`int`, defaults to `10`):
            Every this many rollouts, also run the pi_old forward and log the mismatch (gspo/rollout_logprobs/*).
        max_consecutive_nonfinite_reward_rollouts (`int`, defaults to `5`):
            Stop training (ValueError naming the reward functions) after this many consecutive rollouts in which no
            completion got a finite reward and some reward function returned NaN or +-inf. A single such rollout
            trains on (its advantages are 0); the current streak is logged as
            `gspo/consecutive_nonfinite_reward_rollouts`. Rollouts whose rewards are all `None` ("does not apply",
            TRL's contract) warn and train on, as in TRL, and never count.

    Refused at construction (`ValueError`) with a sequence-level ratio: a length-weighted or non-GSPO
    `loss_type`, `delta` (two-sided clip), `use_adaptive_entropy`, `top_entropy_quantile < 1` with plain
    `"sequence"` (use `"sequence_token"`), and a `"token_*"` vLLM importance-sampling mode with plain
    `"sequence"`. Everything else GRPOConfig offers works as in GRPOTrainer.
    """

    importance_sampling_level: str = field(
        default="sequence",
        metadata={
            "help": "'sequence' (GSPO, default), 'sequence_token' (GSPO-token, per-token advantages allowed) or "
            "'token' (plain GRPO, for A/B comparisons).",
        },
    )
    epsilon: float = field(
        default=PAPER_EPSILON_LOW, metadata={"help": "Lower clip range eps_low (paper: 3e-4 for GSPO)."}
    )
    epsilon_high: float | None = field(
        default=PAPER_EPSILON_HIGH, metadata={"help": "Upper clip range eps_high (paper: 4e-4 for GSPO)."}
    )
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; the paper uses none (0.0)."})
    loss_type: str = field(
        default="grpo",
        metadata={"help": "Aggregation. Under a sequence-level ratio only 'grpo' (mean over sequences) is GSPO."},
    )
    log_ratio_bound: float = field(
        default=DEFAULT_LOG_RATIO_BOUND,
        metadata={"help": "Clamp of the log importance ratio before exp, so it cannot overflow."},
    )
    token_advantage_weight: float = field(
        default=1.0,
        metadata={
            "help": "GSPO-token with token or span rewards: weight lambda of the group-normalised token component in "
            "A_it = A_i + lambda * (r_it - mu_g) / (sigma_g + 1e-4) (see trl_gspo.token_rewards). 0 ignores the "
            "token detail (the rewards' sums still count as sequence rewards)."
        },
    )
    token_advantage: str = field(
        default="group_centred",
        metadata={
            "help": "GSPO-token with token or span rewards: how the token component is formed, one of "
            + ", ".join(TOKEN_ADVANTAGES)
            + " (see trl_gspo.token_rewards)."
        },
    )
    vllm_importance_sampling_length_normalized: bool = field(
        default=True,
        metadata={
            "help": "With vLLM and a 'sequence_*' vllm_importance_sampling_mode, use the geometric mean of the token "
            "ratios (GSPO's form) instead of their product; sampling/importance_sampling_ratio/* log these weights. "
            "At TRL's default cap (vllm_importance_sampling_clip_max=3) 'sequence_mask' then drops only sequences "
            "whose mean per-token log-ratio exceeds ln 3, far beyond precision mismatch (docs/VLLM.md)."
        },
    )

    # --- padding-free passes (trl_gspo/packing.py) ---
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "Run every log-prob pass (policy, pi_old, reference) on the micro-batch's sequences packed without "
            "padding (position ids restarting per sequence, no attention mask) and unpack the results to the (B, T) "
            "layout. Only model types measured exact when packed (trl_gspo.packing.PACKING_EXACT_MODEL_TYPES, "
            "docs/PACKING.md); any other is refused when the trainer is built."
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
            "pi_old instead of running a separate pi_old forward."
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
        default=MAX_CONSECUTIVE_NONFINITE_REWARD_ROLLOUTS,
        metadata={
            "help": "Stop after this many consecutive rollouts with no finite reward in which some reward function "
            "returned NaN or inf (a bug, not 'does not apply'); one such rollout trains on with zero advantages. "
            "All-None rollouts (TRL: the reward does not apply) warn and never count."
        },
    )

    # MoE routing (trl_gspo/moe.py); no effect on dense models except routing_replay, which they refuse
    log_routing_drift: bool = field(
        default=True,
        metadata={
            "help": "MoE models: log moe/routing_drift/{token_layer,token_any_layer}, the fraction of completion "
            "(token, layer) pairs and of tokens whose top-k experts changed between the pi_old pass and the "
            "policy pass. Needs an off-policy schedule (there is no pi_old pass otherwise)."
        },
    )
    routing_replay: bool = field(
        default=False,
        metadata={
            "help": "MoE models: reuse the experts chosen in the pi_old pass in the policy pass (R2 routing replay), "
            "with the router's own forward computing the weights at those experts, so the router still learns. Refused "
            "for dense models, routers outside trl_gspo.moe.REPLAY_ROUTER_CLASSES, on-policy schedules, and with "
            "padding_free or use_rollout_logprobs."
        },
    )
    rollout_routing_replay: bool = field(
        default=False,
        metadata={
            "help": "MoE models, transformers generation: record the experts generate() chose for every token it fed "
            "(prompt prefill and cached decoding) and replay them in the pi_old and policy passes (R3, arXiv "
            "2510.11370); positions generation did not route (the last completion token, padding) take the pi_old "
            "pass's own routing, as with routing_replay. Same routers as routing_replay; refused with use_vllm, "
            "use_transformers_continuous_batching, padding_free, use_rollout_logprobs and on-policy schedules."
        },
    )

    # vLLM colocate engine (trl_gspo/vllm_cpu.py)
    vllm_dtype: str = field(
        default="auto",
        metadata={
            "help": "vllm_mode='colocate': dtype of the vLLM engine's weights and compute. 'auto' is TRL's behaviour "
            "(vLLM's choice: on a CPU it serves a float32 checkpoint in bfloat16, a training-inference mismatch); "
            "'float32' makes the engine's log-probs those of the float32 trainer. The server sets its own "
            "(`trl vllm-serve --dtype`)."
        },
    )

    def __post_init__(self):
        if self.bf16 is None and not self.fp16:  # GRPOConfig would pick bf16 even where the hardware has none
            self.bf16 = default_bf16(self.use_cpu)
        self._validate_gspo_fields()
        self._validate_padding_free_fields()
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

    @property
    def is_sequence_level(self) -> bool:
        return self.importance_sampling_level in SEQUENCE_LEVELS

    @property
    def is_on_policy(self) -> bool:
        """True when every optimizer step sees data from the current policy (TRL then skips pi_old)."""
        return not is_off_policy_schedule(self)

    def _validate_gspo_fields(self):
        level = self.importance_sampling_level
        if level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"GSPOConfig.importance_sampling_level={level!r} is not supported; expected one of "
                f"{IMPORTANCE_SAMPLING_LEVELS}: 'sequence' (GSPO), 'sequence_token' (GSPO-token), 'token' (GRPO)."
            )
        if not 0 < self.epsilon < 1:
            raise ValueError(f"GSPOConfig.epsilon={self.epsilon} must lie in (0, 1) (paper: {PAPER_EPSILON_LOW}).")
        if self.beta < 0:
            raise ValueError(f"GSPOConfig.beta={self.beta} must be >= 0 (0 disables the KL term).")
        if self.num_iterations < 1:
            raise ValueError(f"GSPOConfig.num_iterations={self.num_iterations} must be >= 1.")
        if not self.log_ratio_bound > 0:
            raise ValueError(f"GSPOConfig.log_ratio_bound={self.log_ratio_bound} must be > 0.")
        limit = self.max_consecutive_nonfinite_reward_rollouts
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(
                f"GSPOConfig.max_consecutive_nonfinite_reward_rollouts={limit!r} must be an integer >= 1: the "
                "number of consecutive rollouts without any finite reward (NaN or inf returned) that stops training."
            )
        if not (math.isfinite(self.token_advantage_weight) and self.token_advantage_weight >= 0):
            raise ValueError(
                f"GSPOConfig.token_advantage_weight={self.token_advantage_weight} must be a finite number >= 0."
            )
        if self.token_advantage not in TOKEN_ADVANTAGES:
            raise ValueError(
                f"GSPOConfig.token_advantage={self.token_advantage!r} must be one of {', '.join(TOKEN_ADVANTAGES)}."
            )
        if level not in SEQUENCE_LEVELS:
            return  # plain GRPO: TRL's own loss and checks apply

        if self.epsilon_high is not None and not 0 < self.epsilon_high < 1:
            raise ValueError(
                f"GSPOConfig.epsilon_high={self.epsilon_high} must lie in (0, 1) with importance_sampling_level="
                f"{level!r} (paper: {PAPER_EPSILON_HIGH})."
            )
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

    def _validate_padding_free_fields(self):
        if self.padding_free_row_tokens is not None and self.padding_free_row_tokens < 1:
            raise ValueError(
                f"GSPOConfig.padding_free_row_tokens={self.padding_free_row_tokens} must be a positive number of "
                "tokens, or None (the padded width of each batch)."
            )

    def _validate_rollout_logprobs_fields(self):
        if self.rollout_logprobs_check_interval < 0:
            raise ValueError(
                f"GSPOConfig.rollout_logprobs_check_interval={self.rollout_logprobs_check_interval} must be >= 0 "
                "(0: never recompute pi_old to check the rollout log-probs)."
            )
        if not self.use_rollout_logprobs:
            return
        refuse = "GSPOConfig.use_rollout_logprobs=True"
        if self.is_on_policy:
            raise ValueError(
                f"{refuse} replaces the pi_old forward, which this on-policy schedule (gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}, steps_per_generation={self.steps_per_generation}, "
                f"num_iterations={self.num_iterations}) does not run: pi_old is the detached current policy."
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
        """Replay needs a pi_old pass to record (refused when every step is on-policy) and the padded layout; R3
        needs the transformers generate() path, the one whose routing is recorded."""
        for replay in ("routing_replay", "rollout_routing_replay"):
            if not getattr(self, replay):
                continue
            if not pi_old_pass_runs(self):
                raise ValueError(
                    f"GSPOConfig.{replay}=True with gradient_accumulation_steps={self.gradient_accumulation_steps}, "
                    f"steps_per_generation={self.steps_per_generation}, num_iterations={self.num_iterations}: every "
                    "step is on-policy, TRL runs no pi_old pass and there is no routing to replay. Set "
                    "steps_per_generation to a multiple > 1 of gradient_accumulation_steps (or num_iterations > 1), or "
                    f"{replay}=False."
                )
            for switch in ("use_rollout_logprobs", "padding_free"):
                if getattr(self, switch):
                    why = (
                        "there is no pi_old forward whose routing could be recorded"
                        if switch == "use_rollout_logprobs"
                        else "the routing record is kept in the padded (B, L) layout, which packed passes do not have"
                    )
                    raise ValueError(
                        f"GSPOConfig.{replay}=True cannot be combined with {switch}=True: {why}. Set one of them "
                        "to False."
                    )
        if self.rollout_routing_replay and self.use_vllm:
            raise ValueError(
                "GSPOConfig.rollout_routing_replay=True cannot be combined with use_vllm=True: it replays the routing "
                "recorded in transformers generation. vLLM 0.31 returns the routed experts "
                "(enable_return_routed_experts) only with its Model Runner V2, which needs Triton, i.e. a GPU; this "
                "project runs vLLM on CPU only (no CUDA vLLM wheel fits its GPU test machines) and TRL's vLLM client "
                "does not pass routed experts on, so that path is untested (docs/MOE.md says what an engine adapter "
                "needs). Set use_vllm=False or rollout_routing_replay=False."
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
        if self.token_advantage != TOKEN_ADVANTAGES[0] and self.importance_sampling_level != "sequence_token":
            unused.append(
                f"token_advantage={self.token_advantage!r} is only used with importance_sampling_level="
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
        if not self.is_sequence_level:
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
                f"GSPOConfig: gradient_accumulation_steps={self.gradient_accumulation_steps}, steps_per_generation="
                f"{self.steps_per_generation}, num_iterations={self.num_iterations} make every optimizer step "
                "on-policy: the sequence ratio is exactly 1, clipping never fires and GSPO equals GRPO. To go "
                "off-policy set steps_per_generation to a multiple > 1 of gradient_accumulation_steps (the paper "
                "uses 4), or num_iterations > 1.",
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
        eps_high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if max(self.epsilon, eps_high) >= GRPO_LIKE_EPSILON:
            warnings.warn(
                f"GSPOConfig: epsilon={self.epsilon}, epsilon_high={eps_high} look like a GRPO (token-level) clip "
                f"range. The sequence ratio rarely leaves [1 - 0.05, 1 + 0.05], so this clip will almost never "
                f"fire; the paper uses {PAPER_EPSILON_LOW} / {PAPER_EPSILON_HIGH}.",
                GSPOClipRangeWarning,
                stacklevel=3,
            )

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> GSPOConfig:
        """A GSPOConfig that keeps every field the user set in `args` and takes GSPO's defaults elsewhere.

        The rule (`upgrade_grpo_config` below): a field counts as set when it differs from GRPOConfig's default; the
        clip range is kept as a pair (epsilon with epsilon_high, which defaults to epsilon in GRPOConfig) when
        either bound was set, else both take GSPO's 3e-4 / 4e-4.
        """
        return upgrade_grpo_config(args)[0]


# --- A GRPOConfig handed to GSPOTrainer: which of its fields are kept, which take GSPO's defaults, the notice.
# The rule (also in README.md, "Use it from Python"):
# - a field counts as set by the user when it differs from GRPOConfig's default (a dataclass does not record which
#   arguments were passed, so a value set on purpose to GRPOConfig's default counts as not set); set fields are kept;
# - the clip range is one setting: when epsilon or epsilon_high was set, both are kept as GRPOConfig means them
#   (epsilon_high=None is epsilon); when neither was, both take GSPO's 3e-4 / 4e-4;
# - every other field takes GSPOConfig's default; the notice names the ones where that differs from GRPOConfig's.

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
