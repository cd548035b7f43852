"""GSPOConfig.padding_free: every log-prob pass packed, with the padded path's results (float32, tight tolerance)."""

import math
import re
import types

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from helpers import ragged_batch, tiny_model

import trl_gspo.packing as packing
from trl_gspo import GSPOTrainer
from trl_gspo.packing import PACKING_INEXACT_MODEL_TYPES, packing_support_problem

PROMPTS = [3, 7, 1, 5, 2, 6]
COMPLETIONS = [9, 0, 4, 12, 1, 6]  # one empty completion (e.g. masked as truncated)


@pytest.fixture
def packed_batches(monkeypatch):
    """Every PackedBatch the trainer's packed passes build, in order."""
    built = []
    original = packing.pack_sequences

    def recording(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(packing, "pack_sequences", recording)
    return built


def build_trainer(make_model, tokenizer, tmp_path, model_type="qwen2", lora=False, **overrides):
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = GSPOTrainer(
        model=make_model(model_type),
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, **{"padding_free": True, **overrides}),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if lora:  # lora_B starts at zero: give the adapter an effect, so the reference pass (adapter off) differs
        with torch.no_grad():
            for name, param in trainer.model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    return trainer


def ragged_inputs(trainer, tool_mask=False, seed=0):
    """A micro-batch as GRPOTrainer lays it out (left-padded prompts, right-padded completions), pi_old perturbed."""
    input_ids, attention_mask, completion_width = ragged_batch(
        PROMPTS, COMPLETIONS, vocab=trainer.model.config.vocab_size, seed=seed
    )
    prompt_width = input_ids.size(1) - completion_width
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "prompt_ids": input_ids[:, :prompt_width],
        "prompt_mask": attention_mask[:, :prompt_width],
        "completion_ids": input_ids[:, prompt_width:],
        "completion_mask": attention_mask[:, prompt_width:],
        "advantages": torch.linspace(-1.0, 1.0, len(PROMPTS)),
        "old_per_token_logps": -3.0 + 0.05 * torch.randn(len(PROMPTS), completion_width, generator=generator),
    }
    if tool_mask:
        inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
        inputs["tool_mask"][3, 2:6] = 0
    return inputs


def both_paths(trainer, inputs):
    """Log-probs, entropies, aux loss, loss, metrics and gradients: padded path, then packed path."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    results = {}
    packed_backend = trainer.forward
    assert packed_backend is not None
    for padding_free in (False, True):
        trainer.forward = packed_backend if padding_free else None  # None: TRL's padded pass
        trainer.model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        logps, entropies, aux = trainer._get_per_token_logps_and_entropies(
            trainer.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].size(1),
            compute_entropy=True,
            compute_aux_loss=trainer.aux_loss_enabled,
        )
        step_inputs = dict(inputs)
        if trainer.beta:  # the reference pass: the PEFT model with its adapter disabled
            with torch.no_grad(), trainer.model.disable_adapter():
                step_inputs["ref_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
                    trainer.model,
                    torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                    torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                    inputs["completion_ids"].size(1),
                )[0]
        loss = trainer._compute_loss(trainer.model, step_inputs)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results[padding_free] = dict(
            ref=step_inputs.get("ref_per_token_logps"),
            logps=logps.detach(),
            entropies=entropies.detach(),
            aux=aux,
            loss=loss.detach(),
            grads=grads,
            metrics=metrics,
        )
    return results[False], results[True]


def assert_same(padded, packed):
    mask = padded["logps"] != 0
    assert mask.any()
    torch.testing.assert_close(packed["logps"], padded["logps"], atol=2e-6, rtol=0)
    torch.testing.assert_close(packed["entropies"], padded["entropies"], atol=2e-6, rtol=0)
    assert torch.all(packed["logps"][~mask] == 0)  # padding stays exactly zero
    if padded["ref"] is not None:
        torch.testing.assert_close(packed["ref"], padded["ref"], atol=2e-6, rtol=0)
        assert not torch.equal(padded["ref"], padded["logps"])  # the adapter was really disabled
    torch.testing.assert_close(packed["loss"], padded["loss"], atol=1e-7, rtol=1e-5)
    assert padded["grads"].keys() == packed["grads"].keys() and padded["grads"]
    scale = max(g.abs().max().item() for g in padded["grads"].values())
    assert scale > 0
    for name, grad in padded["grads"].items():
        torch.testing.assert_close(packed["grads"][name], grad, atol=1e-5 * scale, rtol=0, msg=name)
    for name, value in padded["metrics"].items():
        assert math.isclose(packed["metrics"][name], value, rel_tol=1e-4, abs_tol=1e-6), name


CASES = {
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "qwen3_moe_aux_loss": dict(model_type="qwen3_moe"),
    "mixtral_aux_loss": dict(model_type="mixtral"),
    "lora_with_kl": dict(lora=True, beta=0.04),
    "gradient_checkpointing": dict(gradient_checkpointing=True),
    "entropy_mask_and_bonus": dict(
        importance_sampling_level="sequence_token", top_entropy_quantile=0.5, entropy_coef=0.1
    ),
    "row_budget_of_16_tokens": dict(padding_free_row_tokens=16),
}


@pytest.mark.parametrize("case", CASES)
def test_packed_passes_equal_the_padded_path(make_model, tokenizer, tmp_path, case, packed_batches):
    trainer = build_trainer(make_model, tokenizer, tmp_path, **CASES[case])
    if case == "gradient_checkpointing":  # the HF Trainer turns it on in train(); here by hand, as it does
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
        assert trainer.model.is_gradient_checkpointing
    inputs = ragged_inputs(trainer, tool_mask=case == "qwen2")
    padded, packed = both_paths(trainer, inputs)
    assert_same(padded, packed)
    assert packed_batches  # the packed path really packed
    if trainer.aux_loss_enabled:
        # the padded path already leaves padding out of the load-balancing loss (attention mask); the packed path
        # runs each chunk as one row without filler, so it sees the same tokens and the same value
        assert padded["aux"] > 0
        torch.testing.assert_close(packed["aux"], padded["aux"], atol=1e-6, rtol=1e-5)


def test_training_run_is_the_padded_run(make_model, tokenizer, tmp_path, monkeypatch):
    """Same seed, same generations: the logged losses of a 3-step off-policy run match, and every pass packed."""
    calls = []
    original = packing.packed_logps_and_entropies

    def counting(*args, **kwargs):
        calls.append(kwargs.get("compute_entropy", False))
        return original(*args, **kwargs)

    monkeypatch.setattr("trl_gspo.packing.packed_logps_and_entropies", counting)
    logs = {}
    for padding_free in (False, True):
        trainer = build_trainer(
            make_model,
            tokenizer,
            tmp_path / str(padding_free),
            lora=True,
            max_steps=3,
            beta=0.04,
            padding_free=padding_free,
        )
        trainer.train()
        logs[padding_free] = [(h["loss"], h["kl"]) for h in trainer.state.log_history if "loss" in h]
    for (loss, kl), (packed_loss, packed_kl) in zip(logs[False], logs[True], strict=True):
        assert math.isclose(packed_loss, loss, rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(packed_kl, kl, rel_tol=1e-4, abs_tol=1e-7)
    # 3 policy passes (with entropy); per generation one pi_old and one reference pass per micro-batch (4 each)
    assert calls.count(True) == 3 and calls.count(False) == 4 + 4


def build_with(model, tokenizer, tmp_path, **overrides):
    return GSPOTrainer(
        model=model,
        reward_funcs=completion_length_reward,
        args=small_config(tmp_path, padding_free=True, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )


def test_an_untested_attention_implementation_is_refused_at_construction(make_model, tokenizer, tmp_path):
    model = make_model("qwen2")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"this model \(Qwen2ForCausalLM\): attn_implementation='flex_attention'"):
        build_with(model, tokenizer, tmp_path)


@pytest.mark.parametrize("model_type", ["opt", "bloom", "jamba", "lfm2"])
def test_a_model_type_measured_inexact_is_refused_at_construction(tokenizer, tmp_path, model_type):
    """tests/unit/test_packing.py measures these inexact when packed; the trainer refuses them naming type and reason."""
    model = tiny_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    reason = PACKING_INEXACT_MODEL_TYPES[model_type]
    with pytest.raises(
        ValueError,
        match=re.escape("padding_free=True cannot be used with this model (")
        + ".*"
        + re.escape(f"): model_type='{model_type}' {reason}"),
    ):
        build_with(model, tokenizer, tmp_path)


def test_flash_attention_packs_each_chunk_into_one_row(make_model, tokenizer, tmp_path, flash_calls, packed_batches):
    """With flash-attention transformers finds packed boundaries in a batch of ONE row only: the trainer packs each
    chunk into one row even under a row budget that would make several, so the varlen kernel runs per sequence."""
    model = make_model("qwen2")
    model.config._attn_implementation = "flash_attention_2"  # transformers' dispatch, reference kernels (conftest)
    trainer = build_with(model, tokenizer, tmp_path, padding_free_row_tokens=16)
    padded, packed = both_paths(trainer, ragged_inputs(trainer))
    assert_same(padded, packed)
    assert packed_batches
    for layout in packed_batches:  # one row, no filler
        assert layout.input_ids.size(0) == 1 and int((layout.packed_index >= 0).sum()) == layout.input_ids.numel()
    nonempty = sorted(p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True))
    assert flash_calls and all(kind == "varlen" for kind, _ in flash_calls)  # never the dense kernel on a row
    assert all(sorted(lengths) == nonempty for _, lengths in flash_calls)


def test_vision_language_config_is_reported():
    text = types.SimpleNamespace(_attn_implementation="sdpa", model_type="qwen2")
    vlm = types.SimpleNamespace(
        config=types.SimpleNamespace(get_text_config=lambda: text, _attn_implementation="sdpa")
    )
    assert "vision-language" in packing_support_problem(vlm)
    text.get_text_config = lambda: text
    assert packing_support_problem(types.SimpleNamespace(config=text)) is None


def test_row_budget_is_validated(tmp_path):
    with pytest.raises(ValueError, match="padding_free_row_tokens=0"):
        small_config(tmp_path, padding_free_row_tokens=0)
