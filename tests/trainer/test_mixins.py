"""The trainer's shape: the mixin order GSPOTrainer pins, why it matters, and the mixins with TRL's own loss."""

import math

import pytest
from conftest import SMALL_RUN, completion_length_reward, prompt_dataset
from trl import GRPOTrainer

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
    """The rollout log-probs answer the pi_old pass only if they see it before the padding-free mixin runs it: the
    two mixins composed in the other order (over GRPOTrainer, with the same GSPOConfig) run a packed pi_old forward."""

    class Swapped(PaddingFreeMixin, RolloutLogprobsMixin, GRPOTrainer):
        pass

    assert packed_forwards_in_a_rollout(GSPOTrainer, make_model, tokenizer, tmp_path / "gspo", monkeypatch) == 0
    assert packed_forwards_in_a_rollout(Swapped, make_model, tokenizer, tmp_path / "swapped", monkeypatch) == 1


def test_padding_free_with_trls_own_loss_gives_its_padded_losses(make_model, tokenizer, tmp_path, monkeypatch):
    """importance_sampling_level='token' hands the loss to GRPOTrainer (dapo, clip 0.2), off-policy: the packed
    passes give the padded run's losses, entropies and clip ratios."""
    packed_calls = []
    original = packing.packed_logps_and_entropies

    def counting(*args, **kwargs):
        packed_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(packing, "packed_logps_and_entropies", counting)
    logs = {}
    for padding_free in (False, True):
        args = GSPOConfig(
            output_dir=str(tmp_path / str(padding_free)),
            importance_sampling_level="token",
            loss_type="dapo",
            steps_per_generation=2,
            padding_free=padding_free,
            **BATCH,
        )
        trainer = GSPOTrainer(
            model=make_model(),
            reward_funcs=completion_length_reward,
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )
        trainer.train()
        logs[padding_free] = [
            (h["loss"], h["entropy"], h["clip_ratio/region_mean"]) for h in trainer.state.log_history if "loss" in h
        ]
        assert bool(packed_calls) == padding_free  # only the packed run packed
    assert len(logs[False]) == 3
    for padded, packed in zip(logs[False], logs[True], strict=True):
        for a, b in zip(padded, packed, strict=True):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-7)


@pytest.mark.parametrize("model_type", ["qwen3_moe"])
def test_moe_drift_with_trls_own_loss(make_model, tokenizer, tmp_path, model_type):
    """The MoE mixin under importance_sampling_level='token' (GRPOTrainer's loss): generation works with router
    logits on, the drift metric is logged, and TRL's loss keeps its load-balancing term."""
    model = make_model(model_type, output_router_logits=True)  # the config setting that crashes generate()
    trainer = GSPOTrainer(
        model=model,
        reward_funcs=completion_length_reward,
        args=GSPOConfig(output_dir=str(tmp_path), importance_sampling_level="token", steps_per_generation=4, **BATCH),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["moe/routing_drift/token_layer"] == 0.0  # before any update
    assert all(0 < h["moe/routing_drift/token_layer"] <= h["moe/routing_drift/token_any_layer"] for h in logs[1:])
    assert "aux_loss" in logs[0]  # TRL's own loss kept its load-balancing term


def test_moe_with_padding_free_turns_the_drift_metric_off(make_model, tokenizer, tmp_path):
    """padding_free=True on a MoE model: the routing record (unpacked) is off, and so is the drift metric."""
    trainer = GSPOTrainer(
        model=make_model("qwen3_moe"),
        reward_funcs=completion_length_reward,
        args=GSPOConfig(output_dir=str(tmp_path), padding_free=True, steps_per_generation=2, **BATCH),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert trainer._moe_hooks is None
    trainer.train()  # packed passes, no routing record
    assert not any("moe/" in key for entry in trainer.state.log_history for key in entry)
