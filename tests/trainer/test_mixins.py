"""The trainer's shape: the mixin order GSPOTrainer pins, why it matters, and the mixins on TRL's plain GRPOTrainer."""

import math

import pytest
from conftest import SMALL_RUN, completion_length_reward, prompt_dataset
from trl import GRPOConfig, GRPOTrainer

import trl_gspo.packing as packing
from trl_gspo import GSPOConfig, GSPOTrainer
from trl_gspo.aligned_pi_old import AlignedPiOldMixin
from trl_gspo.diagnostics import RolloutDiagnosticsMixin
from trl_gspo.moe import MoERoutingMixin
from trl_gspo.packing import PaddingFreeMixin
from trl_gspo.rollout_logprobs import RolloutLogprobsMixin
from trl_gspo.token_rewards import TokenRewardsMixin
from trl_gspo.vllm_checks import VLLMChecksMixin
from trl_gspo.vllm_cpu import VLLMColocateCPUMixin

BATCH = dict(SMALL_RUN, max_steps=3)


def test_gspo_trainer_wraps_grpo_trainer_in_the_documented_order():
    assert GSPOTrainer.__mro__[1:10] == (
        MoERoutingMixin,
        AlignedPiOldMixin,
        RolloutLogprobsMixin,
        PaddingFreeMixin,
        TokenRewardsMixin,
        RolloutDiagnosticsMixin,
        VLLMColocateCPUMixin,
        VLLMChecksMixin,
        GRPOTrainer,
    )


def packed_forwards_in_a_rollout(trainer_cls, make_model, tokenizer, tmp_path, monkeypatch):
    """Packed forwards run while one rollout is generated and scored (beta=0: the pi_old pass is the only one)."""
    calls = []
    original = packing.packed_logps_and_entropies

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(packing, "packed_logps_and_entropies", counting)
    args = GSPOConfig(
        output_dir=str(tmp_path),
        padding_free=True,
        use_rollout_logprobs=True,
        rollout_logprobs_check_interval=0,  # never recompute pi_old to check
        **BATCH,
    )
    trainer = trainer_cls(
        model=make_model(),
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    trainer._generate_and_score_completions([dict(row) for row in prompt_dataset().select(range(8))])
    return len(calls)


def test_rollout_logprobs_must_wrap_padding_free(make_model, tokenizer, tmp_path, monkeypatch):
    """The rollout log-probs answer the pi_old pass only if they see it before the padding-free mixin runs it."""

    class Swapped(PaddingFreeMixin, RolloutLogprobsMixin, GRPOTrainer):
        pass

    class Ordered(RolloutLogprobsMixin, PaddingFreeMixin, GRPOTrainer):
        pass

    assert packed_forwards_in_a_rollout(GSPOTrainer, make_model, tokenizer, tmp_path / "gspo", monkeypatch) == 0
    assert packed_forwards_in_a_rollout(Ordered, make_model, tokenizer, tmp_path / "ordered", monkeypatch) == 0
    assert packed_forwards_in_a_rollout(Swapped, make_model, tokenizer, tmp_path / "swapped", monkeypatch) == 1


class PaddingFreeGRPOTrainer(PaddingFreeMixin, GRPOTrainer):
    """What a GRPO user writes to take the padding-free passes."""


def test_padding_free_on_plain_grpo_trainer_gives_trls_losses(make_model, tokenizer, tmp_path):
    """TRL's own token-level loss (GRPOConfig defaults: dapo, clip 0.2), off-policy: padded vs packed passes."""
    logs = {}
    for cls in (GRPOTrainer, PaddingFreeGRPOTrainer):
        trainer = cls(
            model=make_model(),
            reward_funcs=completion_length_reward,
            args=GRPOConfig(output_dir=str(tmp_path / cls.__name__), steps_per_generation=2, **BATCH),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )
        trainer.train()
        logs[cls] = [
            (h["loss"], h["entropy"], h["clip_ratio/region_mean"]) for h in trainer.state.log_history if "loss" in h
        ]
    assert len(logs[GRPOTrainer]) == 3
    for padded, packed in zip(logs[GRPOTrainer], logs[PaddingFreeGRPOTrainer], strict=True):
        for a, b in zip(padded, packed, strict=True):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7)
    # the packed trainer really packed (its layout is kept after each packed forward)
    assert trainer.packed_layout is not None


class MoEGRPOTrainer(MoERoutingMixin, GRPOTrainer):
    """What a GRPO user writes to take the routing drift metric and the generation fix."""


@pytest.mark.parametrize("model_type", ["qwen3_moe"])
def test_moe_drift_on_plain_grpo_trainer(make_model, tokenizer, tmp_path, model_type):
    model = make_model(model_type, output_router_logits=True)  # the config setting that crashes generate()
    trainer = MoEGRPOTrainer(
        model=model,
        reward_funcs=completion_length_reward,
        args=GRPOConfig(output_dir=str(tmp_path), steps_per_generation=4, **BATCH),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["moe/routing_drift/token_layer"] == 0.0  # before any update
    assert all(0 < h["moe/routing_drift/token_layer"] <= h["moe/routing_drift/token_any_layer"] for h in logs[1:])
    assert "aux_loss" in logs[0]  # TRL's own loss kept its load-balancing term


def test_moe_and_padding_free_on_plain_grpo_trainer_turn_the_drift_metric_off(make_model, tokenizer, tmp_path, caplog):
    """A GRPOConfig has no padding_free field: the composed mixin is on, so the routing record (unpacked) is off."""

    class Both(MoERoutingMixin, PaddingFreeMixin, GRPOTrainer):
        pass

    trainer = Both(
        model=make_model("qwen3_moe"),
        reward_funcs=completion_length_reward,
        args=GRPOConfig(output_dir=str(tmp_path), steps_per_generation=2, **BATCH),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert trainer._moe_hooks is None
    trainer.train()  # packed passes, no routing record
    assert not any("moe/" in key for entry in trainer.state.log_history for key in entry)
