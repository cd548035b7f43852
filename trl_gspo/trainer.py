"""GSPOTrainer: TRL's GRPOTrainer with GSPO's sequence-level importance ratio and clipping.

The trainer overrides one method for the algorithm, `_compute_loss`, and two for checkpoints (the rollout buffer
is saved, so a resume inside a rollout is exact). Generation, rewards, advantages, batching, pi_old and
reference log-probs, vLLM, PEFT, DeepSpeed/FSDP and checkpointing are GRPOTrainer's; the features below wrap a
few of its methods thinly (each calls GRPOTrainer's and delegates to its own module). With
`importance_sampling_level="token"` the override hands the micro-batch to GRPOTrainer's own loss (plain GRPO).

Token and span rewards (trl_gspo.token_rewards) and the rollout diagnostics (trl_gspo.diagnostics) add two thin
overrides: `_calculate_rewards` (token-level outputs taken out, every reward checked) and
`_generate_and_score_completions` (super(), then (B, T) advantages for GSPO-token and the diagnostics).

What `_compute_loss` keeps from GRPOTrainer, so nothing is dropped silently (TRL issue 6807): tool-token
masking, the entropy mask (GSPO-token), the off-policy sequence mask, vLLM importance correction (length-
normalised by default), the KL term with per-token importance correction, the fixed entropy bonus, the MoE
router aux loss, and gradient-accumulation scaling. What it refuses is refused by GSPOConfig at construction.

Speed options (off by default), each in its own module with the trainer as glue:
- `padding_free` (trl_gspo/packing.py): `_get_per_token_logps_and_entropies` runs every log-prob pass (policy,
  pi_old, reference) on packed rows without padding and unpacks to the (B, T) layout.
- `use_rollout_logprobs` (trl_gspo/rollout_logprobs.py): `_generate_single_turn` records the sampled tokens'
  log-probs under transformers generation, `_generate` keeps them, and the pi_old pass of
  `_generate_and_score_completions` is answered with them instead of a forward (checked every
  `rollout_logprobs_check_interval` rollouts).

MoE models (trl_gspo/moe.py, the `_moe_*` methods): generation runs with the config's `output_router_logits` off
(it crashes cached decoding on padded batches); hooks on the routers record the routing in the pi_old pass
(`_get_per_token_logps_and_entropies`, armed by `_generate_and_score_completions`), and the policy pass
(`compute_loss`) logs the routing drift and, with `routing_replay`, replays it until `training_step`'s backward
has finished.
"""

from __future__ import annotations

import contextlib
import inspect
import textwrap
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer

from .banner import distributed_backend, start_banner
from .config import GSPOConfig
from .diagnostics import rollout_diagnostics
from .grpo_upgrade import upgrade_grpo_config
from .moe import ROUTING_KEY, RouterHooks, drift_fractions, find_routers, router_logits_off, routing_drift_counts
from .objective import compute_policy_objective, length_normalized_is_weight
from .packing import packed_logps_and_entropies, packing_support_problem
from .rollout_buffer import load_rollout_buffer
from .rollout_logprobs import (
    SampledTokenLogProbs,
    pad_rollout_logprobs,
    recording_generate,
    rollout_mismatch,
    sequence_log_ratios,
)
from .token_rewards import (
    TokenRewardCollector,
    check_token_reward_level,
    no_finite_reward_message,
    non_finite_warning,
    token_advantage_component,
)

logger = logging.get_logger(__name__)

# The private GRPOTrainer API this module relies on: name -> parameters it must accept. trl is pinned to the
# minor version these were read from; `check_trl_private_api` fails loudly if an upgrade moved them.
TRL_PRIVATE_API = {
    "_compute_loss": ("model", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "compute_entropy",
        "compute_aux_loss",
    ),
    "get_high_entropy_mask": ("entropies", "mask", "threshold"),
    "_save_checkpoint": ("model", "trial"),
    "_generate": ("prompts",),
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
    "_generate_and_score_completions": ("inputs",),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "get_off_policy_mask": (
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ),
    # token/span rewards, reward checks and rollout diagnostics (also read: _tokenizer, reward_weights, _metrics)
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    # MoE routing (trl_gspo/moe.py): the policy pass's backward clears the replay state
    "training_step": ("model", "inputs", "num_items_in_batch"),
}

# Saved in each checkpoint folder, one per rank: the rollout the run is in the middle of.
ROLLOUT_BUFFER_FILE = "gspo_rollout_buffer_rank{rank}.pt"

# Batch keys GRPOTrainer forwards to the model for vision-language inputs; passed through unchanged.
_MODEL_INPUT_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


def check_trl_private_api(trainer_cls: type = GRPOTrainer) -> None:
    """Raise RuntimeError naming every private GRPOTrainer method GSPOTrainer needs that is missing or changed."""
    problems = []
    for name, params in TRL_PRIVATE_API.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            problems.append(f"{trainer_cls.__name__}.{name} is gone")
            continue
        signature = inspect.signature(method).parameters
        missing = [p for p in params if p not in signature]
        if missing:
            problems.append(f"{trainer_cls.__name__}.{name} no longer takes {missing}")
    if problems:
        import trl

        raise RuntimeError(
            f"trl_gspo was written against trl 1.16 and relies on private GRPOTrainer methods; with trl "
            f"{trl.__version__}: " + "; ".join(problems) + ". Install trl>=1.16,<1.17."
        )


class GSPOTrainer(GRPOTrainer):
    """Group Sequence Policy Optimization (Zheng et al., 2025) on TRL's GRPOTrainer.

    Takes exactly GRPOTrainer's arguments and is a drop-in replacement for it. `args` may be a GSPOConfig, a
    GRPOConfig (upgraded by trl_gspo.grpo_upgrade: fields that differ from GRPOConfig's defaults are kept, the clip
    range as a pair, the rest take GSPO's defaults; a warning names both lists) or None (GSPOConfig defaults).
    Overrides `_compute_loss` for the algorithm, `_save_checkpoint` and `_load_optimizer_and_scheduler` for exact
    resumes, and, for the speed options only, `_get_per_token_logps_and_entropies`, `_generate_single_turn`,
    `_generate` and `_generate_and_score_completions` (thin wrappers that call GRPOTrainer's); every private method
    used is listed in TRL_PRIVATE_API. See the module docstring. Prints one start line on the main process (world
    size, backend, mixed precision, GSPO settings: trl_gspo/banner.py) and logs every metric GRPOTrainer logs for
    the same configuration.

    Reward functions may also return token-level rewards (span lists or per-token lists, `trl_gspo.token_rewards`),
    which become (B, T) advantages for GSPO-token (`importance_sampling_level="sequence_token"`); plain reward
    functions work unchanged next to them. For that, and for the checks on every reward (NaN and inf warned once
    per function, a run that keeps producing no finite reward stopped), `_calculate_rewards` and `_generate_and_score_completions`
    are overridden thinly (see `_score_token_rewards`, `_log_rollout_diagnostics`). Private GRPOTrainer attributes
    read besides TRL_PRIVATE_API: `_tokenizer`, `reward_weights`, `_metrics`.

    MoE models: `_generate_and_score_completions`, `_get_per_token_logps_and_entropies`, `compute_loss` and
    `training_step` also carry the routing glue (drift metric, routing replay; trl_gspo/moe.py).
    """

    _tag_names = ["trl", "gspo", "trl-gspo"]
    _name = "GSPO"
    _paper = {
        "title": "Group Sequence Policy Optimization",
        "id": "2507.18071",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{zheng2025group,
                title        = {{Group Sequence Policy Optimization}},
                author       = {Chujie Zheng and Shixuan Liu and Mingze Li and Xiong-Hui Chen and Bowen Yu and Chang Gao and Kai Dang and Yuqiong Liu and Rui Men and An Yang and Jingren Zhou and Junyang Lin},
                year         = 2025,
                eprint       = {arXiv:2507.18071},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *posargs, **kwargs):
        check_trl_private_api()
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = GSPOConfig(f"{str(model_name).split('/')[-1]}-GSPO")
        elif not isinstance(args, GSPOConfig):
            args, notice = upgrade_grpo_config(args)  # the rule: trl_gspo/grpo_upgrade.py
            logger.warning(notice)
        check_token_reward_level(reward_funcs, args.importance_sampling_level)
        super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        self._check_padding_free_supported()
        self._pending_rollout_logprobs = None  # rollout log-probs waiting for the pi_old pass they replace
        self.packed_layout = None  # (PackedBatch, start) of the latest padding-free forward
        self._rollouts_seen = 0
        self._non_finite_reward_warned = set()  # reward function names already warned about NaN/inf
        self._nonfinite_reward_streak = 0  # consecutive rollouts without a finite reward, NaN or inf among them
        self._nonfinite_reward_names = set()  # the reward functions that returned NaN or inf during that streak
        self._moe_setup_routing()
        self._print_start_banner()

    def _print_start_banner(self):
        """Once, on the main process: world size, backend, mixed precision and GSPO settings (trl_gspo/banner.py)."""
        if self.accelerator.is_main_process:
            backend = distributed_backend(self.accelerator)
            world = self.accelerator.num_processes
            print(start_banner(world, backend, self.accelerator.mixed_precision, self.args), flush=True)

    def _save_checkpoint(self, model, trial):
        """Also save this rank's buffered rollout, so that a resume inside a rollout continues it exactly.

        GRPOTrainer keeps one generation batch for steps_per_generation * num_iterations micro-steps and does not
        checkpoint it: a run resumed mid-rollout would generate a new batch from a newer policy.
        """
        super()._save_checkpoint(model, trial)
        if self._buffered_inputs is None:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self._buffered_inputs, folder / ROLLOUT_BUFFER_FILE.format(rank=self.accelerator.process_index))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Restore the buffered rollout and the micro-step counter that indexes into it (see _save_checkpoint)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / ROLLOUT_BUFFER_FILE.format(rank=self.accelerator.process_index)
        if path.is_file():
            # weights_only=True: a checkpoint written elsewhere must not run code (trl_gspo/rollout_buffer.py)
            self._buffered_inputs = load_rollout_buffer(path, self.accelerator.device)
            self._step = self.state.global_step * self.args.gradient_accumulation_steps

    # --- padding-free log-prob passes (trl_gspo/packing.py) ---

    def _check_padding_free_supported(self):
        """With args.padding_free, refuse at construction a model whose passes cannot be packed (never a wrong result)."""
        if not self.args.padding_free:
            return
        models = [("model", self.accelerator.unwrap_model(self.model))]
        if self.ref_model is not None:
            models.append(("ref_model", self.accelerator.unwrap_model(self.ref_model)))
        for name, candidate in models:
            base = candidate.get_base_model() if hasattr(candidate, "get_base_model") else candidate
            problem = packing_support_problem(base)
            if problem:
                raise ValueError(
                    f"GSPOConfig.padding_free=True cannot be used with this {name}: {problem}. Set padding_free=False."
                )

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **model_inputs,
    ):
        """GRPOTrainer's log-prob pass; with args.padding_free, on packed rows (same (B, T) outputs, no padding).

        Used by every pass: the policy (in _compute_loss), pi_old and the reference (in GRPOTrainer's
        _generate_and_score_completions).
        """
        if self._moe_record_armed and model is self.model:
            return self._moe_recorded_pass(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **model_inputs,
            )
        if self._pending_rollout_logprobs is not None and model is self.model and not compute_entropy:
            return self._rollout_logprobs_as_pi_old(
                model, input_ids, attention_mask, logits_to_keep, batch_size, **model_inputs
            )
        if not self.args.padding_free:
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **model_inputs,
            )
        extra = sorted(key for key, value in model_inputs.items() if value is not None)
        if extra:  # vision-language inputs are refused at construction; never drop them silently
            raise ValueError(f"GSPOConfig.padding_free=True cannot pack a batch with model inputs {extra}.")
        return packed_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=batch_size,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            max_row_tokens=self.args.padding_free_row_tokens,
            autocast=self.accelerator.autocast,
            on_pack=self._remember_packing,
        )

    def _remember_packing(self, packed, start):
        """Keep the layout of the latest packed forward: `self.packed_layout = (PackedBatch, first sequence index)`.

        It stays until the next packed forward, i.e. through the backward of the policy pass (gradient
        checkpointing recomputes the layers there); per-token hooks use `PackedBatch.token_index` to map packed
        positions back to the (B, L) batch.
        """
        self.packed_layout = (packed, start)

    # --- rollout log-probs as pi_old (trl_gspo/rollout_logprobs.py) ---

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """GRPOTrainer's generation; with args.use_rollout_logprobs and transformers generation, it also returns the
        log-probs of the sampled tokens (GRPOTrainer returns None there; vLLM returns its own)."""
        if not self.args.use_rollout_logprobs or self.use_vllm:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        recorder = SampledTokenLogProbs(self.temperature)
        with recording_generate(self.accelerator.unwrap_model(self.model_wrapped), recorder):
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        return completion_ids, recorder.per_sequence(completion_ids)

    def _generate(self, prompts):
        """GRPOTrainer's _generate; with args.use_rollout_logprobs, keeps the rollout log-probs for the pi_old pass."""
        result = super()._generate(prompts)
        if self.args.use_rollout_logprobs:
            if result[4] is None:  # never fall back to the forward silently
                raise RuntimeError(
                    "GSPOConfig.use_rollout_logprobs=True, but this generation path returned no log-probs (a "
                    "rollout_func must return them under 'logprobs'). Set use_rollout_logprobs=False."
                )
            self._pending_rollout_logprobs = result[4]  # per-token log-probs of the completions
        return result

    def _generate_and_score_completions(self, inputs):
        """GRPOTrainer's rollout, then per-token advantages (GSPO-token), the rollout diagnostics and, for MoE
        models, the pi_old routing record (see `_moe_rollout`). Rollout log-probs never outlive it (see
        _rollout_logprobs_as_pi_old).
        """
        with self._moe_rollout():
            try:
                output = super()._generate_and_score_completions(inputs)
            finally:
                self._pending_rollout_logprobs = None
        self._score_token_rewards(output)
        self._log_rollout_diagnostics(output)
        return self._moe_attach_routing(output)

    def _rollout_logprobs_as_pi_old(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size, **model_inputs
    ):
        """The pi_old pass of a rollout, answered with the rollout log-probs (no forward) and, every
        args.rollout_logprobs_check_interval train rollouts, checked against a recomputed pi_old (an eval rollout
        does not advance the schedule: it is checked when the latest train rollout was).

        GRPOTrainer's first log-prob pass of the policy model without entropy inside _generate_and_score_completions
        is its pi_old pass (GSPOConfig refuses the on-policy schedules that skip it). A batch with a missing value
        (vLLM's None) on any process falls back to the forward on every process. Values off the loss mask are 0.
        Metrics (`gspo/rollout_logprobs/`, per check):
          seq_abs_log_ratio_mean, _max   |length-normalised log-ratio| recomputed vs rollout, mean and max over
                                         the sequences of all processes (positions with a rollout log-prob of exactly 0, TRL's filler for
                                         tool-result tokens, are left out)
          outside_clip_band              fraction of sequences whose log-ratio mean_t(recomputed - rollout), the
                                         log s_i of the first step, leaves [log(1-eps_low),
                                         log(1+eps_high)]
          clip_band_log_high             log(1 + eps_high), to read the two above against
          fallback                       1 when a batch had missing rollout log-probs and used the forward
        """
        logprobs, self._pending_rollout_logprobs = self._pending_rollout_logprobs, None
        rollout = pad_rollout_logprobs(logprobs, logits_to_keep, input_ids.device)
        mask = attention_mask[:, -logits_to_keep:].bool()
        if self.model.training:  # the check schedule counts train rollouts only
            self._rollouts_seen += 1
        interval = self.args.rollout_logprobs_check_interval
        # every process takes the same branch: the forward below is collective under ZeRO-3 / FSDP
        local_missing = torch.isnan(rollout[mask]).any().float()
        missing = bool(self.accelerator.reduce(local_missing, reduction="max") > 0)
        rollout = rollout.masked_fill(~mask, 0.0)  # a None off the mask (e.g. a masked truncated completion): no NaN
        if not missing and not (interval and (self._rollouts_seen - 1) % interval == 0):
            return rollout, None, None
        recomputed, _, _ = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, **model_inputs
        )
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["gspo/rollout_logprobs/fallback"].append(float(missing))
        if missing:
            return recomputed, None, None
        # log s_i the objective sees at the rollout's first step: pi_theta = recomputed pi_old over the rollout's
        ratios = self.accelerator.gather(sequence_log_ratios(recomputed, rollout, mask & (rollout != 0)))
        stats = rollout_mismatch(ratios, self.epsilon_low, self.epsilon_high)
        for name, value in stats.items():
            metrics[f"gspo/rollout_logprobs/{name}"].append(value)
        return rollout, None, None

    # --- token and span rewards, reward checks, rollout diagnostics (trl_gspo/token_rewards.py, diagnostics.py) ---

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """GRPOTrainer's rewards, with token-level outputs taken out and every reward checked.

        Each callable reward function runs through a `TokenRewardCollector` adapter: TRL receives numbers (a token-
        level output's sum; NaN for NaN and +-inf), the per-token values wait in `self._token_rewards` for
        `_score_token_rewards`. A token-level output under a level other than "sequence_token" raises
        TokenRewardError here, before any parameter changes. Then `_check_reward_values`.
        """
        collector = TokenRewardCollector(
            self._tokenizer, completion_ids_list, completions, self.args.importance_sampling_level
        )
        reward_funcs = self.reward_funcs
        self.reward_funcs = [
            func if isinstance(func, nn.Module) else collector.wrap(i, func, name)
            for i, (func, name) in enumerate(zip(reward_funcs, self.reward_func_names, strict=True))
        ]
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = reward_funcs
        self._token_rewards = collector
        self._rewards_per_func = rewards_per_func
        self._check_reward_values(rewards_per_func, collector)
        return rewards_per_func

    def _check_reward_values(self, rewards_per_func, collector):
        """Warn once per reward function that returned NaN or +-inf; stop a run that keeps producing no finite reward.

        `rewards_per_func` is gathered over processes. TRL's contract: None means "this reward does not apply"; a
        rollout where every reward is None warns (TRL's own warning) and trains on with zero advantages. NaN and
        +-inf are treated like None (left out of the group baseline) but are warned about, since they usually are
        bugs: one rollout without any finite reward trains on too, but
        `args.max_consecutive_nonfinite_reward_rollouts` consecutive ones in which NaN or inf took part raise a
        ValueError naming the reward functions. The current streak is logged as
        `gspo/consecutive_nonfinite_reward_rollouts`.
        """
        for name, (nan_count, inf_count, total) in collector.non_finite.items():
            if name not in self._non_finite_reward_warned:
                self._non_finite_reward_warned.add(name)
                logger.warning(non_finite_warning(name, nan_count, inf_count, total))
        if torch.isfinite(rewards_per_func).any():
            self._nonfinite_reward_streak = 0
            self._nonfinite_reward_names.clear()
        else:
            # every process sees the same gathered rewards and gets here; whether NaN or inf (not only None) took
            # part is known per process, so it is gathered too, and every process takes the same decision
            local = torch.tensor([float(bool(collector.non_finite))], device=rewards_per_func.device)
            if self.accelerator.gather(local).sum().item() > 0:
                self._nonfinite_reward_streak += 1
                self._nonfinite_reward_names.update(collector.non_finite)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["gspo/consecutive_nonfinite_reward_rollouts"].append(float(self._nonfinite_reward_streak))
        limit = self.args.max_consecutive_nonfinite_reward_rollouts
        if self._nonfinite_reward_streak >= limit:
            raise ValueError(
                no_finite_reward_message(
                    self.reward_func_names, sorted(self._nonfinite_reward_names), self._nonfinite_reward_streak, limit
                )
            )

    def _score_token_rewards(self, output):
        """Under "sequence_token", replace the (B,) advantages by (B, T) ones: A_it = A_i + lambda * token component.

        The token component (`trl_gspo.token_rewards.token_advantage_component`) is normalised per group over all
        processes (groups may straddle them), then sliced back to this process's rows, like TRL's advantages. It is
        exactly 0 when no reward function returned token-level values, so plain rewards train as GSPO. The (B, T)
        tensor has the batch first and travels through TRL's shuffle and split with the rest of the rollout.
        Completions without a finite reward (TRL's unscorable rows, advantage 0) are left out of the group statistics
        and get no token component. Logs `token_rewards/component_abs_mean`: mean |token component| over the loss
        tokens of the scorable completions of all processes (0 without token rewards).
        """
        if self.args.importance_sampling_level != "sequence_token":
            return
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        advantages = output["advantages"]
        rows, width = output["completion_ids"].shape
        mask = (
            output["completion_mask"] if "tool_mask" not in output else output["completion_mask"] * output["tool_mask"]
        )
        local = self._token_rewards.token_reward_matrix(self.reward_weights.tolist(), width).to(advantages.device)
        local = torch.stack([local, mask.float()])  # (2, B, T): token rewards and mask, gathered together
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=2).transpose(0, 1))
        # unscorable completions (no finite reward, gathered like the rewards) keep TRL's advantage of 0
        scorable = ~torch.isnan(self._rewards_per_func).all(dim=1).to(gathered.device)
        all_mask = gathered[:, 1] * scorable.unsqueeze(1)
        all_component = token_advantage_component(gathered[:, 0], all_mask, group_size)
        start = self.accelerator.process_index * rows
        component = all_component[start : start + rows, :width]
        output["advantages"] = advantages.unsqueeze(1) + self.args.token_advantage_weight * component * mask
        self._metrics[mode]["token_rewards/component_abs_mean"].append(
            ((all_component.abs() * all_mask).sum() / all_mask.sum().clamp(min=1)).item()
        )

    def _log_rollout_diagnostics(self, output):
        """Log diversity, length and signal statistics of this rollout (all processes), `trl_gspo.diagnostics`:

        diversity/distinct_fraction, diversity/distinct_2   within-group diversity of the completions' tokens
        length/group_mean, length/group_std                 completion length and its spread inside groups
        signal/zero_variance_groups                         share of groups whose rewards are all equal
        """
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        # the sampled ids, not completion_mask: mask_truncated_completions zeroes the mask of truncated completions
        sequences = gather_object([list(ids) for ids in self._token_rewards.completion_ids])
        weighted = self._rewards_per_func * self.reward_weights.to(self._rewards_per_func.device).unsqueeze(0)
        unscorable = torch.isnan(self._rewards_per_func).all(dim=1)
        rewards = weighted.nansum(dim=1).masked_fill(unscorable, float("nan")).tolist()
        for name, value in rollout_diagnostics(sequences, rewards, group_size).items():
            self._metrics[mode][name].append(value)

    def _compute_loss(self, model, inputs):
        """GSPO / GSPO-token loss of one micro-batch; GRPOTrainer's own loss for importance_sampling_level='token'.

        Reads top to bottom: log-probs of the current policy -> pi_old -> per-sequence and per-token weights ->
        the pure objective -> entropy bonus and MoE aux loss -> metrics.
        """
        if self.importance_sampling_level == "token":
            return super()._compute_loss(model, inputs)
        args: GSPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        # TRL turns off HF's loss scaling for accumulation (loss_is_scaled_for_ga): the loss must be divided here.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        # 1. log pi_theta of the completion tokens (float32), entropies, MoE aux loss
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{key: inputs.get(key) for key in _MODEL_INPUT_KEYS},
        )

        # 2. pi_old: TRL leaves it out when the step is on-policy, where it equals the detached current log-probs
        old_per_token_logps = inputs.get("old_per_token_logps")
        if old_per_token_logps is None:
            old_per_token_logps = per_token_logps.detach()
        advantages = inputs["advantages"]

        # 3. weights on the policy term: (B,) per sequence, (B, T) per token (GSPO-token only, config-checked)
        sequence_weights, token_weights = [], []
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(
                advantages=advantages if advantages.dim() == 2 else advantages.unsqueeze(1),
                per_token_logps=per_token_logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_per_token_logps),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            if keep.size(1) == 1:
                sequence_weights.append(keep.squeeze(1))
            else:  # per-token advantages (GSPO-token) give a per-token keep mask
                token_weights.append(keep)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            sequence_mode = self.vllm_importance_sampling_mode.startswith("sequence")
            if sequence_mode and args.vllm_importance_sampling_length_normalized:
                sequence_weights.append(
                    length_normalized_is_weight(
                        old_per_token_logps,
                        inputs["sampling_per_token_logps"],
                        mask,
                        self.vllm_importance_sampling_mode,
                        self.vllm_importance_sampling_clip_min,
                        self.vllm_importance_sampling_clip_max,
                        args.log_ratio_bound,
                    )
                )
            elif sequence_mode:
                sequence_weights.append(inputs["importance_sampling_ratio"].squeeze(1))
            else:
                token_weights.append(inputs["importance_sampling_ratio"])
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            token_weights.append(entropy_mask.float())

        # 4. the objective (pure function, trl_gspo/objective.py)
        out = compute_policy_objective(
            self.importance_sampling_level,
            per_token_logps,
            old_per_token_logps,
            advantages,
            mask,
            self.epsilon_low,
            self.epsilon_high,
            sequence_weights=_product(sequence_weights),
            token_weights=_product(token_weights),
            ref_per_token_logps=inputs.get("ref_per_token_logps"),
            beta=self.beta,
            kl_importance_correction=args.use_bias_correction_kl,
            log_ratio_bound=args.log_ratio_bound,
        )
        loss = out.loss / accumulation

        # 5. terms GRPOTrainer adds after its policy loss: fixed entropy bonus, MoE load-balancing loss
        if self._entropy_bonus_enabled:
            bonus_mask = mask if entropy_mask is None else mask * entropy_mask
            mean_entropy = (entropies * bonus_mask).sum() / bonus_mask.sum().clamp(min=1.0)
            loss = loss - self.entropy_coef * mean_entropy / accumulation
            self._log_entropy_bonus_metrics(mode, out.loss)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_objective_metrics(mode, out, entropies, mask)
        return loss

    def _log_entropy_bonus_metrics(self, mode, policy_loss):
        """With an entropy bonus, the two metrics GRPOTrainer logs next to it, under its names:
        policy_loss    the objective's loss before the bonus, not scaled for accumulation (mean over ranks)
        entropy_coef   the bonus coefficient, once per optimizer step in training
        """
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss.detach()).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _log_objective_metrics(self, mode, out, entropies, mask):
        """Append this micro-batch's statistics; TRL averages them over the logging interval.

        Sequence fractions use TRL's names, the paper's token-weighted fraction and the ratio's spread are
        namespaced `gspo/`:
          clip_ratio/{low,high,region}_mean   fraction of sequences whose clip is active (low: ratio below
                                              1 - eps_low with A < 0; high: above 1 + eps_high with A > 0)
          clip_ratio/low_min, high_max        extremes over sequences of the per-sequence clipped fraction
          gspo/clipped_token_fraction         fraction of completion tokens under an active clip (the paper's count)
          gspo/seq_ratio/{mean,std,min,max}   the sequence importance ratio s_i over non-empty sequences
          kl, entropy                         token means, as in GRPOTrainer
        """
        metrics = self._metrics[mode]
        mask = mask.float()
        lengths = out.lengths
        if out.low_clipped.size(1) == 1:  # GSPO: one flag per sequence
            per_seq_low = out.low_clipped.squeeze(1).float()
            per_seq_high = out.high_clipped.squeeze(1).float()
            clipped_tokens = ((per_seq_low + per_seq_high) * lengths).sum()
        else:  # GSPO-token: per-token flags (the advantage sign may vary along a sequence)
            per_seq_low = out.low_clipped.float().sum(-1) / lengths.clamp(min=1.0)
            per_seq_high = out.high_clipped.float().sum(-1) / lengths.clamp(min=1.0)
            clipped_tokens = (out.low_clipped | out.high_clipped).float().sum()
        kl_sum = torch.zeros((), device=mask.device) if out.per_token_kl is None else (out.per_token_kl * mask).sum()
        totals = torch.stack(
            [
                per_seq_low.sum(),
                per_seq_high.sum(),
                (lengths > 0).float().sum(),
                clipped_tokens,
                lengths.sum(),
                (entropies * mask).sum(),
                kl_sum,
            ]
        )
        low, high, sequences, clipped, tokens, entropy, kl = self.accelerator.reduce(totals, reduction="sum").tolist()
        sequences, tokens = max(sequences, 1.0), max(tokens, 1.0)
        metrics["clip_ratio/low_mean"].append(low / sequences)
        metrics["clip_ratio/high_mean"].append(high / sequences)
        metrics["clip_ratio/region_mean"].append((low + high) / sequences)
        metrics["gspo/clipped_token_fraction"].append(clipped / tokens)
        metrics["entropy"].append(entropy / tokens)
        if out.per_token_kl is not None:
            metrics["kl"].append(kl / tokens)

        # per-sequence extremes: gathered, empty rows as NaN so they never win a min or max
        keep = lengths > 0
        nan = torch.full_like(per_seq_low, float("nan"))
        per_sequence = torch.stack(
            [
                torch.where(keep, per_seq_low, nan),
                torch.where(keep, per_seq_high, nan),
                torch.where(keep, torch.exp(out.seq_log_ratio), nan),
            ],
            dim=1,
        )
        gathered = self.accelerator.gather(per_sequence)
        # masked reductions rather than trl's nanmin/nanmax, whose emptiness check syncs with the device
        valid = ~torch.isnan(gathered[:, 2])
        count = valid.sum().clamp(min=1)
        low, high, ratios = (torch.where(valid, gathered[:, i], 0.0) for i in range(3))
        mean = ratios.sum() / count
        inf = torch.tensor(float("inf"), device=ratios.device)
        n, low_min, high_max, mean, std, ratio_min, ratio_max = torch.stack(
            [
                valid.sum().float(),
                torch.where(valid, low, inf).min(),
                torch.where(valid, high, -inf).max(),
                mean,
                (torch.where(valid, (ratios - mean) ** 2, 0.0).sum() / count).sqrt(),
                torch.where(valid, ratios, inf).min(),
                torch.where(valid, ratios, -inf).max(),
            ]
        ).tolist()  # one device-to-host transfer
        if n > 0:
            metrics["clip_ratio/low_min"].append(low_min)
            metrics["clip_ratio/high_max"].append(high_max)
            metrics["gspo/seq_ratio/mean"].append(mean)
            metrics["gspo/seq_ratio/std"].append(std)
            metrics["gspo/seq_ratio/min"].append(ratio_min)
            metrics["gspo/seq_ratio/max"].append(ratio_max)

    # ---- MoE routing (trl_gspo/moe.py): no router logits in generate(), routing drift metric, routing replay ----

    def _moe_setup_routing(self):
        """Hook the routers when the drift metric or replay needs them; refuse replay on a dense model."""
        self._moe_hooks, self._moe_record_armed, self._moe_recorded = None, False, None
        unwrapped = self.accelerator.unwrap_model(self.model)
        routers = find_routers(unwrapped)
        if self.args.routing_replay and not routers:
            model_type = getattr(unwrapped.config, "model_type", type(unwrapped).__name__)
            raise ValueError(
                f"GSPOConfig.routing_replay=True needs a Mixture-of-Experts model with *TopKRouter modules "
                f"(Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE); this model ({type(unwrapped).__name__}, model_type="
                f"{model_type!r}) has none. Set routing_replay=False."
            )
        speed_options = [name for name in ("padding_free", "use_rollout_logprobs") if getattr(self.args, name)]
        if routers and self.args.log_routing_drift and speed_options:  # routing_replay is refused by GSPOConfig
            logger.warning(
                f"moe/routing_drift is not logged with {speed_options}: the routing record needs an unpacked pi_old "
                "forward. Set log_routing_drift=False to silence this."
            )
        elif routers and (self.args.log_routing_drift or self.args.routing_replay):
            self._moe_hooks = RouterHooks(routers)

    def _moe_pi_old_pass_runs(self) -> bool:
        """Whether GRPOTrainer computes old_per_token_logps in this rollout (its own condition)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        correction = self.use_vllm and self.vllm_importance_sampling_correction
        return self.args.gradient_accumulation_steps % generate_every != 0 or correction

    @contextlib.contextmanager
    def _moe_rollout(self):
        """Generation without router logits (the config's output_router_logits crashes cached decoding on padded
        batches; the training forward asks for them itself), and the next pi_old pass armed for recording."""
        if self._moe_hooks is not None:
            self._moe_hooks.clear()
            self._moe_record_armed = self._moe_pi_old_pass_runs()
        try:
            with router_logits_off(self.accelerator.unwrap_model(self.model)):
                yield
        finally:
            self._moe_record_armed = False

    def _moe_recorded_pass(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """GRPOTrainer's log-prob pass, recording the routing: called for the pi_old pass of a rollout.

        That pass is the first one on the policy model after generation (TRL runs it before the reference pass,
        which with PEFT uses the same model with adapters disabled); `_moe_rollout` arms it only when TRL runs it.
        Never packed: the hooks are off under padding_free (see `_moe_setup_routing`).
        """
        self._moe_record_armed = False
        with self._moe_hooks.recording():
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._moe_recorded = self._moe_hooks.recorded(*input_ids.shape)
        return result

    def _moe_attach_routing(self, output: dict) -> dict:
        """Put the recorded pi_old routing (B, L, layers, k) into the rollout batch, where it follows its rows."""
        recorded = self._moe_recorded
        if recorded is not None:
            self._moe_recorded = None
            output[ROUTING_KEY] = recorded
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """GRPOTrainer's, with the policy pass observing (drift metric) or replaying the recorded routing."""
        routing = inputs.get(ROUTING_KEY) if self._moe_hooks is not None else None
        if routing is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._moe_hooks.start_policy_pass(routing, replay=self.args.routing_replay)
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.args.log_routing_drift:
            self._log_routing_drift(inputs, routing)
        if not torch.is_grad_enabled():  # evaluation: no backward follows, so no training_step to clear the state
            self._moe_hooks.clear()
        return loss

    def training_step(self, model, inputs, num_items_in_batch):
        """GRPOTrainer's; the replay state is dropped only here, after backward (checkpointing recomputes)."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if self._moe_hooks is not None:
                self._moe_hooks.clear()

    def _log_routing_drift(self, inputs, routing):
        """Log how much the routing moved between the pi_old pass and this policy pass, on completion tokens.

          moe/routing_drift/token_layer       fraction of (completion token, MoE layer) pairs whose top-k expert
                                              set differs from the pi_old pass (the paper: ~10% per update)
          moe/routing_drift/token_any_layer   fraction of completion tokens that changed in at least one layer
        Both count the *natural* routing of the current router, also under routing_replay (what replay undid).
        """
        prompt_length = inputs["prompt_ids"].size(1)
        current = self._moe_hooks.observed(routing.size(0), routing.size(1))
        counts = routing_drift_counts(
            routing[:, prompt_length:], current[:, prompt_length:], inputs["completion_mask"]
        )
        mode = "train" if self.model.training else "eval"
        for name, value in drift_fractions(self.accelerator.reduce(counts, reduction="sum")).items():
            self._metrics[mode][name].append(value)


# Same parameters as GRPOTrainer for help(), IDEs and argument checkers: the constructor forwards them unchanged.
GSPOTrainer.__init__.__signature__ = inspect.signature(GRPOTrainer.__init__)


def _product(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """Elementwise product of a list of weight tensors, None for an empty list."""
    if not weights:
        return None
    result = weights[0]
    for weight in weights[1:]:
        result = result * weight
    return result
