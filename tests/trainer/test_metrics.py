"""What GSPOTrainer logs: the keys GRPOTrainer logs equal GRPOTrainer's values on the same micro-batch, and every key
a run logs is in trl_gspo/metrics.py's registry (and every key of GSPO's own there is logged by one of a few runs)."""

import math

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from test_moe import tiny_moe
from test_trainer import compute_loss, make_trainer, synthetic_inputs
from trl import GRPOTrainer

from trl_gspo import GSPOTrainer
from trl_gspo import metrics as names

# --- the keys GRPOTrainer logs from its loss, against GRPOTrainer itself -------------------------------------------

TRL_CLIP_KEYS = [
    names.CLIP_LOW_MEAN,
    names.CLIP_HIGH_MEAN,
    names.CLIP_REGION_MEAN,
    names.CLIP_LOW_MIN,
    names.CLIP_HIGH_MAX,
]


def last_metrics(trainer) -> dict[str, float]:
    return {key: values[-1] for key, values in trainer._metrics["train"].items()}


def grpo_trainers_metrics(trainer, inputs) -> dict[str, float]:
    """What GRPOTrainer._compute_loss with importance_sampling_level="sequence" logs for `inputs` on this trainer's
    model and settings."""
    level = trainer.importance_sampling_level
    trainer.importance_sampling_level = "sequence"
    try:
        trainer._metrics["train"].clear()
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    finally:
        trainer.importance_sampling_level = level
    return last_metrics(trainer)


def gspo_trainers_metrics(trainer, inputs) -> dict[str, float]:
    trainer._metrics["train"].clear()
    compute_loss(trainer, inputs)
    return last_metrics(trainer)


def assert_same(ours, theirs, keys):
    for key in keys:
        assert key in theirs and key in ours, key
        assert math.isclose(ours[key], theirs[key], rel_tol=1e-6, abs_tol=1e-9) or (
            math.isnan(ours[key]) and math.isnan(theirs[key])
        ), (key, ours[key], theirs[key])


def test_grpo_keys_equal_grpo_trainers_values_with_masked_and_empty_rows(make_model, tokenizer, tmp_path):
    """An empty row, a tool mask, the off-policy mask dropping sequences, an entropy bonus and a MoE aux loss: every
    key GRPOTrainer logs has GRPOTrainer's value (GSPO's own clip fractions, which count only the sequences in the
    loss, are tested in test_trainer.py)."""
    trainer = make_trainer(make_model, tokenizer, tmp_path, model_type="qwen3_moe", entropy_coef=0.1)
    inputs, logps, _ = synthetic_inputs(trainer, noise=0.1)
    inputs["completion_mask"][2] = 0  # an empty row
    tool_mask = torch.ones_like(inputs["completion_mask"])
    tool_mask[0, 1:3] = 0
    inputs["tool_mask"] = tool_mask
    trainer.off_policy_mask_threshold = 0.05
    mask = (inputs["completion_mask"] * tool_mask).double()
    mean_kl = ((inputs["old_per_token_logps"] - logps).double() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    assert ((inputs["advantages"] < 0) & (mean_kl > 0.05)).any(), "the off-policy mask must drop a sequence"
    theirs = grpo_trainers_metrics(trainer, inputs)
    ours = gspo_trainers_metrics(trainer, inputs)
    keys = [*TRL_CLIP_KEYS, names.ENTROPY, names.AUX_LOSS, names.POLICY_LOSS, names.ENTROPY_COEF]
    assert_same(ours, theirs, keys)
    assert 0 < theirs[names.CLIP_REGION_MEAN] < 1, "the case must clip some rows, not all"


@pytest.fixture
def trainer(make_model, tokenizer, tmp_path):
    return make_trainer(make_model, tokenizer, tmp_path)


def test_kl_is_grpo_trainers_kl(trainer):
    """beta > 0 with GRPOConfig's use_bias_correction_kl=True: GRPOTrainer weights the logged KL by s_i."""
    assert trainer.args.use_bias_correction_kl
    inputs, logps, _ = synthetic_inputs(trainer, noise=0.5)
    inputs["ref_per_token_logps"] = logps - 0.3 * torch.rand(logps.shape, generator=torch.Generator().manual_seed(1))
    trainer.beta = 0.04
    theirs = grpo_trainers_metrics(trainer, inputs)
    ours = gspo_trainers_metrics(trainer, inputs)
    assert_same(ours, theirs, [names.KL, names.ENTROPY, *TRL_CLIP_KEYS])


def test_gspo_token_with_per_token_advantages_logs_grpo_trainers_token_means(make_model, tokenizer, tmp_path):
    """(B, T) advantages whose sign changes along a sequence: GRPOTrainer's flags are per token, averaged over the
    completion tokens, its extremes over each row's token mean (NaN rows left out)."""
    trainer = make_trainer(make_model, tokenizer, tmp_path, importance_sampling_level="sequence_token")
    inputs, _, _ = synthetic_inputs(trainer, noise=0.5)
    inputs["completion_mask"][3] = 0
    inputs["advantages"] = inputs["advantages"].unsqueeze(1) * torch.linspace(-1.0, 1.5, 6)
    theirs = grpo_trainers_metrics(trainer, inputs)
    ours = gspo_trainers_metrics(trainer, inputs)
    assert_same(ours, theirs, [*TRL_CLIP_KEYS, names.ENTROPY])
    assert 0 < theirs[names.CLIP_LOW_MIN] < 1 or 0 < theirs[names.CLIP_HIGH_MAX] < 1  # token means, not flags


def first_char_span(completions, **kwargs):
    """A span reward: -1 on the first character of every completion longer than one character, 0.5 on the rest."""
    texts = [c[-1]["content"] for c in completions]
    return [[(0, 1, -1.0), (1, len(t), 0.5)] if len(t) > 1 else 0.0 for t in texts]


# --- every key a run logs is in the registry, every key of GSPO's own is logged by one of these runs ---------------


def logged_keys(trainer) -> set[str]:
    trainer.train()
    return {key for entry in trainer.state.log_history for key in entry if key != "step"}


def test_registry_covers_what_runs_log_and_runs_log_every_gspo_key(make_model, tokenizer, tmp_path):
    """Three short runs switch every feature that logs on: the sequence level on a MoE model with rollout routing
    replay, a KL term and an entropy bonus; GSPO-token with a span reward, padding-free passes and rollout log-probs
    checked every rollout; GRPOTrainer's own loss at the token level."""
    moe_path = tmp_path / "moe"
    tiny_moe(tokenizer, "qwen3_moe").save_pretrained(moe_path)
    tokenizer.save_pretrained(moe_path)
    runs = {
        "moe": GSPOTrainer(
            model=str(moe_path),  # a folder, so that beta > 0 loads the reference model from it
            reward_funcs=completion_length_reward,
            args=small_config(
                tmp_path / "moe_run",
                max_steps=2,
                steps_per_generation=4,
                gradient_accumulation_steps=2,
                per_device_train_batch_size=4,
                rollout_routing_replay=True,
                beta=0.04,
                entropy_coef=0.01,
            ),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        ),
        "token_rewards": GSPOTrainer(
            model=make_model("qwen3"),
            reward_funcs=[completion_length_reward, first_char_span],
            args=small_config(
                tmp_path / "token_rewards_run",
                max_steps=2,
                importance_sampling_level="sequence_token",
                padding_free=True,
                use_rollout_logprobs=True,
                rollout_logprobs_check_interval=1,
            ),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        ),
        "token": make_trainer(
            make_model, tokenizer, tmp_path / "token_run", importance_sampling_level="token", max_steps=1
        ),
    }
    logged = {name: logged_keys(trainer) for name, trainer in runs.items()}
    unregistered = {key for keys in logged.values() for key in keys if names.find(key) is None}
    assert not unregistered, f"logged but not in trl_gspo/metrics.py: {sorted(unregistered)}"
    everything = set().union(*logged.values())
    never_logged = [key for key in names.keys(names.GSPO) if key not in everything]
    assert not never_logged, f"registered but logged by none of the runs: {never_logged}"
    # TRL's loss at the token level logs no key of GSPO's objective; ours logs TRL's next to its own
    assert not any(key.startswith("gspo/clip") for key in logged["token"])
    assert {*TRL_CLIP_KEYS, names.KL, names.AUX_LOSS, names.POLICY_LOSS} <= logged["moe"]
