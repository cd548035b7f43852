"""pi_old on the policy pass's own micro-batches (trl_gspo/pi_old.py): s_i is exactly 1 before any update.

With learning rate 0 the policy never changes, so every sequence ratio of every step must be exactly 1 (not close
to it): any difference is the pi_old pass computing the same rows in another layout. Packed bf16 rows with a row
budget that puts several sequences in a row made |s_i - 1| reach 6e-5 with TRL's pi_old pass, before the shuffle.
"""

import math

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from trl import GRPOTrainer

from trl_gspo import GSPOTrainer
from trl_gspo.moe import ROUTING_KEY

# 4 micro-batches per rollout, 2 per optimizer step: two optimizer steps on each rollout, pi_old from a forward
SCHEDULE = dict(steps_per_generation=4, gradient_accumulation_steps=2, learning_rate=0.0, max_completion_length=16)
FIRST_STEP = "gspo/first_step_outside_clip_band"


def build(make_model, tokenizer, tmp_path, model_type="qwen2", **overrides):
    return GSPOTrainer(
        model=make_model(model_type),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, **{**SCHEDULE, **overrides}),
        train_dataset=prompt_dataset(n=64),
        processing_class=tokenizer,
    )


# fp16 is not among them: fp16=True on a CPU computes in float32 (accelerate has no CPU fp16 autocast,
# tests/trainer/test_mixed_precision.py), so here it would repeat the fp32 case under another name
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_every_ratio_is_exactly_one_at_learning_rate_zero(make_model, tokenizer, tmp_path, precision, padding_free):
    packing = {"padding_free_row_tokens": 200} if padding_free else {}  # several sequences share a row
    trainer = build(
        make_model,
        tokenizer,
        tmp_path,
        max_steps=4,
        padding_free=padding_free,
        bf16=precision == "bf16",
        **packing,
    )
    trainer.train()
    assert trainer.accelerator.mixed_precision == {"fp32": "no"}.get(precision, precision)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["gspo/seq_ratio/min"] == entry["gspo/seq_ratio/max"] == 1.0, entry
    # optimizer steps 1 and 3 are the first of their rollouts; the metric is logged there only
    assert [entry.get(FIRST_STEP) for entry in logs] == [0.0, None, 0.0, None]
    # the ratio was computed against a real pi_old (not the on-policy shortcut), of every micro-batch
    for batch in trainer._buffered_inputs:
        assert torch.isfinite(batch["old_per_token_logps"]).all()


def optimizer_steps_with_a_first_step(accumulation, steps_per_generation, num_iterations, optimizer_steps):
    """Independent reference, a plain simulation of the schedule: the optimizer steps (1-based) holding at least one
    micro-step that runs before any update since its rollout was generated (TRL regenerates every
    steps_per_generation * num_iterations micro-steps and updates after every `accumulation` of them)."""
    updates, updates_at_generation, steps = 0, None, set()
    for micro_step in range(optimizer_steps * accumulation):
        if micro_step % (steps_per_generation * num_iterations) == 0:
            updates_at_generation = updates
        if updates == updates_at_generation:
            steps.add(micro_step // accumulation + 1)
        if (micro_step + 1) % accumulation == 0:
            updates += 1
    return steps


# (gradient_accumulation_steps, steps_per_generation, num_iterations): rollouts that hold a whole number of
# optimizer steps, and rollouts that start or end inside an optimizer step
@pytest.mark.parametrize(
    "schedule", [(2, 4, 1), (2, 3, 1), (3, 2, 1), (2, 3, 2)], ids=lambda s: "ga{}-spg{}-it{}".format(*s)
)
def test_first_step_metric_counts_only_micro_steps_before_an_update(make_model, tokenizer, tmp_path, schedule):
    """`gspo/first_step_outside_clip_band` is logged exactly at the optimizer steps the simulation names, and reads
    exactly 0 there although the learning rate moves every later ratio."""
    accumulation, steps_per_generation, num_iterations = schedule
    optimizer_steps = 6
    trainer = build(
        make_model,
        tokenizer,
        tmp_path,
        max_steps=optimizer_steps,
        learning_rate=5e-3,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == optimizer_steps
    expected = optimizer_steps_with_a_first_step(*schedule, optimizer_steps)
    assert {entry["step"] for entry in logs if FIRST_STEP in entry} == expected
    assert all(entry[FIRST_STEP] == 0.0 for entry in logs if FIRST_STEP in entry)
    # the metric would notice a micro-step after an update: there, ratios leave the band
    assert any(entry["gspo/seq_ratio/max"] - entry["gspo/seq_ratio/min"] > 1e-3 for entry in logs)


def test_pi_old_is_the_log_prob_of_each_sequence_run_alone(make_model, tokenizer, tmp_path):
    """Independent reference: every buffered micro-batch's pi_old equals a float32 forward of each of its sequences
    alone, without padding (so the alignment moved the right rows, not only the same rows on both sides)."""
    trainer = build(make_model, tokenizer, tmp_path, max_steps=1, padding_free=True, padding_free_row_tokens=200)
    trainer.train()  # learning rate 0: the model is still the rollout's policy
    model = trainer.model
    for batch in trainer._buffered_inputs:
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool()
        width = batch["completion_ids"].size(1)
        for row in range(ids.size(0)):
            tokens = ids[row][mask[row]]
            completion = int(batch["completion_mask"][row].sum())
            with torch.no_grad():
                logits = model(input_ids=tokens[None], use_cache=False).logits[0].float() / trainer.temperature
            expected = torch.log_softmax(logits[:-1], -1).gather(1, tokens[1:, None]).squeeze(1)[-completion:]
            got = batch["old_per_token_logps"][row, :completion]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert (batch["old_per_token_logps"][row, completion:width] == 0).all()


def count_forwards(trainer):
    calls = []
    handle = trainer.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_a_rollout_runs_as_many_forwards_as_trls(make_model, tokenizer, tmp_path):
    """A rollout runs as many model forwards as GRPOTrainer's on the same config (generation, then one pi_old forward
    per micro-batch in place of TRL's one per chunk), and the buffered pi_old is finite, never a placeholder."""
    counts = {}
    for trainer_class in (GSPOTrainer, GRPOTrainer):
        trainer = trainer_class(
            model=make_model("qwen2"),
            reward_funcs=completion_length_reward,
            args=small_config(tmp_path / trainer_class.__name__, max_steps=1, **SCHEDULE),
            train_dataset=prompt_dataset(n=64),
            processing_class=tokenizer,
        )
        trainer.model.train()
        torch.manual_seed(0)
        batch = [dict(row) for row in prompt_dataset(n=64).select(range(32))]
        calls, handle = count_forwards(trainer)
        trainer._prepare_inputs(batch)
        handle.remove()
        counts[trainer_class] = len(calls)
        assert all(torch.isfinite(b["old_per_token_logps"]).all() for b in trainer._buffered_inputs)
    assert counts[GSPOTrainer] == counts[GRPOTrainer]


def test_rollout_logprobs_are_not_recomputed(make_model, tokenizer, tmp_path):
    """With use_rollout_logprobs the sampling log-probs are pi_old: no pi_old forward."""
    trainer = build(
        make_model, tokenizer, tmp_path, max_steps=1, use_rollout_logprobs=True, rollout_logprobs_check_interval=0
    )
    trainer.model.train()
    passes = []
    original = trainer._pi_old_pass
    trainer._pi_old_pass = lambda batch: passes.append(1) or original(batch)
    trainer._prepare_inputs([dict(row) for row in prompt_dataset(n=64).select(range(32))])
    assert passes == []
    assert all(torch.equal(b["old_per_token_logps"], b["sampling_per_token_logps"]) for b in trainer._buffered_inputs)


def test_moe_routing_is_recorded_per_micro_batch_and_replayed(make_model, tokenizer, tmp_path):
    """Routing replay in bf16 at learning rate 0: each micro-batch carries the routing of its own pi_old pass, the
    replay matches it exactly (it raises otherwise), and every ratio is exactly 1."""
    trainer = build(
        make_model, tokenizer, tmp_path, model_type="qwen3_moe", max_steps=2, bf16=True, routing_replay=True
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        assert entry["gspo/seq_ratio/min"] == entry["gspo/seq_ratio/max"] == 1.0
        assert entry["moe/routing_drift/token_layer"] == 0.0
    layers = trainer.model.config.num_hidden_layers
    for batch in trainer._buffered_inputs:
        rows, length = batch["prompt_ids"].size(0), batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)
        assert batch[ROUTING_KEY].shape == (rows, length, layers, trainer.model.config.num_experts_per_tok)
    assert not math.isnan(logs[0][FIRST_STEP]) and logs[0][FIRST_STEP] == 0.0
