"""Every key GSPOTrainer logs, with its definition: the registry `METRICS`, and the name constants the loggers use.

A key GRPOTrainer logs keeps GRPOTrainer's definition (origin "TRL"), so that one dashboard key means one thing in a
GRPO and a GSPO run; GSPO's own statistics carry their own prefixes (origin "GSPO"): `gspo/` for the objective and
the rollout log-probs, `moe/`, `diversity/`, `length/`, `signal/`, `token_rewards/`. Keys of the Trainer itself have
origin "transformers". In evaluation every key is logged with the `eval_` prefix; reward functions may log their own
names through TRL's `log_metric`.

A registry key is either exact, or a pattern: `{a,b}` stands for each alternative (`gspo/seq_ratio/{min,max}` is two
keys), `<name>` for any one path segment (a reward function's name). The documentation's metrics page
(docs/reference/metrics.md) is `markdown_table()` of each origin, generated when the site is built.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

GSPO, TRL, TRANSFORMERS = "GSPO", "TRL", "transformers"

# --- GSPO's own keys ---------------------------------------------------------------------------------------------------
GSPO_CLIP_LOW_MEAN = "gspo/clip_ratio/low_mean"
GSPO_CLIP_HIGH_MEAN = "gspo/clip_ratio/high_mean"
GSPO_CLIP_REGION_MEAN = "gspo/clip_ratio/region_mean"
GSPO_CLIP_LOW_MIN = "gspo/clip_ratio/low_min"
GSPO_CLIP_HIGH_MAX = "gspo/clip_ratio/high_max"
CLIPPED_TOKEN_FRACTION = "gspo/clipped_token_fraction"
SEQ_RATIO_MEAN = "gspo/seq_ratio/mean"
SEQ_RATIO_STD = "gspo/seq_ratio/std"
SEQ_RATIO_MIN = "gspo/seq_ratio/min"
SEQ_RATIO_MAX = "gspo/seq_ratio/max"
FIRST_STEP_OUTSIDE_CLIP_BAND = "gspo/first_step_outside_clip_band"
ROLLOUT_LOGPROBS_PREFIX = "gspo/rollout_logprobs"
CONSECUTIVE_NONFINITE_REWARD_ROLLOUTS = "gspo/consecutive_nonfinite_reward_rollouts"
TOKEN_REWARD_COMPONENT_ABS_MEAN = "token_rewards/component_abs_mean"
ROUTING_DRIFT_PREFIX = "moe/routing_drift"
ROLLOUT_ROUTING_MISMATCH_PREFIX = "moe/rollout_routing_mismatch"

# --- GRPOTrainer's keys that GSPO's loss logs itself, with GRPOTrainer's definitions ----------------------------------
CLIP_LOW_MEAN = "clip_ratio/low_mean"
CLIP_HIGH_MEAN = "clip_ratio/high_mean"
CLIP_REGION_MEAN = "clip_ratio/region_mean"
CLIP_LOW_MIN = "clip_ratio/low_min"
CLIP_HIGH_MAX = "clip_ratio/high_max"
ENTROPY = "entropy"
KL = "kl"
AUX_LOSS = "aux_loss"
POLICY_LOSS = "policy_loss"
ENTROPY_COEF = "entropy_coef"
IMPORTANCE_SAMPLING_RATIO = "sampling/importance_sampling_ratio"
SAMPLING_LOGP_DIFFERENCE = "sampling/sampling_logp_difference"

_SEQUENCE_LEVELS = 'at the sequence levels ("sequence", "sequence_token"), every micro-batch'
_CLIPPED = (
    "clipped: the ratio gets no gradient, s_i below 1 - eps_low with A < 0 (low) or above 1 + eps_high with A > 0 "
    "(high), or log s_i at -+log_ratio_bound with A != 0"
)
_IN_THE_LOSS = "non-empty, and not given weight 0 by the off-policy mask or a masked importance weight"
_TRL_SEQUENCE = (
    'as GRPOTrainer with importance_sampling_level="sequence" computes it for the same micro-batch; at "token" '
    "GRPOTrainer's own loss logs it (token fractions)"
)
_TRL_FLAGS = "s_i < 1 - eps_low with A < 0 (low), s_i > 1 + eps_high with A > 0 (high), whatever the weights"


@dataclass(frozen=True)
class Metric:
    """One logged key (or key pattern, module docstring), its origin, when it is logged, and what it measures."""

    key: str
    origin: str
    logged: str
    definition: str


METRICS: tuple[Metric, ...] = (
    # the objective (trl_gspo/objective.py)
    Metric(
        "gspo/clip_ratio/{low,high}_mean",
        GSPO,
        _SEQUENCE_LEVELS,
        f"fraction of the sequences in the loss ({_IN_THE_LOSS}) that are clipped on that side ({_CLIPPED}); "
        "GSPO-token: the mean over those sequences of their fraction of clipped tokens of non-zero weight",
    ),
    Metric(GSPO_CLIP_REGION_MEAN, GSPO, _SEQUENCE_LEVELS, "gspo/clip_ratio/low_mean + gspo/clip_ratio/high_mean"),
    Metric(
        "gspo/clip_ratio/{low_min,high_max}",
        GSPO,
        f"{_SEQUENCE_LEVELS} with a sequence in the loss",
        "smallest low-clipped / largest high-clipped fraction over the sequences in the loss (0 or 1 under GSPO)",
    ),
    Metric(
        CLIPPED_TOKEN_FRACTION,
        GSPO,
        _SEQUENCE_LEVELS,
        "clipped tokens over the tokens in the loss: the paper's count (a clipped GSPO sequence clips all its tokens)",
    ),
    Metric(
        "gspo/seq_ratio/{mean,std,min,max}",
        GSPO,
        f"{_SEQUENCE_LEVELS} with a non-empty sequence",
        "the sequence importance ratio s_i over the non-empty sequences (std: population): how far the policy moved",
    ),
    Metric(
        FIRST_STEP_OUTSIDE_CLIP_BAND,
        GSPO,
        "at the sequence levels, training micro-steps before the rollout's first optimizer step",
        "fraction of the non-empty sequences whose s_i is outside [1 - eps_low, 1 + eps_high] whatever A: 0 with a "
        "recomputed pi_old (anything else is rounding, not learning); with use_rollout_logprobs the engine's mismatch",
    ),
    # the rollout log-probs as pi_old (trl_gspo/rollout_logprobs.py)
    Metric(
        f"{ROLLOUT_LOGPROBS_PREFIX}/{{seq_abs_log_ratio_mean,seq_abs_log_ratio_max}}",
        GSPO,
        "use_rollout_logprobs, every rollout_logprobs_check_interval-th rollout (its pi_old then recomputed)",
        "mean / max over the sequences of abs(log-ratio) between the recomputed pi_old and the rollout log-probs "
        "(length-normalised: the log s_i of the rollout's first step)",
    ),
    Metric(
        f"{ROLLOUT_LOGPROBS_PREFIX}/outside_clip_band",
        GSPO,
        "use_rollout_logprobs, at each check",
        "fraction of the sequences whose recomputed-vs-rollout log-ratio leaves [log(1 - eps_low), log(1 + eps_high)]",
    ),
    Metric(
        f"{ROLLOUT_LOGPROBS_PREFIX}/clip_band_log_high",
        GSPO,
        "use_rollout_logprobs, at each check",
        "log(1 + eps_high), to read the two statistics above against",
    ),
    Metric(
        f"{ROLLOUT_LOGPROBS_PREFIX}/fallback",
        GSPO,
        "use_rollout_logprobs, at each check",
        "1 when a rollout lacked some log-probs and its pi_old came from the forward, else 0",
    ),
    # rewards (trl_gspo/token_rewards.py)
    Metric(
        CONSECUTIVE_NONFINITE_REWARD_ROLLOUTS,
        GSPO,
        "every rollout",
        "rollouts in a row, up to this one, without any finite reward and with NaN or inf among them; training stops "
        "at max_consecutive_nonfinite_reward_rollouts",
    ),
    Metric(
        TOKEN_REWARD_COMPONENT_ABS_MEAN,
        GSPO,
        'importance_sampling_level="sequence_token", every rollout',
        "mean abs(token component) of the per-token advantages over the loss tokens of all processes (0 without token "
        "rewards)",
    ),
    # MoE routing (trl_gspo/moe.py)
    Metric(
        f"{ROUTING_DRIFT_PREFIX}/token_layer",
        GSPO,
        "MoE models with log_routing_drift, every micro-batch",
        "fraction of (completion token, MoE layer) pairs whose top-k expert set in the policy pass differs from the "
        "pi_old pass (natural routing, also under replay)",
    ),
    Metric(
        f"{ROUTING_DRIFT_PREFIX}/token_any_layer",
        GSPO,
        "MoE models with log_routing_drift, every micro-batch",
        "fraction of completion tokens whose expert set differs in at least one layer",
    ),
    Metric(
        f"{ROLLOUT_ROUTING_MISMATCH_PREFIX}/{{token_layer,token_any_layer}}",
        GSPO,
        "rollout_routing_replay, every pi_old pass",
        "as moe/routing_drift/*, between the trainer's own pi_old routing and generation's",
    ),
    # per-rollout diagnostics (trl_gspo/diagnostics.py)
    Metric(
        "diversity/distinct_fraction",
        GSPO,
        "every rollout",
        "distinct completions per group / G, mean over groups; 1/G: the group collapsed",
    ),
    Metric(
        "diversity/distinct_2",
        GSPO,
        "every rollout",
        "distinct token bigrams / all token bigrams of a group's completions, mean over groups",
    ),
    Metric("length/group_mean", GSPO, "every rollout", "mean completion length in tokens, mean over groups"),
    Metric(
        "length/group_std",
        GSPO,
        "every rollout",
        "population std of the completion lengths inside a group, mean over groups",
    ),
    Metric(
        "signal/zero_variance_groups",
        GSPO,
        "every rollout",
        "share of groups whose scorable rewards are all equal (no advantage: exact, frac_reward_zero_std has a "
        "tolerance)",
    ),
    # GRPOTrainer's keys, logged by GSPO's loss with GRPOTrainer's definitions (tests/trainer/test_metrics.py)
    Metric(
        "clip_ratio/{low,high,region}_mean",
        TRL,
        "every micro-batch",
        f"{_TRL_SEQUENCE}: flags {_TRL_FLAGS}, region = either, averaged over every row of the micro-batch (empty and "
        "masked-out rows included), over the completion tokens when advantages are per token",
    ),
    Metric(
        "clip_ratio/{low_min,high_max}",
        TRL,
        "every micro-batch",
        f"{_TRL_SEQUENCE}: min of the low / max of the high flags over every row (per-token advantages: each row's "
        "token mean of the flags)",
    ),
    Metric(ENTROPY, TRL, "every micro-batch", "token mean of the policy's entropy over the completion tokens"),
    Metric(
        KL,
        TRL,
        "beta != 0, every micro-batch",
        "token mean of the k3 estimate of KL(pi_theta, pi_ref); with use_bias_correction_kl times s_i at the "
        "sequence levels (GRPOTrainer's sequence level; GSPO's loss uses the token's own ratio), the token ratio at "
        '"token"',
    ),
    Metric(AUX_LOSS, TRL, "MoE router aux loss on, every micro-batch", "the router load-balancing loss"),
    Metric(
        POLICY_LOSS,
        TRL,
        "entropy bonus on, every micro-batch",
        "the loss before the entropy bonus and the accumulation scaling, mean over processes",
    ),
    Metric(ENTROPY_COEF, TRL, "entropy bonus on, every optimizer step", "the entropy bonus coefficient"),
    Metric("cispo_clip_ratio", TRL, 'at "token" with loss_type "cispo"', "GRPOTrainer's CISPO clip fraction"),
    Metric("vespo/phi_seq_mean", TRL, 'at "token" with loss_type "vespo"', "GRPOTrainer's VESPO weight mean"),
    Metric("reward", TRL, "every rollout", "mean weighted total reward over the completions"),
    Metric("reward_std", TRL, "every rollout", "std of the weighted total reward"),
    Metric("frac_reward_zero_std", TRL, "every rollout", "share of groups whose reward std is (near) 0"),
    Metric("rewards/<name>/{mean,std}", TRL, "every rollout", "mean and std of one reward function's rewards"),
    Metric(
        "completions/{mean,min,max}_length",
        TRL,
        "every rollout",
        "completion length in tokens over the completions",
    ),
    Metric(
        "completions/{mean,min,max}_terminated_length",
        TRL,
        "every rollout",
        "the same over the completions that ended with EOS",
    ),
    Metric("completions/clipped_ratio", TRL, "every rollout", "share of completions cut at max_completion_length"),
    Metric("num_tokens", TRL, "every rollout", "prompt and completion tokens seen so far"),
    Metric("step_time", TRL, "every optimizer step in training", "seconds of the optimizer step's micro-steps"),
    Metric(
        "tools/{call_frequency,failure_frequency}",
        TRL,
        "with tools, every rollout",
        "tool calls per completion; the share of them that failed",
    ),
    Metric(
        f"{SAMPLING_LOGP_DIFFERENCE}/{{mean,max}}",
        TRL,
        "vLLM importance correction, every rollout",
        "abs(trainer pi_old - engine log-prob) over the completion tokens",
    ),
    Metric(
        f"{IMPORTANCE_SAMPLING_RATIO}/{{min,mean,max}}",
        TRL,
        "vLLM importance correction, every rollout",
        "the engine-vs-trainer importance weights the loss applies; with vllm_importance_sampling_length_normalized "
        "(sequence modes) those are GSPO's length-normalised weights, over the non-empty sequences",
    ),
    Metric("{loss,grad_norm,learning_rate,epoch}", TRANSFORMERS, "every logging step", "the Trainer's own"),
    Metric(
        "{train_runtime,train_samples_per_second,train_steps_per_second,total_flos,train_loss}",
        TRANSFORMERS,
        "end of training",
        "the Trainer's summary",
    ),
)

_ALTERNATIVES = re.compile(r"\{([^{}]*)\}")
_PLACEHOLDER = re.compile(r"<[a-z_]+>")


def expand(pattern: str) -> list[str]:
    """The keys a registry pattern stands for, `{a,b}` expanded (a `<name>` segment is left as it is)."""
    parts = _ALTERNATIVES.split(pattern)  # literal, alternatives, literal, ...
    choices = [[part] if i % 2 == 0 else part.split(",") for i, part in enumerate(parts)]
    return ["".join(combination) for combination in itertools.product(*choices)]


def _matcher(pattern: str) -> re.Pattern:
    return re.compile("|".join(_PLACEHOLDER.sub("[^/]+", re.escape(key)) for key in expand(pattern)))


def find(key: str) -> Metric | None:
    """The registry entry of a logged key (its `eval_` prefix stripped), or None."""
    key = key.removeprefix("eval_")
    return next((metric for metric in METRICS if _matcher(metric.key).fullmatch(key)), None)


def keys(origin: str) -> list[str]:
    """Every key (patterns expanded, `<name>` kept) of one origin, in registry order."""
    return [key for metric in METRICS if metric.origin == origin for key in expand(metric.key)]


def markdown_table(origin: str = GSPO) -> str:
    """The registry's entries of one origin as a Markdown table (the documentation's metrics page)."""
    rows = ["| metric | logged | definition |", "|---|---|---|"]
    for metric in METRICS:
        if metric.origin == origin:
            rows.append(f"| `{metric.key}` | {metric.logged} | {metric.definition} |")
    return "\n".join(rows)
