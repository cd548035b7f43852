"""No train-mode randomness in the passes that feed GSPO's ratio (trl_gspo/noise.py, GSPOConfig.disable_dropout).

At learning rate 0 the policy never changes, so every sequence ratio s_i must be exactly 1. The pi_old pass and the
policy pass both run in train mode: with any dropout, layer drop or router jitter active they draw different random
numbers and s_i moves (by 1e-3 to 4e-2 on tiny models, docs/NOISE.md), which these tests would see.
"""

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from peft import LoraConfig

from gspo_benchmarks.noise import SOURCES, UNSWITCHABLE_SOURCES, RatioRecordingTrainer, build_model
from trl_gspo import GSPOTrainer
from trl_gspo.config import GSPOOnPolicyWarning
from trl_gspo.noise import find_train_mode_noise

# 4 micro-batches per rollout, 2 per optimizer step: a real pi_old pass; max_steps=1 is the rollout's first step
SCHEDULE = dict(
    steps_per_generation=4, gradient_accumulation_steps=2, learning_rate=0.0, max_completion_length=8, max_steps=1
)
FIRST_STEP = "gspo/first_step_outside_clip_band"
# the sources docs/NOISE.md measures, each switched off by the default disable_dropout=True
SWITCHABLE = [source for source in SOURCES if source not in UNSWITCHABLE_SOURCES]


def build(tokenizer, tmp_path, source, **overrides):
    _, model_type, fields, lora = SOURCES[source]
    model = build_model(tokenizer, model_type, fields)
    trainer = RatioRecordingTrainer(
        model=model,
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, **{**SCHEDULE, **overrides}),
        train_dataset=prompt_dataset(n=64),
        processing_class=tokenizer,
        peft_config=None if lora is None else LoraConfig(**lora),
    )
    trainer.sequence_log_ratios = []
    return trainer


@pytest.mark.parametrize("source", SWITCHABLE)
def test_every_ratio_is_exactly_one_at_learning_rate_zero(tokenizer, tmp_path, source):
    """GSPOConfig's default disable_dropout=True switches every source off: s_i == 1 exactly, nothing outside
    the clip band at the rollout's first step."""
    _, model_type, fields, lora = SOURCES[source]
    model = build_model(tokenizer, model_type, fields)
    assert find_train_mode_noise(model) or lora, "the source is not on: the test would prove nothing"
    trainer = build(tokenizer, tmp_path, source)
    if lora:  # an adapter that has moved: with B = 0 the dropout on A's input changes nothing
        with torch.no_grad():
            for name, parameter in trainer.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.5)
    assert find_train_mode_noise(trainer.model) == []
    trainer.train()
    ratios = torch.cat(trainer.sequence_log_ratios)
    assert ratios.numel() >= 16 and (ratios == 0).all(), ratios.abs().max()
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert entry[FIRST_STEP] == 0.0
    assert entry["gspo/seq_ratio/min"] == entry["gspo/seq_ratio/max"] == 1.0


@pytest.mark.parametrize(
    ("source", "named"),
    [
        ("attention_dropout", "model.layers.*.self_attn.attention_dropout=0.1 (x2)"),
        ("lora_dropout", "model.layers.*.self_attn.v_proj.lora_dropout.default=Dropout(p=0.05) (x2)"),
        ("router_jitter_noise", "model.layers.*.mlp.jitter_noise=0.1 (x2)"),
    ],
)
def test_dropout_left_on_with_a_pi_old_pass_is_refused(tokenizer, tmp_path, source, named):
    with pytest.raises(
        ValueError, match=r"^GSPOConfig\.disable_dropout=False leaves the model's train-mode randomness on: "
    ) as error:
        build(tokenizer, tmp_path, source, disable_dropout=False)
    assert named in str(error.value)


def test_dropout_left_on_is_accepted_where_it_cannot_move_the_ratio(tokenizer, tmp_path):
    """On-policy (the policy pass is its own pi_old), and 'token' (TRL's GRPO, TRL's handling), train as asked."""
    with pytest.warns(GSPOOnPolicyWarning):
        trainer = build(tokenizer, tmp_path, "attention_dropout", disable_dropout=False, steps_per_generation=2)
    assert trainer.model.model.layers[0].self_attn.attention_dropout == 0.1
    grpo = dict(importance_sampling_level="token", epsilon=0.2, epsilon_high=0.2, loss_type="dapo")
    for disable_dropout in (False, True):  # True: TRL zeroes nn.Dropout modules only, the attention float stays
        trainer = build(tokenizer, tmp_path, "attention_dropout", disable_dropout=disable_dropout, **grpo)
        assert trainer.model.model.layers[0].self_attn.attention_dropout == 0.1


def test_randomness_no_setting_switches_off_is_refused(tokenizer, tmp_path):
    """PhiMoE's router samples its experts in train mode whatever its settings: refused with a pi_old pass."""
    with pytest.raises(
        ValueError, match=r"whatever its settings: .*model\.layers\.\*\.mlp\.router \(PhiMoE's router Gumbel-samples"
    ):
        GSPOTrainer(
            model=build_model(tokenizer, "phimoe", {}),
            reward_funcs=completion_length_reward,
            args=small_config(tmp_path, **SCHEDULE),
            train_dataset=prompt_dataset(n=64),
            processing_class=tokenizer,
        )
