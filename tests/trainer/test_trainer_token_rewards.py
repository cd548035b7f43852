"""GSPOTrainer with token and span rewards (GSPO-token), mixed with plain rewards, and the checks on reward values."""

import math
from unittest import mock

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config, small_trainer
from helpers import reference_token_component

import trl_gspo.token_rewards as token_rewards_module
from trl_gspo.objective import compute_policy_objective
from trl_gspo.token_rewards import TokenRewardError, token_level_reward


def first_char_span(completions, **kwargs):
    """-1 on the first character of every non-empty completion, 0.5 on the rest; a number for an empty one."""
    texts = [c[-1]["content"] for c in completions]
    return [[(0, 1, -1.0), (1, len(t), 0.5)] if len(t) > 1 else 0.0 for t in texts]


def make_trainer(make_model, tokenizer, tmp_path, reward_funcs, **overrides):
    overrides.setdefault("importance_sampling_level", "sequence_token")
    return small_trainer(make_model("qwen2"), tokenizer, tmp_path, reward_funcs, **overrides)


def rollout_rows(trainer, prompts=2):
    rows = [trainer.train_dataset[i] for i in range(prompts)]
    return [row for row in rows for _ in range(trainer.num_generations)]


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def naive_token_advantages(tokenizer, out, group_size, weight, formulation):
    """float64 reference for rewards [completion_length_reward, first_char_span]: TRL's sequence advantage from the
    plain reward plus the spans' sums, plus weight times the token component (helpers.reference_token_component)."""
    mask = out["completion_mask"].float()
    texts = tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    seq_rewards, token_rewards = [], []
    width = out["completion_ids"].size(1)
    for i, text in enumerate(texts):
        ids = out["completion_ids"][i, : int(mask[i].sum())].tolist()
        values, position = [], 0
        for token_id in ids:  # each token's characters, decoded on its own; special tokens (eos, unk) have none
            chars = len(tokenizer.decode([token_id], skip_special_tokens=True))
            values.append(0.0 if chars == 0 or len(text) < 2 else (-1.0 if position == 0 else 0.5))
            position += chars
        token_rewards.append(values + [0.0] * (width - len(values)))
        seq_rewards.append(float(len(text) % 4) + (-0.5 if len(text) > 1 else 0.0))
    component = reference_token_component(formulation, token_rewards, mask.tolist(), group_size)
    expected = torch.zeros(len(texts), width, dtype=torch.float64)
    for g in range(0, len(texts), group_size):
        group = seq_rewards[g : g + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for i in range(g, g + group_size):
            for t in range(int(mask[i].sum())):
                expected[i, t] = (seq_rewards[i] - mean) / (std + 1e-4) + weight * component[i][t]
    return expected


def test_span_rewards_give_per_token_advantages_and_the_loss_uses_them(make_model, tokenizer, tmp_path):
    trainer = make_trainer(
        make_model, tokenizer, tmp_path, [completion_length_reward, first_char_span], token_advantage_weight=0.5
    )
    trainer.model.train()
    torch.manual_seed(0)
    rows = rollout_rows(trainer)
    out = trainer._generate_and_score_completions(rows)
    advantages, mask = out["advantages"], out["completion_mask"].float()
    assert advantages.shape == out["completion_ids"].shape

    expected = naive_token_advantages(tokenizer, out, trainer.num_generations, 0.5, "group_centred")
    torch.testing.assert_close(advantages.double() * mask, expected, atol=1e-4, rtol=1e-4)
    assert (advantages * mask).std(dim=1).max() > 0.1  # the token component really varies along sequences

    # the loss GSPOTrainer computes on this rollout equals the objective called directly with these (B, T) advantages
    trainer.current_gradient_accumulation_steps = 1
    out["old_per_token_logps"] = trainer._pi_old_pass(out)  # what _prepare_inputs gives each micro-batch
    loss = trainer._compute_loss(trainer.model, out)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
            torch.cat([out["prompt_mask"], out["completion_mask"]], 1),
            out["completion_ids"].size(1),
        )
    direct = compute_policy_objective(
        "sequence_token", logps, logps, advantages, mask, trainer.epsilon_low, trainer.epsilon_high
    ).loss
    sequence_only = compute_policy_objective(
        "sequence_token", logps, logps, advantages[:, 0], mask, trainer.epsilon_low, trainer.epsilon_high
    ).loss
    torch.testing.assert_close(loss.detach(), direct, atol=1e-6, rtol=1e-6)
    assert abs(loss.item() - sequence_only.item()) > 1e-3  # (B,) advantages would have given another loss

    # diagnostics and the token component were logged for this rollout
    metrics = trainer._metrics["train"]
    for name in ("diversity/distinct_fraction", "length/group_mean", "signal/zero_variance_groups"):
        assert len(metrics[name]) == 1
    assert metrics["token_rewards/component_abs_mean"][0] > 0


@pytest.mark.parametrize("formulation", ["scaled", "marked_only", "position_baseline", "return_to_go"])
def test_token_advantage_component_override_reaches_the_advantages(make_model, tokenizer, tmp_path, formulation):
    """A subclass's token_advantage_component (the comparison's formulations) forms the advantages."""
    from gspo_examples.token_advantages import token_advantage_trainer

    trainer = token_advantage_trainer(formulation)(
        model=make_model("qwen2"),
        reward_funcs=[completion_length_reward, first_char_span],
        args=small_config(tmp_path, importance_sampling_level="sequence_token", token_advantage_weight=0.5),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rollout_rows(trainer))
    expected = naive_token_advantages(tokenizer, out, trainer.num_generations, 0.5, formulation)
    torch.testing.assert_close(out["advantages"].double() * out["completion_mask"], expected, atol=1e-4, rtol=1e-4)


def test_training_with_mixed_rewards_runs_and_changes_the_model(make_model, tokenizer, tmp_path):
    # per-token lists and spans from two functions next to a plain reward; 2 optimizer steps per rollout, so the
    # (B, T) advantages travel through TRL's shuffle and split
    @token_level_reward
    def per_token(completion_ids, **kwargs):
        return [[0.1 * (t % 3) for t in range(len(ids))] for ids in completion_ids]

    trainer = make_trainer(
        make_model,
        tokenizer,
        tmp_path,
        [completion_length_reward, first_char_span, per_token],
        steps_per_generation=2,
        max_steps=2,
    )
    before = parameters(trainer.model)
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    logged = trainer.state.log_history[0]
    assert "rewards/per_token/mean" in logged and "diversity/distinct_2" in logged


def test_token_reward_under_sequence_level_is_refused(make_model, tokenizer, tmp_path):
    with pytest.raises(TokenRewardError, match=r"'per_token_marked'.*importance_sampling_level='sequence_token'"):

        @token_level_reward
        def per_token_marked(completion_ids, **kwargs):
            return [[0.0] * len(ids) for ids in completion_ids]

        make_trainer(make_model, tokenizer, tmp_path, [per_token_marked], importance_sampling_level="sequence")

    # an unmarked function is caught at its first output, before any parameter changes
    trainer = make_trainer(
        make_model,
        tokenizer,
        tmp_path,
        [completion_length_reward, first_char_span],
        importance_sampling_level="sequence",
    )
    before = parameters(trainer.model)
    with pytest.raises(TokenRewardError, match=r"'first_char_span'.*not 'sequence'.*completion \d"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_nan_and_inf_rewards_warn_once(make_model, tokenizer, tmp_path):
    def half_nan(completions, **kwargs):
        return [float("nan") if i % 2 else 1.0 for i in range(len(completions))]

    def one_inf(completions, **kwargs):
        return [float("inf")] + [float(i % 3) for i in range(1, len(completions))]

    trainer = make_trainer(make_model, tokenizer, tmp_path, [half_nan, one_inf], max_steps=2)
    with mock.patch.object(token_rewards_module.logger, "warning") as warning:
        trainer.train()
    messages = [call.args[0] for call in warning.call_args_list if "returned NaN" in call.args[0]]
    assert len(messages) == 2  # once per function, although both misbehave at every rollout
    assert any("'half_nan' returned NaN for 50.0% and +-inf for 0.0%" in m for m in messages)
    # one inf among the 32 completions of a rollout (8 per step x 4 steps per rollout)
    assert any("'one_inf' returned NaN for 0.0% and +-inf for 3.1% of the 32" in m for m in messages)
    assert all(math.isfinite(v) for e in trainer.state.log_history for k, v in e.items() if k == "loss")
    # rollouts without any finite reward, and the limit on them: tests/trainer/test_rewards.py


def test_unscorable_completions_get_no_token_component(make_model, tokenizer, tmp_path):
    """A completion every reward function declined (None) keeps advantage 0 on every token and is left out of its
    group's token statistics; float64 reference. The logged component mean covers all processes' rows."""

    def per_token_or_none(completion_ids, **kwargs):
        return [
            None if i % 4 == 1 else [0.1 * ((t + i) % 3) for t in range(len(ids))]
            for i, ids in enumerate(completion_ids)
        ]

    trainer = make_trainer(make_model, tokenizer, tmp_path, [per_token_or_none])
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rollout_rows(trainer))
    advantages, mask = out["advantages"].double(), out["completion_mask"].double()
    G, B = trainer.num_generations, advantages.size(0)
    token_rewards = [
        None if i % 4 == 1 else [0.1 * ((t + i) % 3) for t in range(int(mask[i].sum()))] for i in range(B)
    ]
    expected = torch.zeros_like(advantages)
    abs_sum = count = 0.0
    for g in range(0, B, G):
        scored = [i for i in range(g, g + G) if token_rewards[i] is not None]
        sums = {i: sum(token_rewards[i]) for i in scored}
        mean = sum(sums.values()) / len(scored)
        std = math.sqrt(sum((r - mean) ** 2 for r in sums.values()) / (len(scored) - 1))
        tokens = [v for i in scored for v in token_rewards[i]]
        t_mean = sum(tokens) / len(tokens)
        t_std = math.sqrt(sum((v - t_mean) ** 2 for v in tokens) / (len(tokens) - 1))
        for i in scored:
            for t, v in enumerate(token_rewards[i]):
                expected[i, t] = (sums[i] - mean) / (std + 1e-4) + (v - t_mean) / (t_std + 1e-4)
                abs_sum, count = abs_sum + abs(v - t_mean) / (t_std + 1e-4), count + 1
    assert mask[1::G].sum() > 0  # the unscorable completions have loss tokens
    torch.testing.assert_close(advantages * mask, expected, atol=1e-4, rtol=1e-4)
    assert trainer._metrics["train"]["token_rewards/component_abs_mean"] == [pytest.approx(abs_sum / count, rel=1e-4)]


def test_component_abs_mean_is_over_all_processes(make_model, tokenizer, tmp_path, monkeypatch):
    """Process 1 of 2 (the gather doubles the batch): the metric is the mean over both processes' rows."""
    trainer = make_trainer(make_model, tokenizer, tmp_path, [completion_length_reward, first_char_span])
    trainer.model.train()
    calls = []
    advantages = trainer.rewards.advantages

    def keeping(output, *args):
        calls.append((dict(output), args))
        return advantages(output, *args)

    monkeypatch.setattr(trainer.rewards, "advantages", keeping)
    torch.manual_seed(0)
    trainer._generate_and_score_completions(rollout_rows(trainer))
    own = trainer._metrics["train"]["token_rewards/component_abs_mean"][0]
    assert own > 0
    # the same rollout seen from process 1, with process 0's rows carrying no token rewards (component 0)
    ((output, (collector, rewards_per_func, *rest)),) = calls

    def gather(local):  # (B, 2, T): token rewards and mask
        return torch.cat([torch.stack([torch.zeros_like(local[:, 0]), local[:, 1]], dim=1), local])

    monkeypatch.setattr(trainer.accelerator, "gather", gather)
    monkeypatch.setattr(type(trainer.accelerator), "process_index", property(lambda self: 1))
    advantages(output, collector, rewards_per_func.repeat(2, 1), *rest)
    assert trainer._metrics["train"]["token_rewards/component_abs_mean"][1] == pytest.approx(own / 2, rel=1e-5)


def test_diagnostics_count_truncated_completions_under_mask_truncated_completions(make_model, tokenizer, tmp_path):
    """Masked truncated completions still have their sampled length and tokens in the diagnostics."""
    trainer = make_trainer(
        make_model,
        tokenizer,
        tmp_path,
        [completion_length_reward],
        importance_sampling_level="sequence",
        mask_truncated_completions=True,
    )
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rollout_rows(trainer))
    ids = out["completion_ids"].tolist()
    eos = tokenizer.eos_token_id
    lengths = [row.index(eos) + 1 if eos in row else len(row) for row in ids]
    truncated = [eos not in row for row in ids]
    assert any(truncated) and out["completion_mask"][torch.tensor(truncated)].sum() == 0
    G = trainer.num_generations
    group_means = [sum(lengths[g : g + G]) / G for g in range(0, len(ids), G)]
    metrics = trainer._metrics["train"]
    assert metrics["length/group_mean"] == [pytest.approx(sum(group_means) / len(group_means))]
