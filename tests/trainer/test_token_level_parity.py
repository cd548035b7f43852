"""importance_sampling_level="token" is TRL's GRPO: GSPOTrainer's loss and gradient equal GRPOTrainer's.

A GRPO user keeps the plugin's features (padding-free passes, per-micro-batch pi_old, checks) by switching to
`GSPOTrainer(args=GSPOConfig(importance_sampling_level="token", ...))`; the loss must stay TRL's. Both trainers are
built from the same saved tiny model with the same fields (GSPOConfig re-defaults several GRPOConfig fields, so every
one that matters is given explicitly and the two configs are compared field by field), one rollout is produced by
GSPOTrainer, and the same micro-batch goes to both trainers' `compute_loss`: loss and parameter gradients must agree
in float32 on CPU. Cases: TRL's default aggregation ("dapo") on padded rows, "grpo" aggregation, the KL term (a
reference model), an off-policy schedule (old_per_token_logps in the batch) with and without KL, and padding-free
passes (GSPOTrainer only; TRL's stay padded).
"""

import dataclasses

import pytest
import torch
from conftest import SMALL_RUN, completion_length_reward, prompt_dataset
from trl import GRPOConfig, GRPOTrainer

from trl_gspo import GSPOConfig, GSPOTrainer

# Every GRPOConfig field GSPOConfig gives another default (or that decides the loss), set on both: TRL's values
TOKEN_LEVEL = dict(
    importance_sampling_level="token",
    epsilon=0.2,
    epsilon_high=0.28,  # not epsilon: a swapped or dropped bound would show
    loss_type="dapo",
    beta=0.0,
    disable_dropout=True,
    gradient_accumulation_steps=1,
    steps_per_generation=1,
)
CASES = {
    "padded": {},
    "grpo_aggregation": dict(loss_type="grpo"),
    "kl": dict(beta=0.04),
    "off_policy": dict(steps_per_generation=2),
    "off_policy_kl": dict(steps_per_generation=2, beta=0.04),
    "padding_free": dict(steps_per_generation=2, padding_free=True),
}
GSPO_ONLY = {"padding_free"}  # GSPOConfig fields GRPOConfig does not have (TRL then computes padded)
# fields that may differ: where the run writes
RUN_LOCATION = {"output_dir", "logging_dir", "run_name"}


@pytest.fixture
def model_path(make_model, tokenizer, tmp_path):
    """A saved tiny model: both trainers (and, with beta > 0, their reference models) load the same weights."""
    path = tmp_path / "model"
    make_model("qwen2").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build(trainer_class, config_class, model_path, tokenizer, output_dir, fields):
    args = config_class(output_dir=str(output_dir), **{**SMALL_RUN, **fields})
    return trainer_class(
        model=model_path,
        reward_funcs=completion_length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )


def perturb(model, seed=1, std=0.05):
    """Move every parameter by the same seeded noise: the policy some updates after the rollout, so that token
    ratios leave the clip range on both sides and the policy differs from the reference model (KL)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))


def completion_logps(model, inputs):
    """(B, T) log-probs of the completion tokens, a plain forward (temperature 1)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -inputs["completion_ids"].size(1) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)


def loss_and_grads(trainer, inputs):
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    loss = trainer.compute_loss(trainer.model, {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", CASES)
def test_token_level_loss_and_gradient_equal_grpo_trainer(model_path, tokenizer, tmp_path, case):
    fields = {**TOKEN_LEVEL, **CASES[case]}
    gspo = build(GSPOTrainer, GSPOConfig, model_path, tokenizer, tmp_path / "gspo", fields)
    grpo = build(
        GRPOTrainer,
        GRPOConfig,
        model_path,
        tokenizer,
        tmp_path / "grpo",
        {k: v for k, v in fields.items() if k not in GSPO_ONLY},
    )
    differing = {
        f.name
        for f in dataclasses.fields(GRPOConfig)
        if f.init and getattr(gspo.args, f.name) != getattr(grpo.args, f.name)
    }
    assert differing <= RUN_LOCATION, {
        name: (getattr(gspo.args, name), getattr(grpo.args, name)) for name in differing
    }
    for (name, mine), (_, theirs) in zip(gspo.model.named_parameters(), grpo.model.named_parameters(), strict=True):
        assert torch.equal(mine, theirs), name

    # one rollout, by GSPOTrainer: each prompt num_generations times, as TRL's sampler hands them out
    per_rollout = fields["steps_per_generation"] * SMALL_RUN["per_device_train_batch_size"]
    prompts = prompt_dataset().select(range(per_rollout // SMALL_RUN["num_generations"]))
    gspo.model.train()
    torch.manual_seed(0)
    inputs = gspo._prepare_inputs([dict(row) for row in prompts for _ in range(SMALL_RUN["num_generations"])])
    lengths = inputs["completion_mask"].sum(1)
    assert (lengths > 0).all() and (lengths < inputs["completion_mask"].size(1)).any()  # ragged: padded rows
    assert ("old_per_token_logps" in inputs) == (fields["steps_per_generation"] > 1)
    assert ("ref_per_token_logps" in inputs) == (fields["beta"] > 0)
    perturb(gspo.model)
    perturb(grpo.model)
    if "old_per_token_logps" in inputs:  # some tokens are clipped (no gradient from their ratio), some are not
        ratio = torch.exp(completion_logps(grpo.model, inputs) - inputs["old_per_token_logps"])
        advantage = inputs["advantages"][:, None].expand_as(ratio)
        in_loss = inputs["completion_mask"].bool() & (advantage != 0)
        low, high = (
            (ratio < 1 - fields["epsilon"]) & (advantage < 0),
            (ratio > 1 + fields["epsilon_high"]) & (advantage > 0),
        )
        assert (in_loss & (low | high)).any() and (in_loss & ~(low | high)).any()

    gspo_loss, gspo_grads = loss_and_grads(gspo, inputs)
    grpo_loss, grpo_grads = loss_and_grads(grpo, inputs)
    assert grpo_loss != 0
    # padded: the same computation; packed rows agree with padded ones to float32 rounding (docs/PACKING.md)
    tolerance = dict(rtol=1e-5, atol=1e-6) if fields.get("padding_free") else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gspo_loss, grpo_loss, **tolerance)
    assert gspo_grads.keys() == grpo_grads.keys() and gspo_grads
    for name, grad in grpo_grads.items():
        torch.testing.assert_close(gspo_grads[name], grad, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
