"""GRPO users keep the features at importance_sampling_level="token" (TRL's own loss): packed passes, MoE drift."""

import math

import pytest
from conftest import SMALL_RUN, completion_length_reward, prompt_dataset

import trl_gspo.packing as packing
from trl_gspo import GSPOConfig, GSPOTrainer

BATCH = dict(SMALL_RUN, max_steps=3)


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


def test_moe_drift_under_packing_with_trls_own_loss(make_model, tokenizer, tmp_path):
    """padding_free=True on a MoE model under TRL's loss: the routing record is kept in the (B, L) layout whatever
    rows the model saw, so the drift metric is logged: exactly 0 before any update, > 0 after."""
    trainer = GSPOTrainer(
        model=make_model("qwen3_moe"),
        reward_funcs=completion_length_reward,
        args=GSPOConfig(
            output_dir=str(tmp_path),
            importance_sampling_level="token",
            padding_free=True,
            steps_per_generation=4,
            **BATCH,
        ),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[0]["moe/routing_drift/token_layer"] == 0.0
    assert all(0 < h["moe/routing_drift/token_layer"] for h in logs[1:])
