"""Routing drift metric and routing replay (trl_gspo/moe.py and its GSPOTrainer glue).

Pure functions against naive float64/loop references; the hooks on a tiny model of every router class replay
accepts (exact replay, experts kept after a router perturbation, router gradients) and on Qwen3-MoE and Mixtral
(gradient checkpointing, the load-balancing loss); and the trainer: recording only in the pi_old pass, the record
following TRL's shuffle and split, LoRA with a reference pass on the same model, and clear errors for a dense model
and for routers replay does not support.
"""

import contextlib
import itertools

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from transformers import AutoConfig, AutoModelForCausalLM

from trl_gspo import GSPOConfig, GSPOTrainer
from trl_gspo.moe import (
    REPLAY_ROUTER_CLASSES,
    ROUTING_KEY,
    RouterHooks,
    drift_fractions,
    find_routers,
    index_dtype,
    routing_drift_counts,
)

MOE_TYPES = ["qwen3_moe", "mixtral"]

# One tiny model per router class that replay accepts (every class of REPLAY_ROUTER_CLASSES, checked below), plus
# config variants that take another branch of the same router. Hybrid models get attention layers only (the router
# is the same class); model_type -> config fields beyond TINY_MOE.
FULL_ATTENTION = {"layer_types": ["full_attention", "full_attention"]}
REPLAY_MODELS = {
    "qwen3_moe": {},
    "qwen3_moe-no_norm": {"norm_topk_prob": False},
    "mixtral": {},
    "qwen2_moe": {},
    "olmoe": {},
    "minimax": {},
    "minimax_m2": {},  # sigmoid scores, selection with a score bias, renormalised
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0},
    "cohere2_moe": {},
    "cohere2_moe-sigmoid": {"expert_selection_fn": "sigmoid"},
    "deepseek_v4": {"mlp_layer_types": ["moe", "moe"]},
    "ernie4_5_moe": {},
    "flex_olmo": {},
    "flint": {"mlp_only_layers": []},
    "gpt_oss": {},
    "granitemoe": {},
    "granitemoe_swa": {},
    "granitemoeshared": {},
    "granitemoehybrid": {"mamba_n_heads": 4, "layer_types": ["attention", "attention"]},
    "hy_v3": {},
    "laguna": {},
    "lara_mini": {},
    "lfm2_moe": {"num_dense_layers": 0, **FULL_ATTENTION},
    "lfm2_moe-no_bias": {"num_dense_layers": 0, "use_expert_bias": False, **FULL_ATTENTION},
    "mellum": {},
    "qwen3_next": FULL_ATTENTION,
    "qwen3_5_moe_text": FULL_ATTENTION,
}
TINY_MOE = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    use_mamba_kernels=False,
)


def tiny_moe(tokenizer, name, **overrides):
    """A tiny randomly initialised causal LM for REPLAY_MODELS[name] (or any model type), with random router
    weights and score biases large enough that sigmoid, bias and renormalisation all matter."""
    model_type = name.split("-")[0]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{**TINY_MOE, **REPLAY_MODELS.get(name, {}), **overrides},
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for name_, value in (("pad_token_id", tokenizer.pad_token_id), ("eos_token_id", tokenizer.eos_token_id)):
        setattr(model.generation_config, name_, value)
    model.generation_config.bos_token_id = None
    with torch.no_grad():
        for router in find_routers(model):
            router.weight.normal_(std=0.5)
        for key, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if key.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.normal_(std=0.1)
    return model


# ---- pure functions ------------------------------------------------------------------------------------------


def naive_drift(recorded, current, mask):
    """Loop over tokens and layers with Python sets."""
    changed_pairs = pairs = changed_tokens = tokens = 0
    batch, length, layers, _ = recorded.shape
    for b, t in itertools.product(range(batch), range(length)):
        if not mask[b, t]:
            continue
        tokens += 1
        flags = [set(recorded[b, t, i].tolist()) != set(current[b, t, i].tolist()) for i in range(layers)]
        pairs += layers
        changed_pairs += sum(flags)
        changed_tokens += any(flags)
    return [changed_pairs, pairs, changed_tokens, tokens]


def test_routing_drift_counts_match_a_set_loop():
    generator = torch.Generator().manual_seed(0)
    recorded = torch.stack([torch.randperm(6, generator=generator)[:2] for _ in range(3 * 5 * 4)]).view(3, 5, 4, 2)
    current = recorded.clone()
    current[..., [0, 1]] = current[..., [1, 0]]  # same sets in another order: not a change
    flip = torch.rand(3, 5, 4, generator=generator) < 0.3
    current[..., 0] = torch.where(flip, (current[..., 0] + 1) % 6, current[..., 0])
    mask = torch.rand(3, 5, generator=generator) < 0.7
    counts = routing_drift_counts(recorded.to(torch.uint8), current, mask.int())
    expected = naive_drift(recorded, current, mask)
    assert counts.tolist() == expected
    assert 0 < expected[0] < expected[1]  # the data has both changed and unchanged pairs
    fractions = drift_fractions(counts)
    assert fractions["moe/routing_drift/token_layer"] == expected[0] / expected[1]
    assert fractions["moe/routing_drift/token_any_layer"] == expected[2] / expected[3]
    assert drift_fractions(torch.zeros(4)) == {}


def test_index_dtype_holds_every_expert():
    for experts in (2, 128, 256, 257, 2**15, 2**15 + 1):
        dtype = index_dtype(experts)
        assert torch.tensor(experts - 1).to(dtype).item() == experts - 1


# ---- hooks on real models --------------------------------------------------------------------------------------


def padded_batch(tokenizer):
    return tokenizer(["1+1=", "123+456=7", "42="], return_tensors="pt", padding=True)


def record(model, batch):
    """The hooks and the natural routing of a plain forward of the padded `batch`, as (B, L, layers, k)."""
    hooks = RouterHooks(find_routers(model))
    with torch.no_grad(), hooks.recording():
        logits = model(**batch).logits
    return hooks, hooks.recorded().view(*batch["input_ids"].shape, hooks.num_layers, hooks.top_k), logits


def start_replay(hooks, routing):
    """Replay a (B, L, layers, k) routing in the following forwards of the padded batch (model order: row-major)."""
    hooks.start_policy_pass(routing.reshape(-1, *routing.shape[2:]))


def observed(hooks, batch_size, seq_len):
    return hooks.observed().view(batch_size, seq_len, hooks.num_layers, hooks.top_k)


def experts_inputs(model):
    """Capture the top-k indices each experts module is called with."""
    seen = []
    handles = [
        block.experts.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
        for block in model.modules()
        if hasattr(block, "experts") and hasattr(block, "gate")
    ]
    return seen, handles


def router_outputs(routers):
    """Capture what each router returns (what its experts are called with), after the replay hooks."""
    seen = [[] for _ in routers]
    handles = [
        router.register_forward_hook(lambda module, args, out, i=i: seen[i].append((out[1].detach(), out[2])))
        for i, router in enumerate(routers)
    ]
    return seen, handles


def test_replay_models_cover_exactly_the_accepted_routers(tokenizer):
    built = {type(router).__name__ for name in REPLAY_MODELS for router in find_routers(tiny_moe(tokenizer, name))}
    assert built == REPLAY_ROUTER_CLASSES


@pytest.mark.parametrize("name", sorted(REPLAY_MODELS))
def test_replay_is_exact_keeps_the_recorded_experts_and_trains_the_router(tokenizer, name):
    """Every accepted router: (a) replay with unchanged parameters is bit-identical to the plain forward (so with
    lr 0 every sequence ratio is exactly 1); (b) after a perturbation of every router, the routers hand their
    experts the recorded indices while their natural choice has moved; (c) every router weight gets gradient."""
    model = tiny_moe(tokenizer, name)
    batch = padded_batch(tokenizer)
    hooks, routing, reference = record(model, batch)
    start_replay(hooks, routing)
    with torch.no_grad():
        replayed = model(**batch).logits
    assert torch.equal(replayed, reference)
    assert torch.equal(observed(hooks, *batch["input_ids"].shape).to(torch.uint8), routing)

    routers = find_routers(model)
    with torch.no_grad():
        for router in routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(1)))
    seen, handles = router_outputs(routers)
    start_replay(hooks, routing)
    model(**batch).logits.square().mean().backward()
    natural = observed(hooks, *batch["input_ids"].shape)
    assert not torch.equal(natural.to(torch.uint8), routing), "the perturbation must change the natural routing"
    used = torch.stack([out[0][1].reshape(*batch["input_ids"].shape, -1) for out in seen], dim=2)
    assert torch.equal(used.to(torch.uint8), routing)
    for router in routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    for handle in handles:
        handle.remove()


def naive_minimax_m2_weights(logits, experts):
    scores = torch.sigmoid(logits.double())
    weights = scores.gather(-1, experts)
    return weights / weights.sum(-1, keepdim=True)


def naive_jamba_weights(logits, experts):
    return torch.softmax(logits.double(), -1).gather(-1, experts)  # no renormalisation over the top-k


@pytest.mark.parametrize(
    "name,naive",
    [("minimax_m2", naive_minimax_m2_weights), ("jamba", naive_jamba_weights)],
    ids=["minimax_m2", "jamba"],
)
def test_replayed_weights_of_formerly_inexact_routers_match_their_own_formula(tokenizer, name, naive):
    """MiniMax-M2 (sigmoid, score bias) and Jamba (no renormalisation) were once replayed with a softmax +
    renormalisation: the replayed weights must be the router's own formula at the recorded experts (float64)."""
    model = tiny_moe(tokenizer, name)
    batch = padded_batch(tokenizer)
    hooks, routing, _ = record(model, batch)
    routers = find_routers(model)
    with torch.no_grad():
        for router in routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(1)))
    seen, handles = router_outputs(routers)
    logits = [[] for _ in routers]
    taps = [
        router.register_forward_hook(lambda module, args, out, i=i: logits[i].append(out[0].detach()))
        for i, router in enumerate(routers)
    ]
    start_replay(hooks, routing)
    with torch.no_grad():
        model(**batch)
    for layer in range(len(routers)):
        experts = routing[:, :, layer].reshape(-1, 2).long()
        expected = naive(logits[layer][0], experts)
        torch.testing.assert_close(seen[layer][0][0].double().reshape(expected.shape), expected)
    for handle in handles + taps:
        handle.remove()


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_replay_without_update_gives_identical_logits(tokenizer, make_model, model_type):
    model = make_model(model_type)
    batch = padded_batch(tokenizer)
    hooks, routing, reference = record(model, batch)
    assert routing.shape == (3, batch["input_ids"].size(1), 2, 2) and routing.dtype == torch.uint8
    start_replay(hooks, routing)
    with torch.no_grad():
        replayed = model(**batch).logits
    assert torch.equal(replayed, reference)
    assert torch.equal(observed(hooks, *batch["input_ids"].shape).to(torch.uint8), routing)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_replay_keeps_recorded_experts_after_router_perturbation_and_router_learns(tokenizer, make_model, model_type):
    model = make_model(model_type)
    batch = padded_batch(tokenizer)
    hooks, routing, _ = record(model, batch)
    routers = find_routers(model)
    with torch.no_grad():
        for router in routers:
            router.weight.add_(torch.randn_like(router.weight))
    seen, handles = experts_inputs(model)
    start_replay(hooks, routing)
    model(**batch).logits.square().mean().backward()
    natural = observed(hooks, *batch["input_ids"].shape)
    assert not torch.equal(natural.to(torch.uint8), routing), "the perturbation must change the natural routing"
    used = torch.stack([s.view(*batch["input_ids"].shape, -1) for s in seen], dim=2)
    assert torch.equal(used.to(torch.uint8), routing)
    for router in routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_replay_under_gradient_checkpointing_matches_plain_backward(tokenizer, make_model, model_type):
    """Checkpointing re-runs the routers in backward: they must replay again, so the gradients are the same."""
    batch = padded_batch(tokenizer)
    grads = []
    for checkpointing in (False, True):
        model = make_model(model_type)
        hooks, routing, _ = record(model, batch)
        with torch.no_grad():
            for router in find_routers(model):
                router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(1)))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        calls = []
        count = find_routers(model)[0].register_forward_hook(lambda *a, calls=calls: calls.append(1))
        start_replay(hooks, routing)
        model(**batch).logits.square().mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in backward
        grads.append([p.grad.clone() for p in model.parameters()])
        count.remove()
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def naive_load_balancing_loss(router_logits, experts, attention_mask, num_experts):
    """Switch-Transformer loss, float64 loop over layers: E * sum_e (share of top-k slots routed to e) * (mean
    router probability of e), over the non-padding tokens, as transformers defines it."""
    mask = attention_mask.reshape(-1).double()
    slots = torch.zeros(num_experts, dtype=torch.float64)
    probs = torch.zeros(num_experts, dtype=torch.float64)
    for logits, chosen in zip(router_logits, experts, strict=True):
        for token in range(logits.size(0)):
            for expert in chosen[token].tolist():
                slots[expert] += mask[token]
        probs += (torch.softmax(logits.double(), -1) * mask[:, None]).sum(0)
    rows = mask.sum() * len(router_logits)
    return num_experts * ((slots / rows) * (probs / rows)).sum()


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_load_balancing_loss_under_replay_counts_the_routers_current_choice(tokenizer, make_model, model_type):
    """The aux loss under replay sees the router's current top-k (what it balances: the routing the model will use
    when generating), not the replayed experts; docs/MOE.md says why. With the routers perturbed the two differ."""
    model = make_model(model_type)
    batch = padded_batch(tokenizer)
    hooks, routing, _ = record(model, batch)
    routers = find_routers(model)
    with torch.no_grad():
        for router in routers:
            router.weight.add_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(1)))
    logits = []
    taps = [
        router.register_forward_hook(lambda module, args, out: logits.append(out[0].detach())) for router in routers
    ]
    start_replay(hooks, routing)
    with torch.no_grad():
        aux = model(**batch, output_router_logits=True).aux_loss
    natural = observed(hooks, *batch["input_ids"].shape)
    num_experts = routers[0].num_experts
    mask = batch["attention_mask"]
    current = naive_load_balancing_loss(logits, [natural[:, :, i].reshape(-1, 2) for i in range(2)], mask, num_experts)
    replayed = naive_load_balancing_loss(
        logits, [routing[:, :, i].reshape(-1, 2) for i in range(2)], mask, num_experts
    )
    assert abs(current - replayed) > 1e-3, "the test needs a perturbation that moves the load"
    assert aux.item() == pytest.approx(current.item(), rel=1e-6)
    for tap in taps:
        tap.remove()


def test_replay_refuses_a_routing_of_the_wrong_shape(tokenizer, make_model):
    model = make_model("qwen3_moe")
    batch = padded_batch(tokenizer)
    hooks, routing, _ = record(model, batch)
    start_replay(hooks, routing[:2])
    with pytest.raises(RuntimeError, match="routing replay: layer 0 routes"):
        model(**batch)


# ---- the trainer --------------------------------------------------------------------------------------------------


def train(tmp_path, model, tokenizer, **overrides):
    args = small_config(tmp_path, **overrides)
    trainer = GSPOTrainer(
        model, completion_length_reward, args=args, train_dataset=prompt_dataset(), processing_class=tokenizer
    )
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def micro_batch_tokens(trainer):
    """Tokens (rows x width) of each micro-batch of the trainer's last rollout: what one recorded pass routes."""
    return [batch["prompt_ids"].numel() + batch["completion_ids"].numel() for batch in trainer._buffered_inputs]


@contextlib.contextmanager
def spy_recordings(recordings):
    original = RouterHooks.recorded

    def spy(self):
        out = original(self)
        recordings.append(out)
        return out

    RouterHooks.recorded = spy
    try:
        yield
    finally:
        RouterHooks.recorded = original


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_no_update_means_no_drift_and_ratio_one_through_shuffle_and_split(tmp_path, tokenizer, make_model, model_type):
    """lr=0, 4 micro-batches per rollout (steps_per_generation 4 > gradient accumulation 2), padded and packed: the
    recorded routing must travel with its rows through TRL's shuffle and split and through the packed layout, or
    drift would be > 0 and the replayed experts would belong to other tokens (ratio != 1)."""
    for replay, padding_free in ((False, False), (True, False), (False, True), (True, True)):
        recordings = []
        with spy_recordings(recordings):
            trainer, logs = train(
                tmp_path,
                make_model(model_type),
                tokenizer,
                learning_rate=0.0,
                per_device_train_batch_size=4,
                gradient_accumulation_steps=2,
                steps_per_generation=4,
                max_steps=2,
                routing_replay=replay,
                padding_free=padding_free,
            )
        # one rollout of 16 rows: recorded in the pi_old pass of each of its 4 micro-batches, not in generate()
        if padding_free:  # the packed rows the model saw
            assert len(recordings) == 4
        else:
            assert [recording.size(0) for recording in recordings] == micro_batch_tokens(trainer)
        for entry in logs:
            assert entry["moe/routing_drift/token_layer"] == 0.0
            assert entry["moe/routing_drift/token_any_layer"] == 0.0
            assert entry["gspo/seq_ratio/min"] == entry["gspo/seq_ratio/max"] == 1.0


@pytest.mark.parametrize("name", ["minimax_m2", "jamba"])
def test_formerly_inexact_routers_replay_with_ratio_exactly_one_at_lr_0(tmp_path, tokenizer, name):
    """MiniMax-M2 (sigmoid, score bias) and Jamba (no renormalisation): replaying the model's own routing with
    lr 0 changes nothing, so every sequence ratio is exactly 1 (a softmax + renormalisation replay gave up to
    2e-3 away from 1)."""
    _, logs = train(
        tmp_path,
        tiny_moe(tokenizer, name),
        tokenizer,
        learning_rate=0.0,
        steps_per_generation=4,
        max_steps=2,
        routing_replay=True,
    )
    for entry in logs:
        assert entry["gspo/seq_ratio/min"] == entry["gspo/seq_ratio/max"] == 1.0
        assert entry["moe/routing_drift/token_layer"] == 0.0


@pytest.mark.parametrize(
    "name,router_class",
    [
        ("phimoe", "PhimoeTopKRouter"),  # sparsemixer: no top-k call, jitter noise in training
        ("beam", "BeamTopKRouter"),  # group-limited: three top-k calls
        ("kolibri1", "Kolibri1TopKRouter"),  # another matmul under no_grad on CUDA (the pi_old pass)
    ],
)
def test_routing_replay_on_an_unsupported_router_is_refused_at_construction(tmp_path, tokenizer, name, router_class):
    extra = {"mlp_layer_types": ["sparse", "sparse"], "n_group": 2, "topk_group": 1} if name == "beam" else {}
    model = tiny_moe(tokenizer, name, **extra)
    assert {type(router).__name__ for router in find_routers(model)} == {router_class}
    args = small_config(tmp_path, steps_per_generation=4, routing_replay=True)
    with pytest.raises(ValueError, match=f"model_type='{name}'.*routes with {router_class},.*routing_replay=False"):
        GSPOTrainer(
            model, completion_length_reward, args=args, train_dataset=prompt_dataset(), processing_class=tokenizer
        )
    if name == "phimoe":  # it samples its experts in train mode: no off-policy run at all (trl_gspo/noise.py)
        with pytest.raises(ValueError, match="PhiMoE's router Gumbel-samples its experts"):
            train(tmp_path, model, tokenizer, steps_per_generation=4, max_steps=2)
        return
    # the drift metric needs no exact replay: the same model trains with it
    _, logs = train(tmp_path, model, tokenizer, steps_per_generation=4, max_steps=2)
    assert all("moe/routing_drift/token_layer" in entry for entry in logs)


def test_replay_hooks_refuse_a_router_with_several_topk_calls(tokenizer):
    """The hooks' own guard (behind the refusal at construction): a group-limited router ranks groups first."""
    model = tiny_moe(tokenizer, "beam", mlp_layer_types=["sparse", "sparse"], n_group=2, topk_group=1)
    batch = padded_batch(tokenizer)
    hooks, routing, _ = record(model, batch)
    start_replay(hooks, routing)
    with pytest.raises(RuntimeError, match="only a single top-2 selection over the last dimension, of 4 experts"):
        model(**batch)
    hooks.clear()
    with torch.no_grad():
        model(**batch)  # the forcing mode did not outlive the failed forward


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_drift_is_logged_and_replay_changes_the_ratio(tmp_path, tokenizer, make_model, model_type):
    _, plain = train(tmp_path, make_model(model_type), tokenizer, steps_per_generation=4)
    _, replayed = train(tmp_path, make_model(model_type), tokenizer, steps_per_generation=4, routing_replay=True)
    # step 1 of each rollout is before any update; later steps see a moved router
    assert plain[0]["moe/routing_drift/token_layer"] == 0.0
    assert all(
        0 < entry["moe/routing_drift/token_layer"] <= entry["moe/routing_drift/token_any_layer"] <= 1
        for entry in plain[1:]
    )
    # same data and step 1; afterwards replay forces the recorded experts, so the ratios differ
    assert plain[0]["loss"] == replayed[0]["loss"]
    assert any(
        p["gspo/seq_ratio/std"] != r["gspo/seq_ratio/std"] for p, r in zip(plain[1:], replayed[1:], strict=True)
    )


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_trainer_replay_under_gradient_checkpointing_matches_plain_run(tmp_path, tokenizer, make_model, model_type):
    """The trainer keeps the replay state until backward is done: with checkpointing the routers re-run in
    backward and must replay again, so the run matches a run without checkpointing."""
    runs = [
        train(
            tmp_path,
            make_model(model_type),
            tokenizer,
            steps_per_generation=4,
            routing_replay=True,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )[1]
        for checkpointing in (False, True)
    ]
    for plain, checkpointed in zip(*runs, strict=True):
        assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
        assert checkpointed["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)


def test_lora_with_reference_pass_on_the_same_model(tmp_path, tokenizer, make_model):
    """beta > 0 with PEFT: the reference pass runs on the policy model with adapters disabled, after the pi_old
    pass; only the pi_old passes (one per micro-batch) are recorded, not TRL's 16-row reference pass (else replay
    would fail)."""
    from peft import LoraConfig

    recordings = []
    model = make_model("qwen3_moe")
    with spy_recordings(recordings):
        args = small_config(tmp_path, steps_per_generation=2, max_steps=2, beta=0.04, routing_replay=True)
        trainer = GSPOTrainer(
            model,
            completion_length_reward,
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [recording.size(0) for recording in recordings] == micro_batch_tokens(trainer)
    assert all("kl" in entry and "moe/routing_drift/token_layer" in entry for entry in logs)


def test_evaluation_replays_and_leaves_the_hooks_idle(tmp_path, tokenizer, make_model):
    """Evaluation has no backward (hence no training_step): the replay state must still be dropped, or a later
    generate() (e.g. in a callback) would be forced onto the evaluation batch's experts."""
    model = make_model("qwen3_moe")
    args = small_config(tmp_path, steps_per_generation=2, routing_replay=True, per_device_eval_batch_size=8)
    trainer = GSPOTrainer(
        model,
        completion_length_reward,
        args=args,
        train_dataset=prompt_dataset(),
        eval_dataset=prompt_dataset(8),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_moe/routing_drift/token_layer"] == 0.0  # no update between pi_old and policy pass
    assert trainer.routing.hooks._mode == "idle" and trainer.routing.hooks._forced is None
    batch = tokenizer(["1+1=", "123+456="], return_tensors="pt", padding=True)
    model.generate(**batch, max_new_tokens=2, do_sample=False)


def test_dense_model_with_routing_replay_is_refused_at_construction(tmp_path, tokenizer, make_model):
    args = small_config(tmp_path, routing_replay=True)
    with pytest.raises(ValueError, match="model_type='qwen2'.*routing_replay=False"):
        GSPOTrainer(
            make_model("qwen2"),
            completion_length_reward,
            args=args,
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )


def test_dense_model_logs_no_routing_metrics(tmp_path, tokenizer, make_model):
    trainer, logs = train(tmp_path, make_model("qwen2"), tokenizer, max_steps=2)
    assert trainer.routing is None
    assert not any(key.startswith("moe/") for entry in logs for key in entry)


def test_routing_replay_on_policy_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="routing_replay=True .* on-policy"):
        GSPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, steps_per_generation=1, routing_replay=True)


def test_drift_off_and_no_replay_adds_no_hooks_and_no_batch_key(tmp_path, tokenizer, make_model):
    trainer, logs = train(tmp_path, make_model("mixtral"), tokenizer, max_steps=1, log_routing_drift=False)
    assert trainer.routing is None
    assert ROUTING_KEY not in trainer._buffered_inputs[0]
    assert not any(key.startswith("moe/") for entry in logs for key in entry)


def test_routing_replay_with_rollout_logprobs_is_refused_by_the_config_pointing_to_r3(tmp_path):
    with pytest.raises(
        ValueError,
        match="routing_replay=True cannot be combined with use_rollout_logprobs=True.*rollout_routing_replay",
    ):
        small_config(tmp_path, routing_replay=True, use_rollout_logprobs=True)


def test_drift_is_off_with_rollout_logprobs_without_r3_and_the_run_says_so(tmp_path, tokenizer, make_model, caplog):
    """pi_old is then the sampler's, whose routing is not recorded: no hooks, no moe/ metrics, one warning."""
    with caplog.at_level("WARNING"):
        trainer, logs = train(tmp_path, make_model("qwen3_moe"), tokenizer, max_steps=1, use_rollout_logprobs=True)
    assert trainer.routing is None
    assert ROUTING_KEY not in trainer._buffered_inputs[0]
    assert not any(key.startswith("moe/") for entry in logs for key in entry)
    assert any("moe/routing_drift is not logged" in record.getMessage() for record in caplog.records)


def tiny_deepseek_v3(tokenizer):
    """DeepSeek-V3's router is a *TopkRouter that returns only logits: its experts are chosen outside the router."""
    return tiny_moe(
        tokenizer,
        "deepseek_v3",
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )


def test_a_router_without_experts_in_its_output_is_named_not_silently_skipped(tmp_path, tokenizer, caplog):
    with pytest.raises(ValueError, match="routes with DeepseekV3TopkRouter, which does not return its experts"):
        GSPOTrainer(
            tiny_deepseek_v3(tokenizer),
            completion_length_reward,
            args=small_config(tmp_path, routing_replay=True, steps_per_generation=4),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )
    with caplog.at_level("WARNING"):
        trainer = GSPOTrainer(
            tiny_deepseek_v3(tokenizer),
            completion_length_reward,
            args=small_config(tmp_path, steps_per_generation=4),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
        )
    assert trainer.routing is None
    assert any(
        "moe/routing_drift is not logged" in r.getMessage() and "DeepseekV3TopkRouter" in r.getMessage()
        for r in caplog.records
    )
