"""vLLM's importance correction on a real colocated engine in bfloat16, trained in float32 (`make test-vllm`).

Every mode (TRL's token_truncate, token_mask, sequence_truncate, sequence_mask, and GSPO's length-normalised
sequence modes) against an independent computation: per completion, the trainer's float32 log-probs from a plain
forward of the unpadded sequence and the engine's log-probs as vLLM returned them, weights computed in float64. It
checks the rollout's logged `sampling/importance_sampling_ratio/*` and the loss of the rollout's first optimizer
step, where s_i = 1 and the GSPO-token loss is -(1/B) sum_i w_i mean_t (A_it w_it). GSPO-token is the level that
allows every mode (plain GSPO refuses the token ones); the sequence weights reach plain GSPO's loss the same way
(tests/trainer/test_trainer.py::test_vllm_importance_correction).
"""

import math

import pytest

pytest.importorskip("vllm", reason="vLLM tests run in .venv-vllm: make test-vllm")

import torch  # noqa: E402
from test_vllm_colocate import colocated_trainer, logged  # noqa: E402
from vllm_sync import trainer_logprobs  # noqa: E402

# (mode, length-normalised, clip_min, clip_max): one rollout each, in this order, on one engine. The bounds sit
# inside the spread of each kind of weight with a bfloat16 engine, so that the mask or the clamp acts on some weights
# and leaves others.
SCHEDULE = (
    ("sequence_mask", True, 0.9997, 1.0003),
    ("sequence_truncate", True, 0.9997, 1.0003),
    ("sequence_mask", False, 0.995, 1.005),
    ("sequence_truncate", False, 0.995, 1.005),
    ("token_mask", False, 0.999, 1.001),
    ("token_truncate", False, 0.999, 1.001),
)
STEPS_PER_ROLLOUT = 2
LOSS_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-5


def independent_weights(trainer, batch, mode, normalized, clip_min, clip_max):
    """Per row of `batch`: (sequence weight, per-token weights), from the trainer's log-probs of the unpadded sequence
    (one plain forward) and the engine's, in float64. The weight that does not apply is 1."""
    rows = []
    for row in range(batch["completion_ids"].size(0)):
        prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
        keep = batch["completion_mask"][row].bool()
        completion = batch["completion_ids"][row][keep].tolist()
        diff = trainer_logprobs(trainer, prompt, completion).double() - batch["sampling_per_token_logps"][row][keep]
        if mode.startswith("token"):
            weights = diff.exp()
        else:
            weights = (diff.mean() if normalized else diff.sum()).exp().reshape(1)
        outside = (weights < clip_min) | (weights > clip_max)
        weights = weights.masked_fill(outside, 0.0) if mode.endswith("mask") else weights.clamp(clip_min, clip_max)
        rows.append((1.0, weights) if mode.startswith("token") else (weights.item(), torch.ones(1)))
    return rows


def test_every_importance_mode_logs_and_applies_the_weights_of_an_independent_computation(vllm_model_dir, tmp_path):
    overrides = dict(
        vllm_dtype="bfloat16",  # the weights then differ from 1
        vllm_importance_sampling_correction=True,
        importance_sampling_level="sequence_token",  # allows every mode
        vllm_importance_sampling_mode="token_truncate",
        steps_per_generation=STEPS_PER_ROLLOUT,
        max_steps=STEPS_PER_ROLLOUT * len(SCHEDULE),
        max_completion_length=32,
    )
    with colocated_trainer(vllm_model_dir, tmp_path, **overrides) as trainer:
        assert trainer.vllm_generation.llm.llm_engine.model_config.dtype == torch.bfloat16
        schedule, expected_logs, first_steps = iter(SCHEDULE), [], []
        generate, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

        def rollout(inputs):
            # one engine start for six configurations: the settings are the trainer attributes TRL and GSPOTrainer
            # read at each rollout and step
            mode, normalized, clip_min, clip_max = setting = next(schedule)
            trainer.vllm_importance_sampling_mode = mode
            trainer.args.vllm_importance_sampling_length_normalized = normalized
            trainer.vllm_importance_sampling_clip_min, trainer.vllm_importance_sampling_clip_max = clip_min, clip_max
            output = generate(inputs)
            rows = independent_weights(trainer, output, *setting)
            weights = torch.cat([tokens for _, tokens in rows]) if mode.startswith("token") else None
            if weights is None:
                weights = torch.tensor([sequence for sequence, _ in rows], dtype=torch.float64)
            expected_logs.append((setting, weights))
            first_steps.append(None)
            return output

        def loss(model, inputs):
            value = compute_loss(model, inputs)
            if first_steps[-1] is None:  # no optimizer step on this rollout yet: the model is the rollout's
                rows = independent_weights(trainer, inputs, *expected_logs[-1][0])
                per_token_advantages = zip(inputs["advantages"].double(), inputs["completion_mask"].bool())
                expected = -sum(
                    w * (advantages[keep] * tokens).mean().item()
                    for (advantages, keep), (w, tokens) in zip(per_token_advantages, rows)
                ) / len(rows)
                first_steps[-1] = (value.item(), expected)
            return value

        trainer._generate_and_score_completions, trainer._compute_loss = rollout, loss
        trainer.train()

    assert len(expected_logs) == len(SCHEDULE)
    logs = {name: logged(trainer, f"sampling/importance_sampling_ratio/{name}") for name in ("min", "mean", "max")}
    for index, ((setting, weights), (loss_value, expected_loss)) in enumerate(zip(expected_logs, first_steps)):
        mode, normalized, clip_min, clip_max = setting
        changed = ((weights == 0) | (weights == clip_min) | (weights == clip_max)).double().mean().item()
        print(f"{setting}: weights {weights.min():.5f}..{weights.max():.5f}, {100 * changed:.0f}% masked or clamped")
        for name, reduce in (("min", torch.min), ("mean", torch.mean), ("max", torch.max)):
            assert math.isclose(logs[name][index], reduce(weights).item(), abs_tol=WEIGHT_TOLERANCE), (setting, name)
        assert math.isclose(loss_value, expected_loss, abs_tol=LOSS_TOLERANCE), setting
        assert (weights != 1).any(), setting  # a bfloat16 engine: the correction has something to correct
        if normalized:  # the bounds act on some of GSPO's weights and leave others
            assert 0 < changed < 1, setting
