"""MoE configs with output_router_logits=True train without crashing on ragged prompts.

transformers' MoE models compute their load-balancing loss inside cached generation with the full attention mask
but the new tokens' router logits only: a shape error on any padded batch (see docs/MOE.md for the upstream
reproduction). GSPOTrainer turns router logits off for generation only; the training forward still asks for them,
so the aux loss stays on. Covered for Qwen3-MoE and Mixtral, with and without the flag, through the Python API and
the CLI, on prompts of very different lengths.
"""

import math

import pytest
import yaml
from conftest import completion_length_reward, small_config
from datasets import Dataset

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm, save_tiny_model
from trl_gspo import GSPOTrainer, cli
from trl_gspo.moe import router_logits_off

MOE_TYPES = ["qwen3_moe", "mixtral"]
# prompt lengths 2 to 13 characters: every generation batch is left-padded
RAGGED_QUESTIONS = [f"{'9' * (1 + i % 6)}+{'1' * (1 + i % 5)}=" for i in range(16)]


def ragged_dataset():
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in RAGGED_QUESTIONS]})


def test_upstream_generate_still_crashes_on_padded_batch(tokenizer):
    """The transformers bug this works around; if this fails, upstream fixed it and router_logits_off can go."""
    model = build_tiny_causal_lm(tokenizer, model_type="qwen3_moe", hidden_size=32, output_router_logits=True)
    batch = tokenizer(["1+1=", "123+456="], return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()
    with pytest.raises(RuntimeError, match="must match the size"):
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    with router_logits_off(model):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].size(1) + 3)
    assert model.config.output_router_logits is True  # restored


@pytest.mark.parametrize("model_type", MOE_TYPES)
@pytest.mark.parametrize("output_router_logits", [True, False])
def test_trainer_trains_moe_on_ragged_prompts(tmp_path, model_type, output_router_logits):
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        tokenizer, model_type=model_type, hidden_size=32, output_router_logits=output_router_logits
    )
    args = small_config(tmp_path, max_steps=2, steps_per_generation=2)
    trainer = GSPOTrainer(
        model, completion_length_reward, args=args, train_dataset=ragged_dataset(), processing_class=tokenizer
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    # the load-balancing loss stays on in the training forward (router_aux_loss_coef=0.01 in the tiny config)
    assert all(math.isfinite(entry["aux_loss"]) and entry["aux_loss"] > 0 for entry in logs)
    assert model.config.output_router_logits is output_router_logits  # the user's config is left as it was


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_cli_trains_moe_with_router_logits_on_ragged_prompts(tmp_path, model_type):
    model_dir = save_tiny_model(tmp_path / "model", model_type=model_type, hidden_size=32, output_router_logits=True)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"prompt": "{q}"}}\n' for q in RAGGED_QUESTIONS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=model_dir,
                dataset_name=str(data),
                reward_funcs=["test_moe_generation.length_reward"],
                per_device_train_batch_size=8,
                num_generations=4,
                max_completion_length=6,
                max_steps=2,
                steps_per_generation=2,
                use_cpu=True,
                bf16=False,
                report_to="none",
                logging_steps=1,
                save_strategy="no",
                output_dir=str(tmp_path / "out"),
            )
        )
    )
    trainer = cli.main(["--config", str(recipe)])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["aux_loss"] > 0 for entry in logs)
    saved = yaml.safe_load((tmp_path / "out" / "config.json").read_text())
    assert saved["output_router_logits"] is True  # the saved model keeps the user's setting


def length_reward(completions, **kwargs):
    """Loaded by the CLI by its dotted name (the tests folder is on sys.path)."""
    return [float(len(c[-1]["content"]) % 4) for c in completions]
