"""GSPOTrainer: TRL's GRPOTrainer with GSPO's sequence-level importance ratio and clipping.

The core (this module) is what is GSPO: construction (a GRPOConfig is upgraded to a GSPOConfig), `_compute_loss`
(the algorithm, top to bottom), the length-normalised vLLM importance weights of a rollout, the checkpoint hooks that
make a resume inside a rollout exact (and mark a checkpoint complete, trl_gspo/checkpoints.py), and the metric
reduction. With `importance_sampling_level="token"` `_compute_loss` hands the micro-batch to GRPOTrainer's own loss.

What `_compute_loss` keeps from GRPOTrainer, so nothing is dropped silently (TRL issue 6807): tool-token
masking, the entropy mask (GSPO-token), the off-policy sequence mask, vLLM importance correction (length-
normalised by default), the KL term with per-token importance correction, the fixed entropy bonus, the MoE
router aux loss, and gradient-accumulation scaling. What it refuses is refused by GSPOConfig at construction.

Every other capability is a cooperative mixin in its own module, each calling `super()` and reading its GSPOConfig
fields; the class statement below is the order in which they wrap GRPOTrainer (outermost first):

    MoERoutingMixin          trl_gspo/moe.py              no router logits in generate(), drift metric, replay
    AlignedPiOldMixin        trl_gspo/aligned_pi_old.py   pi_old per micro-batch, as the policy pass sees it
    RolloutLogprobsMixin     trl_gspo/rollout_logprobs.py the sampling log-probs answer the pi_old pass
    PaddingFreeMixin         trl_gspo/packing.py          every log-prob pass on packed rows
    TokenRewardsMixin        trl_gspo/token_rewards.py    span / per-token rewards, reward checks
    RolloutDiagnosticsMixin  trl_gspo/diagnostics.py      diversity, length and signal per rollout
    VLLMColocateCPUMixin     trl_gspo/vllm_cpu.py         vLLM engine dtype, weight sync on a CPU engine
    VLLMChecksMixin          trl_gspo/vllm_checks.py      vLLM set-up errors: server sync/reach/log-probs, engine

Order matters where two mixins wrap the same pass. The rollout log-probs must answer the pi_old pass before the
padding-free mixin runs a forward for it (tests/trainer/test_mixins.py shows the swapped order running it), and so must the
aligned mixin's skipped TRL pi_old pass. The MoE mixin is outermost so that it records the pass that is really
computed (the aligned one, per micro-batch) and disarms at the first pass on the policy model whoever answers it
(otherwise it could record the PEFT reference pass); its hooks are off whenever padding-free or rollout log-probs are
on, since the routing record needs an unpacked forward. The padding-free mixin ends the log-prob chain when it is on:
an override placed below it is not reached. The vLLM checks sit inside the CPU mixin, so that use_vllm=True without
vLLM is refused first, and their engine-error wrapper sees the engine dtype the CPU mixin passes.
"""

from __future__ import annotations

import inspect
import math
import shutil
import textwrap
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer

from . import metrics as names
from .aligned_pi_old import AlignedPiOldMixin, policy_pass_arguments
from .banner import distributed_backend, start_banner
from .checkpoints import checkpoint_problem, write_complete_mark
from .config import GSPOConfig, upgrade_grpo_config
from .diagnostics import RolloutDiagnosticsMixin
from .moe import MoERoutingMixin
from .noise import make_ratio_passes_deterministic
from .objective import (
    compute_policy_objective,
    grpo_metric_sums,
    grpo_metrics,
    length_normalized_is_weight,
    objective_metric_sums,
    objective_metrics,
    outside_clip_band_counts,
)
from .packing import PaddingFreeMixin
from .rollout_buffer import load_rollout_buffer
from .rollout_logprobs import RolloutLogprobsMixin
from .token_rewards import TokenRewardsMixin
from .trl_api import check_trl_private_api, check_trl_private_attributes
from .vllm_checks import VLLMChecksMixin
from .vllm_cpu import VLLMColocateCPUMixin

logger = logging.get_logger(__name__)

# Saved in each checkpoint folder, one per rank: the rollout the run is in the middle of.
ROLLOUT_BUFFER_FILE = "gspo_rollout_buffer_rank{rank}.pt"


class GSPOTrainer(
    MoERoutingMixin,
    AlignedPiOldMixin,
    RolloutLogprobsMixin,
    PaddingFreeMixin,
    TokenRewardsMixin,
    RolloutDiagnosticsMixin,
    VLLMColocateCPUMixin,
    VLLMChecksMixin,
    GRPOTrainer,
):
    """Group Sequence Policy Optimization (Zheng et al., 2025) on TRL's GRPOTrainer.

    Takes exactly GRPOTrainer's arguments and is a drop-in replacement for it. `args` may be a GSPOConfig, a
    GRPOConfig (upgraded by `trl_gspo.config.upgrade_grpo_config`: fields that differ from GRPOConfig's defaults are
    kept, the clip range as a pair, the rest take GSPO's defaults; a warning names both lists) or None (GSPOConfig
    defaults). Overrides `_compute_loss` for the algorithm and `_save_checkpoint` / `_load_optimizer_and_scheduler`
    for exact resumes; the features are the mixins of the class statement (module docstring). Prints one start line
    on the main process (trl_gspo/banner.py) and logs every metric GRPOTrainer logs for the same configuration.
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
            args, notice = upgrade_grpo_config(args)  # the rule: trl_gspo/config.py
            logger.warning(notice)
        self._rollout_optimizer_step = None  # state.global_step when the current training rollout was generated
        super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        check_trl_private_attributes(self)
        make_ratio_passes_deterministic(self.args, self.model, self.ref_model)  # GSPOConfig.disable_dropout
        self._print_start_banner()

    def _print_start_banner(self):
        """Once, on the main process: world size, backend, mixed precision and GSPO settings (trl_gspo/banner.py)."""
        if self.accelerator.is_main_process:
            backend = distributed_backend(self.accelerator)
            world = self.accelerator.num_processes
            precision, device_type = self.accelerator.mixed_precision, self.accelerator.device.type
            print(start_banner(world, backend, precision, self.args, device_type), flush=True)

    def _save_checkpoint(self, model, trial):
        """Also save this rank's buffered rollout, so that a resume inside a rollout continues it exactly; then mark
        the checkpoint complete, and only then delete old ones (save_total_limit).

        GRPOTrainer keeps one generation batch for steps_per_generation * num_iterations micro-steps and does not
        checkpoint it: a run resumed mid-rollout would generate a new batch from a newer policy. The mark
        (trl_gspo/checkpoints.py) is written by the main process once every rank has written its files, the rollout
        buffer included; `--resume true` takes only marked checkpoints. Transformers rotates old checkpoints at the
        end of its own save, before the buffer and the mark: it would delete the previous complete checkpoint while
        this one is still incomplete, so the rotation (transformers' own, which keeps the newest) runs after the mark.
        """
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

    def _generate_and_score_completions(self, inputs):
        """TRL's rollout; length-normalised engine weights where they apply (`_length_normalize_engine_weights`).
        Notes the optimizer step the rollout's policy is at: pi_old is that policy (`_before_first_update_of_rollout`)."""
        if self.model.training:
            self._rollout_optimizer_step = self.state.global_step
        output = super()._generate_and_score_completions(inputs)
        if (
            self.importance_sampling_level != "token"  # TRL's own loss: its product-form weights
            and self.use_vllm
            and self.vllm_importance_sampling_correction
            and self.vllm_importance_sampling_mode.startswith("sequence")
            and self.args.vllm_importance_sampling_length_normalized
        ):
            self._length_normalize_engine_weights(output)
        return output

    def _length_normalize_engine_weights(self, output: dict) -> None:
        """Replace TRL's product-form `importance_sampling_ratio` of a rollout (vLLM importance correction, a
        "sequence_*" mode) with `length_normalized_is_weight` from TRL's pi_old and the engine's log-probs: the
        weights the loss applies. The `sampling/importance_sampling_ratio/{min,mean,max}` TRL logged for the rollout
        are replaced too, by those of these weights over the non-empty sequences of all processes."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        weights = length_normalized_is_weight(
            output["old_per_token_logps"],
            output["sampling_per_token_logps"],
            mask,
            self.vllm_importance_sampling_mode,
            self.vllm_importance_sampling_clip_min,
            self.vllm_importance_sampling_clip_max,
            self.args.log_ratio_bound,
        )
        output["importance_sampling_ratio"] = weights.unsqueeze(1)
        in_loss = self.accelerator.gather(weights.masked_fill(mask.sum(-1) == 0, math.nan))
        in_loss = in_loss[~torch.isnan(in_loss)]
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, reduce in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
            values = metrics[f"sampling/importance_sampling_ratio/{name}"]
            values.pop()  # TRL's product-form value for this rollout
            if in_loss.numel():
                values.append(reduce(in_loss).item())

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

        # 1. log pi_theta of the completion tokens (float32), entropies, MoE aux loss; the aligned pi_old pass makes
        # the same call (trl_gspo/aligned_pi_old.py)
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        pass_args, model_inputs = policy_pass_arguments(inputs)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, *pass_args, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled, **model_inputs
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
            # (B, 1) in a sequence mode (length-normalised by default: _generate_and_score_completions), else (B, T)
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

        self._log_objective_metrics(mode, out, entropies, mask, per_token_logps, old_per_token_logps, advantages)
        return loss

    def _log_entropy_bonus_metrics(self, mode, policy_loss):
        """With an entropy bonus, the two metrics GRPOTrainer logs next to it, under its names:
        policy_loss    the objective's loss before the bonus, not scaled for accumulation (mean over ranks)
        entropy_coef   the bonus coefficient, once per optimizer step in training
        """
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
        if mode == "train" and self._before_first_update_of_rollout():
            outside, sequences = self.accelerator.reduce(
                outside_clip_band_counts(out, self.epsilon_low, self.epsilon_high), reduction="sum"
            ).tolist()
            if sequences:
                self._metrics[mode][names.FIRST_STEP_OUTSIDE_CLIP_BAND].append(outside / sequences)

    def _before_first_update_of_rollout(self) -> bool:
        """Whether no optimizer step has happened since this micro-step's rollout was generated: the policy is still
        pi_old, s_i must be exactly 1, and `gspo/first_step_outside_clip_band` (the fraction of sequences outside
        [1 - eps_low, 1 + eps_high]) exactly 0. Compared by optimizer step rather than derived from the micro-step
        counter, so it holds for every schedule, also when a rollout's micro-steps are not a whole number of
        optimizer steps (a rollout may then start or end inside one)."""
        return self._rollout_optimizer_step == self.state.global_step


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
