"""pi_old computed on exactly the micro-batches the policy pass sees, so that s_i is exactly 1 before any update.

GRPOTrainer computes old_per_token_logps inside `_generate_and_score_completions`, on the whole generation batch in
chunks of `per_device_train_batch_size` rows, then `_prepare_inputs` shuffles the batch and splits it into the
micro-batches of the policy pass. Each micro-batch therefore mixes rows of different pi_old chunks, and a kernel
may reduce in another order for another composition: with packed rows (padding-free) the sequences share rows with
other sequences, and on an accelerator kernels are chosen by shape and content. With unchanged parameters,
|s_i - 1| then reached 6e-5 in bf16 on CPU (packed, tiny Qwen2), a fifth of the paper's clip band, from rounding
alone.

`AlignedPiOldMixin` runs the pi_old pass after the split instead, once per buffered micro-batch and before the
rollout's first optimizer step (so pi_old stays the rollout's policy under gradient accumulation,
steps_per_generation > gradient_accumulation_steps and num_iterations > 1), with the call the policy pass makes
(`policy_pass_arguments`: same tensors concatenated the same way, one chunk, the same aux-loss switch, hence the
same packing). TRL's own pi_old forward is then answered without computing anything (NaN, overwritten before use).
Not aligned, left to TRL:
- `use_rollout_logprobs`: the sampling log-probs are pi_old, no forward to align.
- evaluation: TRL's eval pass already sees the eval batch as the loss does (no shuffle, no split).
- vLLM importance correction: TRL computes the importance ratio from its pi_old inside the rollout, so its pass
  still runs for that; the aligned pass then replaces old_per_token_logps (one extra forward per rollout), and
  TRL's `importance_sampling_ratio` keeps TRL's layout (a rounding-level difference in a correction weight).
"""

from __future__ import annotations

import math

import torch
from trl.models.utils import disable_gradient_checkpointing

from .config import pi_old_pass_runs
from .trl_api import MODEL_INPUT_KEYS, check_trl_private_api, check_trl_private_attributes


def policy_pass_arguments(inputs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of `_get_per_token_logps_and_entropies` for the policy pass of micro-batch `inputs`, less the
    model and the entropy / aux-loss switches: GRPOTrainer's `_compute_loss` call (one chunk, no batch_size)."""
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    args = (
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        completion_ids.size(1),
    )
    return args, {key: inputs.get(key) for key in MODEL_INPUT_KEYS}


class AlignedPiOldMixin:
    """Trainer mixin: old_per_token_logps computed per buffered micro-batch, with the policy pass's own call.

    Overrides:
      _generate_and_score_completions    decides per rollout whether pi_old is aligned; lets TRL skip its pass
      _get_per_token_logps_and_entropies answers TRL's pi_old pass without a forward (NaN) when it is skipped
      _prepare_inputs                    after TRL's shuffle and split, the pi_old pass of every micro-batch
    `_aligned_pi_old_pass(batch)` is the pass of one micro-batch (the MoE mixin wraps it to record the routing).
    Must wrap the padding-free mixin (the skipped pass must not reach a forward) and sit inside the MoE mixin.
    """

    def __init__(self, *args, **kwargs):
        check_trl_private_api()
        self._skip_trl_pi_old_pass = False  # armed during a rollout whose pi_old is computed after the split
        self._pi_old_alignment_pending = False  # a new rollout waits for its micro-batches' pi_old
        super().__init__(*args, **kwargs)
        check_trl_private_attributes(self)

    def _pi_old_per_micro_batch(self) -> bool:
        """Whether the rollout being generated gets its pi_old from `_aligned_pi_old_pass` (see module docstring)."""
        return self.model.training and pi_old_pass_runs(self.args) and not self.args.use_rollout_logprobs

    def _generate_and_score_completions(self, inputs):
        aligned = self._pi_old_per_micro_batch()
        # with vLLM's importance correction TRL needs its own pi_old in the rollout (module docstring)
        self._skip_trl_pi_old_pass = aligned and not (self.use_vllm and self.vllm_importance_sampling_correction)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._skip_trl_pi_old_pass = False
        self._pi_old_alignment_pending = aligned
        return output

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, *args, **kwargs
    ):
        """TRL's pi_old pass (its first pass on the policy model without entropy in the rollout), when skipped: NaN
        of its shape, replaced in `_prepare_inputs` before any loss reads it (a NaN loss, never a silent ratio)."""
        if not (self._skip_trl_pi_old_pass and model is self.model and not compute_entropy):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs
            )
        self._skip_trl_pi_old_pass = False
        placeholder = torch.full((input_ids.size(0), logits_to_keep), math.nan, device=input_ids.device)
        return placeholder, None, None

    def _prepare_inputs(self, generation_batch):
        """TRL's; right after a new rollout is split into `_buffered_inputs`, before the first optimizer step on it,
        every micro-batch gets its pi_old (a resumed buffer already holds them: nothing is recomputed)."""
        inputs = super()._prepare_inputs(generation_batch)
        if self._pi_old_alignment_pending:
            self._pi_old_alignment_pending = False
            for batch in self._buffered_inputs:  # `inputs` is one of them: updated in place
                batch["old_per_token_logps"] = self._aligned_pi_old_pass(batch)
        return inputs

    def _aligned_pi_old_pass(self, batch) -> torch.Tensor:
        """(B, T) log pi_old of one micro-batch: the policy pass's call, without gradients (entropies are computed
        by the fused LM head either way and do not change the log-probs)."""
        args, model_inputs = policy_pass_arguments(batch)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                *args,
                compute_entropy=False,
                compute_aux_loss=self.aux_loss_enabled,
                **model_inputs,
            )
        return logps
