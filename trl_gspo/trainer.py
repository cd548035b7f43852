"""GSPOTrainer: TRL's GRPOTrainer with GSPO's sequence-level importance ratio and clipping.

The trainer overrides one method for the algorithm, `_compute_loss`, and two for checkpoints (the rollout buffer
is saved, so a resume inside a rollout is exact). Generation, rewards, advantages, batching, pi_old and
reference log-probs, vLLM, PEFT, DeepSpeed/FSDP and checkpointing are GRPOTrainer's, untouched. With
`importance_sampling_level="token"` the override hands the micro-batch to GRPOTrainer's own loss (plain GRPO).

What `_compute_loss` keeps from GRPOTrainer, so nothing is dropped silently (TRL issue 6807): tool-token
masking, the entropy mask (GSPO-token), the off-policy sequence mask, vLLM importance correction (length-
normalised by default), the KL term with per-token importance correction, the fixed entropy bonus, the MoE
router aux loss, and gradient-accumulation scaling. What it refuses is refused by GSPOConfig at construction.

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
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging
from trl import GRPOConfig, GRPOTrainer

from .config import GSPOConfig
from .moe import ROUTING_KEY, RouterHooks, drift_fractions, find_routers, router_logits_off, routing_drift_counts
from .objective import compute_policy_objective, length_normalized_is_weight

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
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "get_off_policy_mask": (
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ),
    # MoE routing (trl_gspo/moe.py): the rollout (pi_old pass inside it) and the policy pass
    "_generate_and_score_completions": ("inputs",),
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
    GRPOConfig (upgraded with GSPOConfig.from_grpo_config: the fields you set are kept, the rest take GSPO's
    defaults) or None (GSPOConfig defaults). Overrides `_compute_loss` for the algorithm, and for MoE routing
    `_generate_and_score_completions`, `_get_per_token_logps_and_entropies`, `compute_loss` and `training_step`
    (thin wrappers around GRPOTrainer's); see the module docstring and TRL_PRIVATE_API.
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
            args = GSPOConfig.from_grpo_config(args)
            logger.warning(
                "GSPOTrainer got a GRPOConfig: the fields you set are kept, the rest take GSPO's defaults "
                f"(importance_sampling_level={args.importance_sampling_level!r}, epsilon={args.epsilon}, "
                f"epsilon_high={args.epsilon_high}, loss_type={args.loss_type!r}, steps_per_generation="
                f"{args.steps_per_generation}). Pass a GSPOConfig to silence this."
            )
        super().__init__(model, reward_funcs, args, *posargs, **kwargs)
        self._moe_setup_routing()

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
            # a file this trainer wrote; it may hold non-tensor fields, hence weights_only=False
            self._buffered_inputs = torch.load(path, map_location=self.accelerator.device, weights_only=False)
            self._step = self.state.global_step * self.args.gradient_accumulation_steps

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
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_objective_metrics(mode, out, entropies, mask)
        return loss

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
        if routers and (self.args.log_routing_drift or self.args.routing_replay):
            self._moe_hooks = RouterHooks(routers)

    def _moe_pi_old_pass_runs(self) -> bool:
        """Whether GRPOTrainer computes old_per_token_logps in this rollout (its own condition)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        correction = self.use_vllm and self.vllm_importance_sampling_correction
        return self.args.gradient_accumulation_steps % generate_every != 0 or correction

    def _generate_and_score_completions(self, inputs):
        """GRPOTrainer's rollout, with MoE routing glue around it (see `_moe_rollout`)."""
        with self._moe_rollout():
            output = super()._generate_and_score_completions(inputs)
        return self._moe_attach_routing(output)

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

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """GRPOTrainer's, recording the routing when this is the pi_old pass of a rollout.

        That pass is the first one on the policy model after generation (TRL runs it before the reference pass,
        which with PEFT uses the same model with adapters disabled); `_moe_rollout` arms it only when TRL runs it.
        """
        if not (self._moe_record_armed and model is self.model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
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
