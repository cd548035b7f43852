"""GSPOTrainer: TRL's GRPOTrainer with GSPO's sequence-level importance ratio and clipping.

The core owns the training step. It overrides these GRPOTrainer methods, each once, and reads top to bottom in the
order a step runs them:

1. `_prepare_inputs`: TRL's (every steps_per_generation * num_iterations micro-steps a new rollout, shuffled and
   split into micro-batches); a new rollout's micro-batches then get their log-prob passes (`_score_rollout`)
   before the first optimizer step on them.
2. `_generate_and_score_completions`: TRL's rollout with its log-prob passes deferred (answered with NaN
   placeholders by `_get_per_token_logps_and_entropies`, replaced in 1 before any loss reads them); inside it
   `_generate_single_turn` (generation: the sampled tokens' log-probs and R3's routing recorded) and
   `_calculate_rewards` (token rewards taken out, every reward checked). Then GSPO-token's (B, T) advantages, the
   rollout diagnostics and R3's routing rows.
3. `_score_rollout`: per micro-batch, with the policy pass's own call: pi_old (its source), the reference
   log-probs, vLLM's importance weights.
4. `_compute_loss`: the policy pass, the weights, the objective (a pure function, trl_gspo/objective.py), the entropy
   bonus and aux loss, the metrics; TRL's own loss at importance_sampling_level="token". `training_step`: TRL's; the
   routing replay state ends after backward.
5. `_save_checkpoint` / `_load_optimizer_and_scheduler`: exact resumes (the buffered rollout is saved).

The features are objects chosen at construction from the config, each in its module, called only from here:
    self.pi_old    where pi_old comes from (trl_gspo/pi_old.py): recomputed per micro-batch, the rollout's
                   log-probs, or None when every step is on-policy (pi_old is then the detached current log-probs)
    self.forward   the forward backend (trl_gspo/packing.py): PackedForward, or PaddedForward (TRL's padded pass)
    self.routing   MoE routing (trl_gspo/moe.py): drift metric, R2 or R3 replay; None for a dense model
    self.rewards   token rewards and reward checks (trl_gspo/token_rewards.py)
and at construction the vLLM set-up checks (trl_gspo/vllm_checks.py) and the switch-off of train-mode randomness
(trl_gspo/noise.py). A pass's kind is known where it runs: the core runs the pi_old and reference passes itself,
and TRL calls the log-prob pass only in its rollout (deferred) and in its loss (the policy pass).

What `_compute_loss` keeps from GRPOTrainer, so nothing is dropped silently (TRL issue 6807): tool-token masking, the
entropy mask (GSPO-token), the off-policy sequence mask, vLLM importance correction (length-normalised by default),
the KL term with per-token importance correction, the fixed entropy bonus, the MoE router aux loss, and
gradient-accumulation scaling. What it refuses is refused by GSPOConfig at construction.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
import shutil
import textwrap
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from . import metrics as names
from .banner import distributed_backend, start_banner
from .checkpoints import checkpoint_problem, write_complete_mark
from .config import GSPO_TOKEN_LEVEL, GSPOConfig, upgrade_grpo_config
from .diagnostics import log_rollout_diagnostics
from .moe import drift_fractions, moe_routing, router_logits_off
from .noise import make_ratio_passes_deterministic
from .objective import (
    compute_policy_objective,
    engine_importance_weights,
    grpo_metric_sums,
    grpo_metrics,
    objective_metric_sums,
    objective_metrics,
    outside_clip_band_counts,
)
from .packing import PackedForward, PaddedForward
from .pi_old import pi_old_source
from .rollout_buffer import load_rollout_buffer
from .rollout_logprobs import SampledTokenLogProbs, recording_generate
from .token_rewards import TokenRewards, group_centred_component
from .trl_api import MODEL_INPUT_KEYS, check_trl_private_api, check_trl_private_attributes, loss_mask
from .vllm_checks import check_vllm_after_construction, check_vllm_before_construction, engine_construction

logger = logging.get_logger(__name__)

# Saved in each checkpoint folder, one per rank: the rollout the run is in the middle of.
ROLLOUT_BUFFER_FILE = "gspo_rollout_buffer_rank{rank}.pt"


class GSPOTrainer(GRPOTrainer):
    """Group Sequence Policy Optimization (Zheng et al., 2025) on TRL's GRPOTrainer.

    Takes exactly GRPOTrainer's arguments and is a drop-in replacement for it. `args` may be a GSPOConfig, a
    GRPOConfig (upgraded, with a warning, by `trl_gspo.config.upgrade_grpo_config`) or None (GSPOConfig defaults).
    The step and its features: the module docstring. Prints one start line on the main process (trl_gspo/banner.py)
    and logs every metric GRPOTrainer logs for the same configuration.
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

    # The pure objective (trl_gspo/objective.py) `_compute_loss` calls: the seam for a subclass that records or changes
    # what the loss sees.
    objective = staticmethod(compute_policy_objective)

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *posargs, **kwargs):
        check_trl_private_api()
        model_name = model if isinstance(model, str) else model.config._name_or_path
        if args is None:
            args = GSPOConfig(f"{str(model_name).split('/')[-1]}-GSPO")
        elif not isinstance(args, GSPOConfig):
            args, notice = upgrade_grpo_config(args)  # the rule: trl_gspo/config.py
            logger.warning(notice)
        self.rewards = TokenRewards(reward_funcs, args)
        check_vllm_before_construction(args)
        colocate = args.use_vllm and args.vllm_mode == "colocate"
        self._rollout_optimizer_step = None  # state.global_step when the current training rollout was generated
        self._in_rollout = False  # TRL's rollout is running: its log-prob passes are deferred to _score_rollout
        self._rollout_scores = None  # (reward collector, completion ids, rewards) from _calculate_rewards
        self._loss_batch = None  # the micro-batch whose policy pass TRL's own loss runs (level "token")
        with engine_construction(model_name, args.vllm_dtype) if colocate else nullcontext():
            super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        check_trl_private_attributes(self)
        if colocate:
            check_vllm_after_construction(self.vllm_generation, self.args, model_name)
        unwrap = self.accelerator.unwrap_model
        self.pi_old = pi_old_source(self.args)
        if self.args.padding_free:
            models = {"model": unwrap(self.model)}
            if self.ref_model is not None:
                models["ref_model"] = unwrap(self.ref_model)
            self.forward = PackedForward(models, self.args.padding_free_row_tokens, self.accelerator.autocast)
        else:
            self.forward = PaddedForward(super()._get_per_token_logps_and_entropies)
        self.routing = moe_routing(
            unwrap(self.model), self.args, self.tools, self.rollout_func, self.pad_to_multiple_of
        )
        make_ratio_passes_deterministic(self.args, self.model, self.ref_model)  # GSPOConfig.disable_dropout
        accelerator = self.accelerator
        if accelerator.is_main_process:
            world, backend = accelerator.num_processes, distributed_backend(accelerator)
            banner = start_banner(world, backend, accelerator.mixed_precision, self.args, accelerator.device.type)
            print(banner, flush=True)  # one start line (trl_gspo/banner.py)

    # --- 1. the micro-batch of a step -----------------------------------------------------------------------------

    def _prepare_inputs(self, generation_batch):
        """Step 1 (module docstring; in eval every call is a new rollout, of one micro-batch); a resumed rollout
        buffer already holds its log-prob passes."""
        buffered = self._buffered_inputs
        inputs = super()._prepare_inputs(generation_batch)
        if not self.model.training:
            self._score_rollout([inputs], training=False)
        elif self._buffered_inputs is not buffered:  # TRL generated and split a new rollout
            self._score_rollout(self._buffered_inputs, training=True)
        return inputs

    # --- 2. the rollout ---------------------------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        """Step 2 (module docstring). Notes the optimizer step the rollout's policy is at: pi_old is that policy."""
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._rollout_optimizer_step = self.state.global_step
        if self.routing is not None:
            self.routing.clear()
        self._in_rollout = True
        try:
            # the config's output_router_logits crashes cached decoding on padded batches; the training forward asks
            # for router logits itself (trl_gspo/moe.py)
            with router_logits_off(self.accelerator.unwrap_model(self.model)):
                output = super()._generate_and_score_completions(inputs)
        finally:
            self._in_rollout = False
        (collector, completion_ids_list, rewards_per_func), self._rollout_scores = self._rollout_scores, None
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        metrics = self._metrics[mode]
        if self.importance_sampling_level == GSPO_TOKEN_LEVEL:
            self.rewards.advantages(
                output,
                collector,
                rewards_per_func,
                self.reward_weights,
                group_size,
                self.accelerator,
                metrics,
                self.token_advantage_component,
            )
        log_rollout_diagnostics(completion_ids_list, rewards_per_func, self.reward_weights, group_size, metrics)
        if self.routing is not None:
            self.routing.attach_rollout_routing(output)
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation. With rollout log-probs and transformers generation the sampled tokens' log-probs are
        recorded (`SampledTokenLogProbs`; vLLM and a rollout_func return their own), and TRL turns them into the
        rollout's `sampling_per_token_logps`; with R3 the routing of generate() is recorded."""
        recorder = None
        if self.args.use_rollout_logprobs and not self.use_vllm:
            recorder = SampledTokenLogProbs(self.temperature)
        unwrapped = self.accelerator.unwrap_model(self.model_wrapped)
        with (
            recording_generate(unwrapped, recorder) if recorder is not None else nullcontext(),
            self.routing.recording_generation() if self.routing is not None else nullcontext(),
        ):
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        if self.routing is not None:
            self.routing.generated(prompt_ids, completion_ids)
        if recorder is not None:
            logprobs = recorder.per_sequence(completion_ids)
        return completion_ids, logprobs

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards, with token-level outputs taken out (TRL sees their sums; the token values wait in the
        collector for GSPO-token's advantages) and every reward checked (`TokenRewards.check`)."""
        collector = self.rewards.collector(self._tokenizer, completion_ids_list, completions)
        reward_funcs = self.reward_funcs
        self.reward_funcs = TokenRewards.wrapped(collector, reward_funcs, self.reward_func_names)
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self.reward_funcs = reward_funcs
        metrics = self._metrics["train" if self.model.training else "eval"]
        self.rewards.check(rewards_per_func, collector, self.reward_func_names, self.accelerator, metrics)
        self._rollout_scores = (collector, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def token_advantage_component(
        self, token_rewards: torch.Tensor, mask: torch.Tensor, num_generations: int
    ) -> torch.Tensor:
        """The (N, T) token component of GSPO-token's advantages: `group_centred_component` (trl_gspo/token_rewards.py).

        The place to try another formula: override it in a subclass, with the same arguments (every process's rows
        in TRL's order, groups of `num_generations` consecutive rows; `mask` 0 off the loss tokens and on the rows
        of unscorable completions) and a result that is 0 off the mask.
        """
        return group_centred_component(token_rewards, mask, num_generations)

    # --- 3. the log-prob passes of a rollout ------------------------------------------------------------------------

    def _score_rollout(self, micro_batches: list[dict], training: bool) -> None:
        """Step 3 (module docstring): pi_old (none when every step is on-policy), the reference (beta != 0), then
        vLLM's importance weights from them."""
        metrics = self._metrics["train" if training else "eval"]
        if self.pi_old is not None:
            self.pi_old.fill(
                micro_batches,
                self._pi_old_pass,
                self.accelerator,
                metrics,
                training,
                self.epsilon_low,
                self.epsilon_high,
            )
        if self.beta != 0.0:
            for batch in micro_batches:
                batch["ref_per_token_logps"] = self._reference_pass(batch)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            self._engine_importance_weights(micro_batches, metrics)

    def _pi_old_pass(self, batch: dict) -> torch.Tensor:
        """(B, T) log pi_old of micro-batch `batch`: the policy pass's call without gradients (entropies are computed
        by the fused LM head either way and do not change the log-probs); the routing records it (R3: replays the
        rollout's)."""
        around_forward = None
        if self.routing is not None:
            keep_record = not self.args.use_rollout_logprobs  # there, pi_old's routing is the rollout's
            around_forward = self.routing.pi_old_pass(batch, self._log_routing_counts, keep_record)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._log_prob_pass(self.model, batch, False, self.aux_loss_enabled, around_forward)
        return logps

    def _reference_pass(self, batch: dict) -> torch.Tensor:
        """(B, T) reference log-probs of `batch`: the reference model, or with PEFT the model with its adapter off
        (or the adapter named "ref"), as GRPOTrainer computes them."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is not None:
                return self._log_prob_pass(self.ref_model, batch)[0]
            model = self.accelerator.unwrap_model(self.model)
            with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
                return self._log_prob_pass(self.model, batch)[0]

    def _engine_importance_weights(self, micro_batches: list[dict], metrics) -> None:
        """vLLM importance correction: each micro-batch's weights from pi_old and the engine's log-probs
        (`engine_importance_weights`: GSPO's length-normalised form at the sequence levels by default, TRL's product
        at the token level), and the rollout's `sampling/*` metrics with TRL's reductions, in place of the ones TRL
        logged from its deferred pi_old."""
        length_normalized = (
            self.importance_sampling_level != "token" and self.args.vllm_importance_sampling_length_normalized
        )
        sequence_mode = self.vllm_importance_sampling_mode.startswith("sequence")
        deltas, weights_seen = [], []
        for batch in micro_batches:
            mask = loss_mask(batch)
            old, sampling = batch["old_per_token_logps"], batch["sampling_per_token_logps"]
            weights = engine_importance_weights(
                old,
                sampling,
                mask,
                self.vllm_importance_sampling_mode,
                self.vllm_importance_sampling_clip_min,
                self.vllm_importance_sampling_clip_max,
                length_normalized,
                self.args.log_ratio_bound,
            )
            batch["importance_sampling_ratio"] = weights
            delta = (old - sampling).abs()
            deltas.append(delta[mask.bool() & ~torch.isnan(delta)])
            if not sequence_mode:
                weights_seen.append(weights[mask.bool()])
            elif length_normalized:  # the weights the loss applies: an empty sequence has none
                weights_seen.append(weights.flatten()[mask.sum(-1) > 0])
            else:
                weights_seen.append(weights.flatten())
        delta, weights = torch.cat(deltas), torch.cat(weights_seen)
        zero = torch.zeros((), device=delta.device)
        local = torch.stack(
            [
                delta.mean() if delta.numel() else zero,
                delta.max() if delta.numel() else zero,
                weights.min() if weights.numel() else zero,
                weights.mean() if weights.numel() else zero,
                weights.max() if weights.numel() else zero,
            ]
        )
        gathered = self.accelerator.gather(local.unsqueeze(0))  # (processes, 5)
        values = {
            f"{names.SAMPLING_LOGP_DIFFERENCE}/mean": gathered[:, 0].mean(),
            f"{names.SAMPLING_LOGP_DIFFERENCE}/max": gathered[:, 1].max(),
            f"{names.IMPORTANCE_SAMPLING_RATIO}/min": gathered[:, 2].min(),
            f"{names.IMPORTANCE_SAMPLING_RATIO}/mean": gathered[:, 3].mean(),
            f"{names.IMPORTANCE_SAMPLING_RATIO}/max": gathered[:, 4].max(),
        }
        for name, value in zip(values, torch.stack(list(values.values())).tolist(), strict=True):
            metrics[name][-1] = value  # TRL's value for this rollout, computed from the placeholder

    # --- the log-prob pass ------------------------------------------------------------------------------------------

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
        """Every log-prob pass TRL's own code asks for. Inside its rollout (pi_old, reference): deferred to
        `_score_rollout`, answered with NaN of the shape (a NaN loss if one were ever read, never a silent ratio).
        Otherwise the policy pass of TRL's loss (importance_sampling_level="token"), run as the core runs its own."""
        if self._in_rollout:
            return torch.full((input_ids.size(0), logits_to_keep), math.nan, device=input_ids.device), None, None
        around_forward = self.routing.policy_pass(self._loss_batch) if self.routing is not None else None
        return self.forward(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size,
            compute_entropy,
            compute_aux_loss,
            around_forward=around_forward,
            **model_inputs,
        )

    def _log_prob_pass(self, model, batch, compute_entropy=False, compute_aux_loss=False, around_forward=None):
        """(log-probs, entropies, aux loss) of micro-batch `batch` under `model`, in one chunk: GRPOTrainer's
        `_compute_loss` call, which every pass of the core makes so that pi_old and the policy see the same rows."""
        completion_ids = batch["completion_ids"]
        return self.forward(
            model,
            torch.cat([batch["prompt_ids"], completion_ids], dim=1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1),
            completion_ids.size(1),
            None,
            compute_entropy,
            compute_aux_loss,
            around_forward=around_forward,
            **{key: batch.get(key) for key in MODEL_INPUT_KEYS},
        )

    # --- 4. the loss ------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch):
        """TRL's; the routing's replay state is dropped only here, after backward (checkpointing recomputes)."""
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if self.routing is not None:
                self.routing.clear()

    def _compute_loss(self, model, inputs):
        """GSPO / GSPO-token loss of one micro-batch (`_gspo_loss`); GRPOTrainer's own loss for
        importance_sampling_level="token". Then the routing drift of the policy pass."""
        if self.importance_sampling_level == "token":
            self._loss_batch = inputs
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                self._loss_batch = None
        else:
            loss = self._gspo_loss(model, inputs)
        if self.routing is not None:
            self.routing.log_drift(inputs, self._log_routing_counts)
            if not torch.is_grad_enabled():  # evaluation: no backward follows, so no training_step to clear it
                self.routing.clear()
        return loss

    def _gspo_loss(self, model, inputs):
        """GSPO / GSPO-token loss of one micro-batch.

        Reads top to bottom: log-probs of the current policy -> pi_old -> per-sequence and per-token weights ->
        the pure objective -> entropy bonus and MoE aux loss -> metrics.
        """
        args: GSPOConfig = self.args
        mode = "train" if self.model.training else "eval"
        # TRL turns off HF's loss scaling for accumulation (loss_is_scaled_for_ga): the loss must be divided here.
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0

        # 1. log pi_theta of the completion tokens (float32), entropies, MoE aux loss: the call the pi_old pass made
        mask = loss_mask(inputs)
        around_forward = self.routing.policy_pass(inputs) if self.routing is not None else None
        per_token_logps, entropies, aux_loss = self._log_prob_pass(
            model, inputs, True, self.aux_loss_enabled, around_forward
        )

        # 2. pi_old: none when the step is on-policy, where it equals the detached current log-probs
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
            # (B, 1) in a sequence mode (length-normalised by default: _engine_importance_weights), else (B, T)
            weight = inputs["importance_sampling_ratio"]
            if self.vllm_importance_sampling_mode.startswith("sequence"):
                sequence_weights.append(weight.squeeze(1))
            else:
                token_weights.append(weight)
        entropy_mask = None
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            token_weights.append(entropy_mask.float())

        # 4. the objective (pure function, trl_gspo/objective.py)
        out = self.objective(
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

        self._log_objective_metrics(mode, out, entropies, mask, per_token_logps, old_per_token_logps, advantages)
        return loss

    def _log_entropy_bonus_metrics(self, mode, policy_loss):
        """With an entropy bonus, the two metrics GRPOTrainer logs next to it (`policy_loss`, `entropy_coef`:
        trl_gspo/metrics.py)."""
        self._metrics[mode][names.POLICY_LOSS].append(self.accelerator.gather(policy_loss.detach()).nanmean().item())
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode][names.ENTROPY_COEF].append(self.entropy_coef)

    def _log_objective_metrics(self, mode, out, entropies, mask, per_token_logps, old_per_token_logps, advantages):
        """This micro-batch's statistics, summed and gathered over processes (one reduction and one gather); TRL
        averages them over the logging interval. GSPO's own under `gspo/` (`objective_metrics`), and the keys
        GRPOTrainer logs from its loss with GRPOTrainer's definitions (`grpo_metrics`); trl_gspo/metrics.py defines
        every key."""
        sums, per_sequence = objective_metric_sums(out)
        grpo_sums, grpo_per_row = grpo_metric_sums(
            per_token_logps,
            old_per_token_logps,
            advantages,
            mask,
            entropies,
            self.epsilon_low,
            self.epsilon_high,
            out.per_token_kl,
            self.args.use_bias_correction_kl,
        )
        all_sums = self.accelerator.reduce(torch.cat([sums, grpo_sums]), reduction="sum")
        all_rows = self.accelerator.gather(torch.cat([per_sequence, grpo_per_row], dim=1))
        sums, grpo_sums = all_sums.split([sums.numel(), grpo_sums.numel()])
        per_sequence, grpo_per_row = all_rows.split([per_sequence.size(1), grpo_per_row.size(1)], dim=1)
        reduced = {
            **objective_metrics(sums, per_sequence),
            **grpo_metrics(grpo_sums, grpo_per_row, with_kl=out.per_token_kl is not None),
        }
        for name, value in reduced.items():
            self._metrics[mode][name].append(value)
        # no optimizer step since this micro-step's rollout was generated: the policy is still pi_old, so s_i must be
        # exactly 1. Compared by optimizer step, not derived from the micro-step counter: a rollout's micro-steps
        # need not be a whole number of optimizer steps (a rollout may then start or end inside one).
        if mode == "train" and self._rollout_optimizer_step == self.state.global_step:
            outside, sequences = self.accelerator.reduce(
                outside_clip_band_counts(out, self.epsilon_low, self.epsilon_high), reduction="sum"
            ).tolist()
            if sequences:
                self._metrics[mode][names.FIRST_STEP_OUTSIDE_CLIP_BAND].append(outside / sequences)

    def _log_routing_counts(self, counts: torch.Tensor, prefix: str) -> None:
        """MoE routing counts (`routing_drift_counts`) of this process, summed over processes, as fractions."""
        mode = "train" if self.model.training else "eval"
        for name, value in drift_fractions(self.accelerator.reduce(counts, reduction="sum"), prefix).items():
            self._metrics[mode][name].append(value)

    # --- 5. checkpoints ---------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """Also save this rank's buffered rollout (GRPOTrainer does not: a run resumed mid-rollout would generate a
        new batch from a newer policy); then, once every rank has written its files, mark the checkpoint complete
        (trl_gspo/checkpoints.py; `--resume true` takes only marked checkpoints), and only then rotate old ones
        (save_total_limit): transformers' own rotation, at the end of its save, would delete the previous complete
        checkpoint while this one is still incomplete."""
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():
            # left by an earlier save of this step cut short (or by a run resumed from an earlier checkpoint): its
            # mark and files must not mix with this save's
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        save_total_limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation inside transformers' save: it runs below, after the mark
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = save_total_limit
        if self._buffered_inputs is not None:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self._buffered_inputs, folder / ROLLOUT_BUFFER_FILE.format(rank=self.accelerator.process_index))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_complete_mark(folder, self.state.global_step)
            rotate_checkpoints(
                str(run_dir), save_total_limit, best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True
            )

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Refuse a damaged checkpoint by name (transformers would fail inside torch.load), then restore the buffered
        rollout and the micro-step counter that indexes into it (see _save_checkpoint)."""
        if checkpoint is not None and (problem := checkpoint_problem(checkpoint, require_mark=False)):
            raise ValueError(f"checkpoint {checkpoint} cannot be resumed from: {problem}.")
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = Path(checkpoint) / ROLLOUT_BUFFER_FILE.format(rank=self.accelerator.process_index)
        if path.is_file():
            # weights_only=True: a checkpoint written elsewhere must not run code (trl_gspo/rollout_buffer.py). A
            # process of a CPU launch has device cpu:<rank>, which torch.load cannot map to: plain cpu is the same
            device = self.accelerator.device
            self._buffered_inputs = load_rollout_buffer(path, "cpu" if device.type == "cpu" else device)
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
            # a checkpoint is written after an optimizer step, so the restored rollout has seen an update
            self._rollout_optimizer_step = None


# Same parameters as GRPOTrainer for help(), IDEs and argument checkers: the constructor forwards them unchanged.
GSPOTrainer.__init__.__signature__ = inspect.signature(GRPOTrainer.__init__)


def _product(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """Elementwise product of a list of weight tensors, None for an empty list."""
    return functools.reduce(operator.mul, weights) if weights else None
