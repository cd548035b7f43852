"""use_rollout_logprobs: rollout log-probs as pi_old, no pi_old forward, the mismatch check, and the refusals."""

import math

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from transformers import LogitsProcessorList

from trl_gspo import GSPOTrainer
from trl_gspo.rollout_logprobs import SampledTokenLogProbs, mismatch_log_ratios, pad_rollout_logprobs, rollout_mismatch


def test_recorded_logprobs_equal_a_float64_recomputation(make_model, tokenizer):
    """Sampling at temperature 0.7: the recorded log-probs are log softmax(logits / 0.7) of the sampled tokens."""
    model = make_model("qwen3").eval()
    prompt = torch.randint(3, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(0))
    recorder = SampledTokenLogProbs(temperature=0.7)
    torch.manual_seed(0)
    with torch.no_grad():
        sequences = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            temperature=0.7,
            top_k=5,  # truncation runs after the record: the record is of the untruncated distribution
            max_new_tokens=12,
            logits_processor=LogitsProcessorList([recorder]),
        )
        completions = sequences[:, prompt.size(1) :].tolist()
        recorded = recorder.per_sequence(completions)
        logits = model(sequences).logits.double()
    reference = torch.log_softmax(logits / 0.7, -1)[:, prompt.size(1) - 1 : -1].gather(
        -1, sequences[:, prompt.size(1) :, None]
    )[..., 0]
    assert [len(r) for r in recorded] == [12, 12, 12]
    torch.testing.assert_close(torch.tensor(recorded, dtype=torch.float64), reference, atol=1e-5, rtol=0)


def test_a_removed_token_is_refused_at_the_step():
    recorder = SampledTokenLogProbs(temperature=1.0)
    scores = torch.zeros(2, 5)
    scores[1, 3] = -math.inf
    with pytest.raises(RuntimeError, match="removed tokens"):
        recorder(torch.zeros(2, 1, dtype=torch.long), scores)


def test_mismatch_against_a_direct_loop():
    generator = torch.Generator().manual_seed(0)
    recomputed = torch.randn(4, 6, generator=generator)
    rollout = recomputed + 1e-3 * torch.randn(4, 6, generator=generator)
    mask = torch.ones(4, 6)
    mask[1, 3:] = 0
    mask[2] = 0  # empty: left out
    per_sequence = mismatch_log_ratios(rollout, recomputed, mask)
    assert math.isnan(per_sequence[2])
    stats = rollout_mismatch(per_sequence, 3e-4, 4e-4)
    ratios = [
        sum((rollout[i, t] - recomputed[i, t]).item() for t in range(6) if mask[i, t]) / mask[i].sum().item()
        for i in (0, 1, 3)
    ]
    assert stats["seq_abs_log_ratio_mean"] == pytest.approx(sum(abs(r) for r in ratios) / 3, rel=1e-5)
    assert stats["seq_abs_log_ratio_max"] == pytest.approx(max(abs(r) for r in ratios), rel=1e-5)
    outside = [r < math.log(1 - 3e-4) or r > math.log(1 + 4e-4) for r in ratios]
    assert stats["outside_clip_band"] == pytest.approx(sum(outside) / 3)


def test_padding_of_rollout_logprobs():
    table = pad_rollout_logprobs([[-1.0, -2.0], [], [-0.5, None, -3.0]], 4, "cpu")
    assert table[0].tolist() == [-1.0, -2.0, 0.0, 0.0] and table[1].tolist() == [0.0] * 4
    assert math.isnan(table[2, 1]) and table[2, 2] == -3.0


def train(make_model, tokenizer, tmp_path, **overrides):
    """A 5-step off-policy run (two rollouts); counts the log-prob forwards run without gradient (pi_old here).

    Generation calls the model too, but never with TRL's fused LM head: those calls are not counted.
    """
    trainer = GSPOTrainer(
        model=make_model("qwen3"),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, max_steps=5, temperature=0.8, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    forwards = []

    def count(module, args, kwargs):
        if kwargs.get("fused_lm_head") and not torch.is_grad_enabled():
            forwards.append(1)

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    return trainer, forwards


@pytest.mark.parametrize("padding_free", [False, True])
def test_no_pi_old_forward_runs(make_model, tokenizer, tmp_path, padding_free):
    trainer, forwards = train(
        make_model,
        tokenizer,
        tmp_path,
        use_rollout_logprobs=True,
        rollout_logprobs_check_interval=0,
        padding_free=padding_free,
    )
    assert not forwards  # pi_old came from the rollouts: no forward without gradient ran
    batch = trainer._buffered_inputs[0]
    assert torch.equal(batch["old_per_token_logps"], batch["sampling_per_token_logps"])
    mask = batch["completion_mask"].bool()
    assert torch.all(batch["old_per_token_logps"][mask] < 0)
    assert not any(key.startswith("gspo/rollout_logprobs/") for h in trainer.state.log_history for key in h)


def test_reference_run_computes_pi_old(make_model, tokenizer, tmp_path):
    """The baseline of the test above: without the option, each rollout runs its pi_old forward (4 chunks of 8)."""
    trainer, forwards = train(make_model, tokenizer, tmp_path)
    assert len(forwards) == 2 * 4 and "sampling_per_token_logps" not in trainer._buffered_inputs[0]


def test_mismatch_check_runs_the_forward_and_is_small_in_float32(make_model, tokenizer, tmp_path):
    trainer, forwards = train(
        make_model, tokenizer, tmp_path, use_rollout_logprobs=True, rollout_logprobs_check_interval=1
    )
    assert len(forwards) == 2 * 4  # every rollout checked: its pi_old forward runs for the comparison
    logged = [h for h in trainer.state.log_history if "gspo/rollout_logprobs/seq_abs_log_ratio_max" in h]
    assert len(logged) == 2
    for entry in logged:
        # float32 generation (KV cache) and the training forward agree far inside the clip band
        assert 0 <= entry["gspo/rollout_logprobs/seq_abs_log_ratio_max"] < 1e-5
        assert entry["gspo/rollout_logprobs/outside_clip_band"] == 0
        assert entry["gspo/rollout_logprobs/clip_band_log_high"] == pytest.approx(math.log(1 + 4e-4))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(steps_per_generation=1), "on-policy"),
        (dict(repetition_penalty=1.1), "repetition_penalty=1.1"),
        (dict(generation_kwargs={"suppress_tokens": [1]}), "suppress_tokens"),
        (dict(use_transformers_continuous_batching=True), "continuous_batching"),
        (dict(rollout_logprobs_check_interval=-1), "rollout_logprobs_check_interval=-1"),
    ],
)
def test_refused_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, use_rollout_logprobs=True, **overrides)


def test_vllm_refusals(tmp_path):
    from trl_gspo import GSPOConfig

    common = dict(output_dir=str(tmp_path), use_cpu=True, use_vllm=True, use_rollout_logprobs=True)
    with pytest.raises(ValueError, match="vllm_importance_sampling_correction=True"):
        GSPOConfig(**common)
    with pytest.raises(ValueError, match=r"top_p=0.9"):
        GSPOConfig(**common, vllm_importance_sampling_correction=False, top_p=0.9)


@pytest.mark.parametrize("sampling", [{"min_tokens": 8}, {"presence_penalty": 0.5}, {"logit_bias": {3: 1.0}}])
def test_vllm_sampling_params_that_change_the_distribution_are_refused(tmp_path, sampling):
    """vLLM's SamplingParams reach the engine through generation_kwargs; min_tokens masks eos out of the processed
    log-probs, so they describe another distribution than the trainer's."""
    from trl_gspo import GSPOConfig

    common = dict(output_dir=str(tmp_path), use_cpu=True, use_vllm=True, use_rollout_logprobs=True)
    with pytest.raises(ValueError, match=rf"{next(iter(sampling))}.*change the sampling distribution"):
        GSPOConfig(**common, vllm_importance_sampling_correction=False, generation_kwargs=sampling)


def rollout_trainer(make_model, tokenizer, tmp_path, rollout_func):
    return GSPOTrainer(
        model=make_model("qwen3", max_position_embeddings=1024),
        reward_funcs=completion_length_reward,
        args=small_config(
            tmp_path,
            max_steps=1,
            max_completion_length=32,
            use_rollout_logprobs=True,
            rollout_logprobs_check_interval=0,
            padding_free=True,
        ),
        train_dataset=prompt_dataset("standard"),
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )


def test_a_rollout_funcs_logprobs_are_pi_old(make_model, tokenizer, tmp_path):
    from gspo_benchmarks.ragged import SYNTHETIC_LOGPROB, ragged_rollout_func

    trainer = rollout_trainer(make_model, tokenizer, tmp_path, ragged_rollout_func(tokenizer, 160))
    trainer.train()
    batch = trainer._buffered_inputs[0]
    mask = batch["completion_mask"].bool()
    assert mask.sum(1).min() < mask.sum(1).max()  # ragged
    assert torch.all(batch["old_per_token_logps"][mask] == SYNTHETIC_LOGPROB)


def test_missing_rollout_logprobs_raise(make_model, tokenizer, tmp_path):
    def no_logprobs(prompts, trainer):
        return {"prompt_ids": [[5, 6]] * len(prompts), "completion_ids": [[7, 1]] * len(prompts), "logprobs": None}

    trainer = rollout_trainer(make_model, tokenizer, tmp_path, no_logprobs)
    with pytest.raises(RuntimeError, match="returned no log-probs"):
        trainer.train()


def pi_old_trainer(make_model, tokenizer, tmp_path, **overrides):
    overrides.setdefault("rollout_logprobs_check_interval", 0)
    trainer = GSPOTrainer(
        model=make_model("qwen3"),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, use_rollout_logprobs=True, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


def pi_old_pass(trainer, rollout_logprobs, completion_mask, **model_inputs):
    """A rollout of one micro-batch (3 prompt tokens and the completion) with these rollout log-probs, laid out as
    TRL lays them out (None as NaN, right-padded with 0): the pi_old the trainer's source gives it."""
    rows, width = completion_mask.shape
    generator = torch.Generator().manual_seed(1)
    vocab = trainer.model.config.vocab_size
    batch = {
        "prompt_ids": torch.randint(3, vocab, (rows, 3), generator=generator),
        "prompt_mask": torch.ones(rows, 3, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (rows, width), generator=generator),
        "completion_mask": completion_mask,
        "sampling_per_token_logps": pad_rollout_logprobs(rollout_logprobs, width, "cpu"),
        **model_inputs,
    }
    training = trainer.model.training
    metrics = trainer._metrics["train" if training else "eval"]
    trainer.pi_old.fill(
        [batch],
        trainer._pi_old_pass,
        trainer.accelerator,
        metrics,
        training,
        trainer.epsilon_low,
        trainer.epsilon_high,
    )
    return batch["old_per_token_logps"]


def test_a_missing_value_on_another_process_falls_back_everywhere(make_model, tokenizer, tmp_path, monkeypatch):
    """The flag is reduced (max) over processes before branching: no process skips a collective forward."""
    trainer = pi_old_trainer(make_model, tokenizer, tmp_path)
    reductions = []

    def other_process_has_a_none(tensor, reduction="mean"):
        reductions.append(reduction)
        return torch.ones_like(tensor)

    monkeypatch.setattr(trainer.accelerator, "reduce", other_process_has_a_none)
    logps = pi_old_pass(trainer, [[-1.0, -2.0], [-3.0, -4.0]], torch.ones(2, 2, dtype=torch.long))
    assert reductions == ["max"]
    assert trainer._metrics["train"]["gspo/rollout_logprobs/fallback"] == [1.0]
    assert not torch.any(logps == torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))  # the recomputed pi_old


def test_model_inputs_reach_the_check_forward(make_model, tokenizer, tmp_path, monkeypatch):
    """pixel_values and the like are passed to the forward that checks (or replaces) the rollout log-probs."""
    from trl import GRPOTrainer

    trainer = pi_old_trainer(make_model, tokenizer, tmp_path, rollout_logprobs_check_interval=1)
    seen = []

    def forward(self, model, input_ids, attention_mask, logits_to_keep, *args, **model_inputs):
        seen.append(model_inputs)
        return torch.full((input_ids.size(0), logits_to_keep), -1.0), None, None

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", forward)
    pixel_values = torch.ones(2, 3)
    pi_old_pass(trainer, [[-1.0, -2.0], [-3.0, None]], torch.ones(2, 2, dtype=torch.long), pixel_values=pixel_values)
    assert len(seen) == 1 and seen[0]["pixel_values"] is pixel_values


def test_a_none_off_the_mask_does_not_reach_the_objective(make_model, tokenizer, tmp_path):
    """mask_truncated_completions zeroes a truncated completion's mask; its None must not become pi_old NaN."""
    trainer = pi_old_trainer(make_model, tokenizer, tmp_path)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    logps = pi_old_pass(trainer, [[-1.0, -2.0], [-3.0, None, -0.5]], mask)
    assert logps.tolist() == [[-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]
    assert "gspo/rollout_logprobs/fallback" not in trainer._metrics["train"]


def test_truncated_completion_with_a_none_trains_with_finite_gradients(make_model, tokenizer, tmp_path):
    """End to end under GSPO-token: a rollout_func marks a token of a truncated completion None; pi_old stays finite."""
    eos = tokenizer.eos_token_id

    def rollout_func(prompts, trainer):
        completions = [[7, 8, eos] if i % 2 else [7, 8, 9, 10] for i in range(len(prompts))]
        logprobs = [[-1.0] * 3 if i % 2 else [-1.0, None, -1.0, -1.0] for i in range(len(prompts))]
        return {"prompt_ids": [[5, 6]] * len(prompts), "completion_ids": completions, "logprobs": logprobs}

    trainer = GSPOTrainer(
        model=make_model("qwen3"),
        reward_funcs=completion_length_reward,
        args=small_config(
            tmp_path,
            max_steps=1,
            max_completion_length=4,
            use_rollout_logprobs=True,
            rollout_logprobs_check_interval=0,
            mask_truncated_completions=True,
            importance_sampling_level="sequence_token",
        ),
        train_dataset=prompt_dataset("standard"),
        processing_class=tokenizer,
        rollout_func=rollout_func,
    )
    trainer.train()
    batch = trainer._buffered_inputs[0]
    assert not batch["completion_mask"].all()  # the truncated completions are masked
    assert torch.isfinite(batch["old_per_token_logps"]).all()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_eval_rollouts_do_not_advance_the_check_schedule(make_model, tokenizer, tmp_path):
    """Interval 2: train rollout 1 is checked, an eval rollout comes between, train rollout 2 is not checked."""
    trainer = pi_old_trainer(make_model, tokenizer, tmp_path, rollout_logprobs_check_interval=2)
    mask = torch.ones(2, 2, dtype=torch.long)
    for training in (True, False, True):
        trainer.model.train(training)
        pi_old_pass(trainer, [[-1.0, -2.0], [-3.0, -4.0]], mask)
    assert trainer.pi_old.train_rollouts == 2
    assert len(trainer._metrics["train"]["gspo/rollout_logprobs/seq_abs_log_ratio_mean"]) == 1


def test_mismatch_has_the_sign_of_the_objectives_ratio(make_model, tokenizer, tmp_path, monkeypatch):
    """Rollout log-probs 3.5e-4 above the recomputed ones: the first step's log s_i is -3.5e-4, below
    log(1 - 3e-4) (outside the band), although +3.5e-4 would lie inside log(1 + 4e-4)."""
    from trl import GRPOTrainer

    trainer = pi_old_trainer(make_model, tokenizer, tmp_path, rollout_logprobs_check_interval=1)

    def recomputed_pi_old(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        return torch.full((input_ids.size(0), logits_to_keep), -2.0), None, None

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", recomputed_pi_old)
    pi_old_pass(trainer, [[-2.0 + 3.5e-4] * 3] * 2, torch.ones(2, 3, dtype=torch.long))
    metrics = trainer._metrics["train"]
    assert metrics["gspo/rollout_logprobs/seq_abs_log_ratio_max"] == [pytest.approx(3.5e-4, rel=1e-3)]
    assert metrics["gspo/rollout_logprobs/outside_clip_band"] == [1.0]


@pytest.mark.parametrize(
    "sampling, refused",
    [
        (dict(top_k=1), "top_k=1"),
        (dict(generation_kwargs={"top_k": 1}), "top_k"),
        (dict(top_k=-1), None),
        (dict(generation_kwargs={"top_k": -1}), None),
        (dict(min_p=0.0), None),
        (dict(top_p=1.0), None),
    ],
)
def test_vllm_top_k_of_one_truncates(tmp_path, sampling, refused):
    """top_k is an int, off at 0 and -1: top_k=1 (== 1.0 in Python) keeps one token and is refused with vLLM."""
    from trl_gspo import GSPOConfig

    common = dict(output_dir=str(tmp_path), use_cpu=True, use_vllm=True, use_rollout_logprobs=True)
    if refused is None:
        GSPOConfig(**common, vllm_importance_sampling_correction=False, **sampling)
        return
    with pytest.raises(ValueError, match=rf"vLLM and .*{refused}"):
        GSPOConfig(**common, vllm_importance_sampling_correction=False, **sampling)
