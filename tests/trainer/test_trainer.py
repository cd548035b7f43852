"""GSPOTrainer: the loss it returns against the float64 reference, every GRPOTrainer feature it keeps, drop-in use."""

import math
import warnings

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from helpers import reference_clip_flags, reference_objective
from trl import GRPOConfig, GRPOTrainer

import trl_gspo.trainer as trainer_module
from trl_gspo import GSPOClipRangeWarning, GSPOConfig, GSPOTrainer
from trl_gspo.trainer import check_trl_private_api


def make_trainer(make_model, tokenizer, tmp_path, model_type="qwen2", dataset_kind="conversational", **overrides):
    return GSPOTrainer(
        model=make_model(model_type),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, **overrides),
        train_dataset=prompt_dataset(dataset_kind),
        processing_class=tokenizer,
    )


def synthetic_inputs(trainer, batch=4, prompt_len=3, completion_len=6, noise=2e-2, seed=0):
    """A micro-batch as GRPOTrainer hands it to _compute_loss, with pi_old a perturbation of the current policy."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    prompt_ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(3, vocab, (batch, completion_len), generator=g)
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0  # ragged
    completion_mask[2, 2:] = 0
    logps, entropies = current_logps(trainer, prompt_ids, completion_ids, completion_mask)
    return (
        {
            "prompt_ids": prompt_ids,
            "prompt_mask": torch.ones_like(prompt_ids),
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
            "old_per_token_logps": logps + noise * torch.randn(logps.shape, generator=g),
            "num_items_in_batch": completion_mask.sum(),
        },
        logps,
        entropies,
    )


def current_logps(trainer, prompt_ids, completion_ids, completion_mask):
    with torch.no_grad():
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones_like(prompt_ids), completion_mask], 1),
            completion_ids.size(1),
            compute_entropy=True,
        )
    return logps, entropies


def compute_loss(trainer, inputs, accumulation=1):
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation
    return trainer._compute_loss(trainer.model, inputs)


def reference_for(trainer, inputs, logps, level="sequence", **kwargs):
    return reference_objective(
        level,
        logps.double(),
        inputs["old_per_token_logps"].double(),
        inputs["advantages"].double(),
        inputs["completion_mask"].double(),
        trainer.epsilon_low,
        trainer.epsilon_high,
        **kwargs,
    ).item()


# ------------------------------------------------------------------ training runs where the ratio moves
class RecordingTrainer(GSPOTrainer):
    """Keeps, for every micro-batch, the tensors the objective saw and the loss _compute_loss returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def _compute_loss(self, model, inputs):
        seen = {}
        original = trainer_module.compute_policy_objective

        def spy(level, logps, old, advantages, mask, *rest, **kwargs):
            seen.update(level=level, logps=logps.detach().clone(), old=old.detach().clone())
            seen.update(advantages=advantages.clone(), mask=mask.clone())
            return original(level, logps, old, advantages, mask, *rest, **kwargs)

        trainer_module.compute_policy_objective = spy
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            trainer_module.compute_policy_objective = original
        seen.update(loss=loss.item(), accumulation=self.current_gradient_accumulation_steps)
        self.records.append(seen)
        return loss


@pytest.mark.parametrize(
    "level, dataset_kind, schedule",
    [
        ("sequence", "conversational", {"num_iterations": 2, "steps_per_generation": 1}),
        ("sequence", "standard", {"gradient_accumulation_steps": 2, "steps_per_generation": 4}),
        ("sequence_token", "conversational", {"steps_per_generation": 4}),
    ],
)
def test_off_policy_training_loss_equals_reference(make_model, tokenizer, tmp_path, level, dataset_kind, schedule):
    trainer = RecordingTrainer(
        model=make_model(),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, importance_sampling_level=level, **schedule),
        train_dataset=prompt_dataset(dataset_kind),
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(trainer.records) >= 4
    moved = [r for r in trainer.records if not torch.equal(r["logps"], r["old"])]
    assert moved, "off-policy: pi_old must differ from pi_theta after the first optimizer step"
    for record in trainer.records:
        expected = reference_objective(
            record["level"],
            record["logps"].double(),
            record["old"].double(),
            record["advantages"].double(),
            record["mask"].double(),
            trainer.epsilon_low,
            trainer.epsilon_high,
        ).item()
        assert math.isclose(record["loss"] * record["accumulation"], expected, rel_tol=1e-4, abs_tol=1e-7)
    ratio_max = [h["gspo/seq_ratio/max"] for h in trainer.state.log_history if "gspo/seq_ratio/max" in h]
    assert any(r != 1.0 for r in ratio_max)
    assert {"gspo/clip_ratio/region_mean", "gspo/clipped_token_fraction", "gspo/seq_ratio/std"} <= set(
        trainer.state.log_history[0]
    )


def test_bf16_training(make_model, tokenizer, tmp_path):
    trainer = GSPOTrainer(
        model=make_model(dtype=torch.bfloat16),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, bf16=True, max_steps=3),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_lora_training(make_model, tokenizer, tmp_path, beta):
    from peft import LoraConfig

    trainer = GSPOTrainer(
        model=make_model(),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, beta=beta, max_steps=3),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert trainer.ref_model is None  # with PEFT the reference is the model with its adapter disabled
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in lora.items())
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    if beta:
        assert kls and all(k >= 0 and math.isfinite(k) for k in kls) and max(kls) > 0
    else:
        assert not kls


def test_moe_aux_loss_is_in_the_loss(make_model, tokenizer, tmp_path):
    trainer = make_trainer(make_model, tokenizer, tmp_path, model_type="qwen3_moe")
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01
    inputs, logps, _ = synthetic_inputs(trainer)
    loss = compute_loss(trainer, inputs).item()
    aux = trainer._metrics["train"]["aux_loss"][-1]
    assert aux > 0
    expected = reference_for(trainer, inputs, logps) + trainer.router_aux_loss_coef * aux
    assert math.isclose(loss, expected, rel_tol=1e-5)
    trainer.train()  # and it trains end to end
    assert any("aux_loss" in h for h in trainer.state.log_history)


# ------------------------------------------------------------------ one micro-batch, each feature
@pytest.fixture
def trainer(make_model, tokenizer, tmp_path):
    return make_trainer(make_model, tokenizer, tmp_path)


def test_loss_matches_reference_and_scales_for_accumulation(trainer):
    inputs, logps, _ = synthetic_inputs(trainer)
    expected = reference_for(trainer, inputs, logps)
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)
    assert math.isclose(compute_loss(trainer, inputs, accumulation=4).item(), expected / 4, rel_tol=1e-5)
    assert trainer._metrics["train"]["gspo/clip_ratio/region_mean"][-1] > 0  # noise 2e-2 >> eps: clips fire


def test_on_policy_micro_batch_has_ratio_one(trainer):
    inputs, logps, _ = synthetic_inputs(trainer)
    del inputs["old_per_token_logps"]  # what TRL sends when the step is on-policy
    loss = compute_loss(trainer, inputs).item()
    assert math.isclose(loss, -inputs["advantages"].mean().item(), rel_tol=1e-5, abs_tol=1e-7)
    assert trainer._metrics["train"]["gspo/seq_ratio/max"][-1] == 1.0


def test_off_policy_sequence_mask(trainer):
    inputs, logps, _ = synthetic_inputs(trainer, noise=0.5)
    trainer.off_policy_mask_threshold = 0.1
    sampling = inputs["old_per_token_logps"]
    mask = inputs["completion_mask"].double()
    mean_kl = ((sampling - logps).double() * mask).sum(-1) / mask.sum(-1)
    keep = ((inputs["advantages"] >= 0) | (mean_kl <= 0.1)).double()
    assert 0 < keep.sum() < len(keep), "the case must drop some sequences and keep others"
    expected = reference_for(trainer, inputs, logps, seq_weights=keep)
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)


def as_rollout_with_engine_logps(trainer, inputs, sampling, mode="sequence_truncate", clip=(None, 3.0)):
    """`inputs` as TRL's rollout leaves them with vLLM's importance correction: the engine's log-probs, TRL's
    product-form sequence weight and the rollout's `sampling/importance_sampling_ratio/*` metrics. Returns TRL's
    weights (B,)."""
    mask = inputs["completion_mask"].double()
    product = torch.exp(((inputs["old_per_token_logps"] - sampling).double() * mask).sum(-1)).clamp(*clip).float()
    inputs["sampling_per_token_logps"] = sampling
    inputs["importance_sampling_ratio"] = product.unsqueeze(1)
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip
    for name, value in (("min", product.min()), ("mean", product.mean()), ("max", product.max())):
        trainer._metrics["train"][f"sampling/importance_sampling_ratio/{name}"].append(value.item())
    for name in ("mean", "max"):
        trainer._metrics["train"][f"sampling/sampling_logp_difference/{name}"].append(0.0)
    return product


@pytest.mark.parametrize("length_normalized", [True, False])
def test_vllm_importance_correction(trainer, length_normalized):
    inputs, logps, _ = synthetic_inputs(trainer)
    g = torch.Generator().manual_seed(5)
    sampling = inputs["old_per_token_logps"] + 0.3 * torch.randn(logps.shape, generator=g)
    mask = inputs["completion_mask"].double()
    product = as_rollout_with_engine_logps(trainer, inputs, sampling)
    trainer.args.vllm_importance_sampling_length_normalized = length_normalized
    if length_normalized:
        trainer.model.train()
        trainer._engine_importance_weights([inputs], trainer._metrics["train"])  # what a new rollout gets
        diff = (inputs["old_per_token_logps"] - sampling).double() * mask
        weights = torch.exp(diff.sum(-1) / mask.sum(-1)).clamp(max=3.0)
    else:
        weights = product.double()
    expected = reference_for(trainer, inputs, logps, seq_weights=weights)
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)
    # the rollout's logged weights are those the loss applied, not TRL's product form
    logged = [
        trainer._metrics["train"][f"sampling/importance_sampling_ratio/{name}"] for name in ("min", "mean", "max")
    ]
    assert all(len(values) == 1 for values in logged)
    for values, expected_value in zip(logged, (weights.min(), weights.mean(), weights.max())):
        assert math.isclose(values[0], expected_value.item(), rel_tol=1e-6)
    if length_normalized:
        assert not torch.allclose(weights, product.double(), rtol=1e-3)  # the two forms differ on this batch


def test_length_normalized_engine_weights_leave_empty_sequences_out_of_the_metrics(trainer):
    inputs, logps, _ = synthetic_inputs(trainer)
    inputs["completion_mask"][3] = 0  # no completion token: weight exp(0) = 1, not in the loss
    sampling = inputs["old_per_token_logps"] + 0.3
    as_rollout_with_engine_logps(trainer, inputs, sampling, mode="sequence_mask", clip=(0.5, 3.0))
    trainer.model.train()
    trainer._engine_importance_weights([inputs], trainer._metrics["train"])
    assert inputs["importance_sampling_ratio"].flatten().tolist() == pytest.approx([math.exp(-0.3)] * 3 + [1.0])
    for name in ("min", "mean", "max"):
        assert trainer._metrics["train"][f"sampling/importance_sampling_ratio/{name}"] == pytest.approx(
            [math.exp(-0.3)]
        )


def test_entropy_mask_under_gspo_token(make_model, tokenizer, tmp_path):
    trainer = make_trainer(
        make_model, tokenizer, tmp_path, importance_sampling_level="sequence_token", top_entropy_quantile=0.5
    )
    inputs, logps, entropies = synthetic_inputs(trainer)
    mask = inputs["completion_mask"].bool()
    threshold = torch.quantile(entropies[mask], 0.5)
    keep = ((entropies >= threshold) & mask).double()
    assert 0 < keep.sum() < mask.sum()
    expected = reference_for(trainer, inputs, logps, level="sequence_token", tok_weights=keep)
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)


def test_entropy_bonus(make_model, tokenizer, tmp_path):
    trainer = make_trainer(make_model, tokenizer, tmp_path, entropy_coef=0.1)
    inputs, logps, entropies = synthetic_inputs(trainer)
    mask = inputs["completion_mask"].double()
    mean_entropy = ((entropies.double() * mask).sum() / mask.sum()).item()
    expected = reference_for(trainer, inputs, logps) - 0.1 * mean_entropy
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)


def test_kl_term_with_reference_log_probs(make_model, tokenizer, tmp_path):
    # beta > 0 without PEFT: TRL loads a separate reference model from the policy's path
    path = tmp_path / "model"
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer = GSPOTrainer(
        model=str(path),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, beta=0.04),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.ref_model is not None
    inputs, logps, _ = synthetic_inputs(trainer)
    inputs["ref_per_token_logps"] = logps - 0.1
    expected = reference_for(trainer, inputs, logps, ref=inputs["ref_per_token_logps"].double(), beta=0.04)
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)
    assert trainer._metrics["train"]["kl"][-1] > 0


def test_tool_tokens_are_masked_out(trainer):
    inputs, logps, _ = synthetic_inputs(trainer)
    tool_mask = torch.ones_like(inputs["completion_mask"])
    tool_mask[0, 1:3] = 0
    inputs["tool_mask"] = tool_mask
    masked = dict(inputs, completion_mask=inputs["completion_mask"] * tool_mask)
    expected = reference_for(trainer, masked, logps)
    assert math.isclose(compute_loss(trainer, inputs).item(), expected, rel_tol=1e-5)


def test_token_level_is_trls_own_grpo_loss(make_model, tokenizer, tmp_path):
    trainer = make_trainer(make_model, tokenizer, tmp_path, importance_sampling_level="token", loss_type="bnpo")
    inputs, _, _ = synthetic_inputs(trainer)
    ours = compute_loss(trainer, inputs).item()
    theirs = GRPOTrainer._compute_loss(trainer, trainer.model, inputs).item()
    assert ours == theirs
    assert "gspo/seq_ratio/mean" not in trainer._metrics["train"]


def test_token_level_clips_with_grpo_band_by_default(make_model, tokenizer, tmp_path):
    """The token level's unset clip range is GRPOConfig's: after the first optimizer step of a rollout its token
    ratios stay mostly inside it, where the sequence-sized band clips a large share of the tokens."""
    clipped = {}
    for name, clip in (("default", {}), ("sequence_band", {"epsilon": 3e-4, "epsilon_high": 4e-4})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GSPOClipRangeWarning)  # the sequence band at the token level warns
            trainer = make_trainer(
                make_model, tokenizer, tmp_path / name, importance_sampling_level="token", loss_type="bnpo", **clip
            )
        trainer.train()
        clipped[name] = max(entry["clip_ratio/region_mean"] for entry in trainer.state.log_history[:-1])
    assert clipped["default"] < 0.05 < clipped["sequence_band"], clipped


# ------------------------------------------------------------------ drop-in use, model card, private API
def test_drop_in_replacement_for_grpo_trainer(make_model, tokenizer, tmp_path):
    """A GRPOTrainer script with only the class name changed runs, as GSPO."""
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
    )
    trainer = GSPOTrainer(
        model=make_model(),
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, GSPOConfig)
    assert trainer.importance_sampling_level == "sequence" and trainer.epsilon_low == 3e-4
    trainer.train()
    assert trainer.state.global_step == 2


def test_constructor_takes_grpo_trainers_arguments():
    import inspect

    assert inspect.signature(GSPOTrainer.__init__) == inspect.signature(GRPOTrainer.__init__)


def test_args_none_builds_a_gspo_config(make_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_model()
    model.config._name_or_path = "org/tiny-model"
    # GSPOConfig's bf16 default needs a GPU; pin the CPU the way a CPU user would
    monkeypatch.setattr(trainer_module, "GSPOConfig", lambda output_dir: GSPOConfig(output_dir, use_cpu=True))
    trainer = GSPOTrainer(model, completion_length_reward, train_dataset=prompt_dataset(), processing_class=tokenizer)
    assert isinstance(trainer.args, GSPOConfig) and trainer.args.output_dir.endswith("tiny-model-GSPO")


def test_model_card_names_gspo(trainer, tmp_path):
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "README.md").read_text()
    assert "2507.18071" in card and "GSPO" in card
    header = card.split("---")[1]  # the card's YAML metadata: the hub lists the model under these tags
    assert "- gspo" in header and "- trl-gspo" in header


def test_private_trl_api_is_present():
    check_trl_private_api()  # the installed, pinned trl


def test_private_trl_api_change_is_reported():
    class MovedTrainer:
        def _compute_loss(self, model, batch):  # renamed parameter
            pass

        def get_high_entropy_mask(self, entropies, mask, threshold):
            pass

    with pytest.raises(RuntimeError) as info:
        check_trl_private_api(MovedTrainer)
    message = str(info.value)
    assert "_compute_loss no longer takes ['inputs']" in message
    assert "_get_per_token_logps_and_entropies is gone" in message
    assert "get_high_entropy_mask" not in message
    assert "trl>=1.16,<1.17" in message


def test_saved_tiny_model_round_trips_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from gspo_examples.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "qwen3", hidden_size=16)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.decode(tokenizer("a b\nc").input_ids) == "a b\nc"
    with pytest.raises(ValueError, match="qwen2"):
        save_tiny_model(tmp_path / "qwen2", "qwen2", hidden_size=16)


def test_metrics_match_a_direct_computation(trainer):
    inputs, logps, _ = synthetic_inputs(trainer, noise=1e-3)
    inputs["completion_mask"][3] = 0  # an empty row is left out of every per-sequence statistic
    compute_loss(trainer, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    mask = inputs["completion_mask"].double()
    lengths = mask.sum(-1)
    keep = lengths > 0
    ratio = torch.exp(((logps - inputs["old_per_token_logps"]).double() * mask).sum(-1) / lengths.clamp(min=1))[keep]
    adv = inputs["advantages"][keep].double()
    low = (ratio < 1 - trainer.epsilon_low) & (adv < 0)
    high = (ratio > 1 + trainer.epsilon_high) & (adv > 0)
    assert (low | high).any() and not (low | high).all(), "the case must clip some sequences, not all"
    expected = {
        "gspo/seq_ratio/mean": ratio.mean().item(),
        "gspo/seq_ratio/std": ratio.std(unbiased=False).item(),
        "gspo/seq_ratio/min": ratio.min().item(),
        "gspo/seq_ratio/max": ratio.max().item(),
        "gspo/clip_ratio/low_mean": low.double().mean().item(),
        "gspo/clip_ratio/high_mean": high.double().mean().item(),
        "gspo/clip_ratio/region_mean": (low | high).double().mean().item(),
        "gspo/clip_ratio/low_min": low.double().min().item(),
        "gspo/clip_ratio/high_max": high.double().max().item(),
        "gspo/clipped_token_fraction": ((low | high).double() * lengths[keep]).sum().item() / lengths.sum().item(),
    }
    for name, value in expected.items():
        assert math.isclose(metrics[name], value, rel_tol=1e-5, abs_tol=1e-7), name


@pytest.mark.parametrize("level", ["sequence", "sequence_token"])
@pytest.mark.parametrize("drop", ["off_policy_mask", "importance_sequence_mask"])
def test_clip_metrics_count_what_is_in_the_loss(make_model, tokenizer, tmp_path, level, drop):
    """A sequence of weight 0 is left out of the clip metrics; a log-ratio at the clamp counts as clipped."""
    trainer = make_trainer(make_model, tokenizer, tmp_path, importance_sampling_level=level)
    inputs, logps, _ = synthetic_inputs(trainer)  # advantages 1, -1, 0.5, -0.5
    old = logps.clone()
    old[0] -= 0.5  # ratio e^0.5 with A > 0: the high clip
    old[1] -= 20.0  # log-ratio +20, beyond the bound of 10, with A < 0: clamped, no gradient
    old[2] += 0.5  # ratio e^-0.5 with A > 0: not clipped
    old[3] += 1.0  # ratio e^-1 with A < 0: the low clip, but the sequence is dropped below
    inputs["old_per_token_logps"] = old
    mask = inputs["completion_mask"].double()
    if drop == "off_policy_mask":
        trainer.off_policy_mask_threshold = 0.1
        mean_kl = ((old - logps).double() * mask).sum(-1) / mask.sum(-1)  # sampling log-probs default to pi_old
        weights = ((inputs["advantages"] >= 0) | (mean_kl <= 0.1)).double()
    else:
        sampling = old.clone()
        sampling[3] -= 1.0  # engine weight e^1, outside [0.5, 2]: masked to 0
        as_rollout_with_engine_logps(trainer, inputs, sampling, mode="sequence_mask", clip=(0.5, 2.0))
        trainer.args.vllm_importance_sampling_length_normalized = True
        trainer.model.train()
        trainer._engine_importance_weights([inputs], trainer._metrics["train"])
        is_weight = torch.exp(((old - sampling).double() * mask).sum(-1) / mask.sum(-1))
        weights = torch.where((is_weight < 0.5) | (is_weight > 2.0), 0.0, is_weight)
    assert weights[3] == 0 and (weights[:3] != 0).all(), "the case must drop exactly the clipped sequence 3"
    assert math.isclose(
        compute_loss(trainer, inputs).item(),
        reference_for(trainer, inputs, logps, level, seq_weights=weights),
        rel_tol=1e-5,
    )
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    counted, low, high = reference_clip_flags(
        level,
        logps.double(),
        old.double(),
        inputs["advantages"].double(),
        mask,
        trainer.epsilon_low,
        trainer.epsilon_high,
        seq_weights=weights,
    )
    rows = [i for i in range(len(counted)) if (any(counted[i]) if level == "sequence_token" else counted[i])]
    if level == "sequence":  # a clipped sequence: all its tokens
        loss_tokens = {i: mask[i].sum().item() for i in rows}
        low_tokens = {i: loss_tokens[i] * low[i] for i in rows}
        high_tokens = {i: loss_tokens[i] * high[i] for i in rows}
    else:
        loss_tokens = {i: sum(counted[i]) for i in rows}
        low_tokens, high_tokens = ({i: sum(flags[i]) for i in rows} for flags in (low, high))
    low_fraction = [low_tokens[i] / loss_tokens[i] for i in rows]
    high_fraction = [high_tokens[i] / loss_tokens[i] for i in rows]
    expected = {
        "gspo/clip_ratio/low_mean": sum(low_fraction) / len(rows),
        "gspo/clip_ratio/high_mean": sum(high_fraction) / len(rows),
        "gspo/clip_ratio/region_mean": (sum(low_fraction) + sum(high_fraction)) / len(rows),
        "gspo/clip_ratio/low_min": min(low_fraction),
        "gspo/clip_ratio/high_max": max(high_fraction),
        "gspo/clipped_token_fraction": sum(low_tokens[i] + high_tokens[i] for i in rows) / sum(loss_tokens.values()),
    }
    assert rows == [0, 1, 2] and expected["gspo/clip_ratio/high_mean"] == 2 / 3
    for name, value in expected.items():
        assert math.isclose(metrics[name], value, rel_tol=1e-6, abs_tol=1e-9), name
