"""trl_gspo.noise on tiny models of transformers' decoders and PEFT adapters: what it finds, what it switches off.

The independent reference is the model itself: two train-mode forwards of the same input under different seeds
differ while a source is on, and are bit-identical once `switch_off_train_mode_noise` found nothing left.
"""

from types import SimpleNamespace

import pytest
import torch
from peft import BOFTConfig, LoHaConfig, LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from trl_gspo.noise import (
    describe_sources,
    find_train_mode_noise,
    make_ratio_passes_deterministic,
    switch_off_train_mode_noise,
)

SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
P = 0.1
# model type -> (config fields that turn its train-mode randomness on, what find_train_mode_noise must name)
MODELS = {
    "qwen2": (dict(attention_dropout=P), "model.layers.*.self_attn.attention_dropout=0.1 (x2)"),
    "gemma2": (dict(attention_dropout=P, head_dim=8), "model.layers.*.self_attn.attention_dropout=0.1 (x2)"),
    "starcoder2": (dict(residual_dropout=P, embedding_dropout=P), "model.embedding_dropout=0.1"),
    "falcon": (dict(attention_dropout=P, hidden_dropout=P), "FalconConfig.hidden_dropout=0.1"),
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=4), "transformer.h.*.attn.attn_dropout=Dropout(p=0.1) (x2)"),
    "gpt_bigcode": (dict(n_embd=32, n_layer=2, n_head=4), "transformer.h.*.attn.attn_dropout=0.1 (x2)"),
    "bloom": (dict(n_layer=2, n_head=4, hidden_dropout=P), "transformer.h.*.hidden_dropout=0.1 (x2)"),
    "persimmon": (dict(hidden_dropout=P), "model.layers.*.dropout=Dropout(p=0.1) (x2)"),
    "opt": (dict(ffn_dim=64, word_embed_proj_dim=32, layerdrop=0.5, dropout=0.0), "model.decoder.layerdrop=0.5"),
    "xglm": (
        dict(d_model=32, ffn_dim=64, attention_heads=4, num_layers=2, activation_dropout=P, dropout=0.0),
        "model.layers.*.activation_dropout=0.1 (x2)",
    ),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=P), "mlp.jitter_noise=0.1"),
    "dbrx": (
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            attn_config={"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"moe_num_experts": 4, "moe_top_k": 2, "moe_jitter_eps": P, "ffn_hidden_size": 64},
        ),
        "transformer.blocks.*.ffn.router.moe_jitter_eps=0.1 (x2)",
    ),
}


def tiny(model_type, **fields):
    config = AutoConfig.for_model(model_type, **{**SHAPE, **fields})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def forward_spread(model, seeds=4):
    """Largest difference between train-mode forwards of one input under a few seeds."""
    tokens = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        logits.append(model(tokens).logits)
    return max((other - logits[0]).abs().max().item() for other in logits[1:])


@pytest.mark.parametrize("model_type", MODELS)
def test_every_source_of_a_decoder_is_found_and_switched_off(model_type):
    fields, named = MODELS[model_type]
    model = tiny(model_type, **fields)
    assert named in describe_sources(find_train_mode_noise(model))
    assert forward_spread(model) > 0
    switch_off_train_mode_noise(model)
    assert find_train_mode_noise(model) == []
    assert forward_spread(model) == 0.0


@pytest.mark.parametrize(
    ("adapter", "named"),
    [
        (LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=P), "lora_dropout.default=Dropout(p=0.1)"),
        (
            LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], rank_dropout=P, module_dropout=P, init_weights=False),
            "q_proj.module_dropout['default']=0.1 (x2)",
        ),
        (
            BOFTConfig(boft_block_size=4, target_modules=["q_proj", "v_proj"], boft_dropout=0.5, init_weights=False),
            "boft_dropout.default=MultiplicativeDropoutLayer(p=0.5) (x2)",  # p=0.1 replaces none of 8 blocks
        ),
    ],
    ids=["lora", "loha", "boft"],
)
def test_peft_adapter_dropout_is_found_and_switched_off(adapter, named):
    model = get_peft_model(tiny("qwen2"), adapter).train()
    with torch.no_grad():  # an adapter that has moved (LoRA's B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    assert named in describe_sources(find_train_mode_noise(model))
    assert forward_spread(model) > 0
    switch_off_train_mode_noise(model)
    assert find_train_mode_noise(model) == []
    assert forward_spread(model) == 0.0


def test_phimoe_router_sampling_is_named_and_its_threshold_left_alone():
    """PhiMoE samples its experts in train mode whatever its settings: still named (and still random) after the
    switch-off; its `router_jitter_noise` is a deterministic sparsity threshold, not noise, and keeps its value."""
    model = tiny("phimoe", num_local_experts=4, num_experts_per_tok=2, input_jitter_noise=P)
    router = model.model.layers[0].mlp.router
    threshold = router.router_jitter_noise
    assert threshold > 0
    switch_off_train_mode_noise(model)
    left = find_train_mode_noise(model)
    assert [source.where for source in left] == ["model.layers.0.mlp.router", "model.layers.1.mlp.router"]
    assert not any(source.switchable for source in left)
    assert router.input_jitter_noise == 0.0 and router.router_jitter_noise == threshold
    assert forward_spread(model) > 0


def test_sources_are_folded_over_layers_and_counted():
    model = tiny("qwen2", attention_dropout=P)
    assert describe_sources(find_train_mode_noise(model)) == (
        "model.layers.*.self_attn.attention_dropout=0.1 (x2); Qwen2Config.attention_dropout=0.1"
    )


def schedule(**fields):
    """The GSPOConfig fields make_ratio_passes_deterministic reads, off-policy by default."""
    defaults = dict(
        importance_sampling_level="sequence",
        disable_dropout=False,
        gradient_accumulation_steps=1,
        steps_per_generation=4,
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
    )
    return SimpleNamespace(**{**defaults, **fields})


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({}, True),
        (dict(steps_per_generation=1), False),  # on-policy: no pi_old pass
        (dict(steps_per_generation=1, use_vllm=True, vllm_importance_sampling_correction=True), True),  # one runs
        (dict(importance_sampling_level="sequence_token"), True),
        (dict(importance_sampling_level="token"), False),  # TRL's GRPO
    ],
)
def test_dropout_left_on_is_refused_exactly_when_a_pi_old_pass_runs(fields, refused):
    model = tiny("qwen2", attention_dropout=P)
    if refused:
        with pytest.raises(ValueError, match=r"^GSPOConfig\.disable_dropout=False leaves"):
            make_ratio_passes_deterministic(schedule(**fields), model)
    else:
        make_ratio_passes_deterministic(schedule(**fields), model)
    assert model.model.layers[0].self_attn.attention_dropout == P  # never switched off when the user said no


def test_switch_off_reaches_the_reference_model_too():
    model, reference = tiny("qwen2", attention_dropout=P), tiny("qwen2", attention_dropout=P)
    make_ratio_passes_deterministic(schedule(disable_dropout=True), model, reference)
    assert find_train_mode_noise(model) == [] and find_train_mode_noise(reference) == []
