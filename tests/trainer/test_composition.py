"""Every combination of the trainer's optional passes on a tiny MoE model, trained off-policy for 2 optimizer steps.

padding_free {False, True} x use_rollout_logprobs {False, True} x replay {none, routing_replay (R2),
rollout_routing_replay (R3)} x importance_sampling_level {"sequence", "sequence_token"}: 24 combinations, float32 on
CPU, transformers generation, gradient_accumulation_steps=1 and steps_per_generation=2 (each rollout feeds two
optimizer steps: the second sees a policy one update newer than pi_old).

- R2 with rollout log-probs is refused when GSPOConfig is built: R2 replays the routing of the pi_old forward, which
  rollout log-probs do not run (R3 replays generation's own routing instead).
- Each of the 20 others trains, and, seen only through public seams (the objective's arguments, hooks of the test's
  own on the routers):
  (a) at learning rate 0 every sequence ratio s_i is exactly 1 when pi_old is recomputed, within rounding of the
      cached decoding when it is the rollout's log-probs;
  (b) at a learning rate that moves the ratio, the gradient reaching the policy pass's per-token log-probs is the
      float64 reference objective's (tests/helpers.py) for the same inputs;
  (c) with R3 every training forward (pi_old and policy passes, padded or packed) hands each router the experts
      generation chose at every position generation fed; with R2 the policy pass uses the pi_old pass's experts.
"""

import functools
import itertools
import re

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from helpers import RoutingTap, perturbed_routers, recording_objective, reference_objective

from trl_gspo import GSPOTrainer

REPLAYS = {"no_replay": {}, "R2": {"routing_replay": True}, "R3": {"rollout_routing_replay": True}}
LEVELS = ("sequence", "sequence_token")
COMBINATIONS = [
    pytest.param(
        padding_free,
        rollout_logprobs,
        replay,
        level,
        id="-".join(
            [
                "packed" if padding_free else "padded",
                "rollout_logprobs" if rollout_logprobs else "pi_old_pass",
                replay,
                level,
            ]
        ),
    )
    for padding_free, rollout_logprobs, replay, level in itertools.product(
        (False, True), (False, True), REPLAYS, LEVELS
    )
]
REFUSED = [c for c in COMBINATIONS if c.values[2] == "R2" and c.values[1]]
ACCEPTED = [c for c in COMBINATIONS if c not in REFUSED]

# 2 prompts x 4 completions per rollout, split into 2 micro-batches of 4: one optimizer step each
SCHEDULE = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    gradient_accumulation_steps=1,
    steps_per_generation=2,
    max_steps=2,
    max_completion_length=8,
)
# moves s_i at the second step of a rollout by a few 1e-3 on this model, so that some sequences are clipped at the
# paper's band and some are not, and changes the top-k experts of about a tenth of the (token, layer) pairs
LEARNING_RATE = 1e-3
# Rollout log-probs come from generation's cached decoding (one position per step, other kernels' summation order)
# and pi_theta from a full forward of the sequence: in float32 they agree to rounding only (measured |log s_i| <=
# 2e-7 on this model), so s_i is 1 within rounding, not exactly; 1e-4 stays a third of the clip band below eps_low.
ROLLOUT_LOGPROBS_TOLERANCE = 1e-4


def config(tmp_path, padding_free, rollout_logprobs, replay, level, **overrides):
    return small_config(
        tmp_path,
        **SCHEDULE,
        padding_free=padding_free,
        use_rollout_logprobs=rollout_logprobs,
        importance_sampling_level=level,
        **REPLAYS[replay],
        **overrides,
    )


def train(make_model, tokenizer, tmp_path, combination, learning_rate, perturb_generation=False):
    """Train the combination for SCHEDULE's 2 steps; (trainer, objective records, routing tap). With
    `perturb_generation` generate() runs with perturbed routers (`perturbed_routers`)."""
    model = make_model("qwen3_moe")
    trainer = GSPOTrainer(
        model=model,
        reward_funcs=completion_length_reward,
        args=config(tmp_path, *combination, learning_rate=learning_rate),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )
    tap = RoutingTap(
        trainer.model, functools.partial(perturbed_routers, trainer.model) if perturb_generation else None
    )
    try:
        with recording_objective() as records:
            trainer.train()
    finally:
        tap.remove()
    assert len(records) == SCHEDULE["max_steps"], "one objective call per micro-batch"
    assert all("grad" in record for record in records), "every policy pass was backpropagated"
    return trainer, records, tap


@pytest.mark.parametrize("padding_free, rollout_logprobs, replay, level", REFUSED)
def test_routing_replay_with_rollout_logprobs_is_refused_at_construction(
    tmp_path, padding_free, rollout_logprobs, replay, level
):
    with pytest.raises(ValueError) as error:
        config(tmp_path, padding_free, rollout_logprobs, replay, level)
    message = str(error.value)
    # both fields by name ("routing_replay" on its own, not as the tail of "rollout_routing_replay"), and the way out
    assert re.search(r"\brouting_replay\b", message) and "use_rollout_logprobs" in message, message
    assert "rollout_routing_replay" in message, message


@pytest.mark.parametrize("padding_free, rollout_logprobs, replay, level", ACCEPTED)
def test_every_ratio_is_one_at_learning_rate_zero(
    make_model, tokenizer, tmp_path, padding_free, rollout_logprobs, replay, level
):
    combination = (padding_free, rollout_logprobs, replay, level)
    trainer, records, tap = train(make_model, tokenizer, tmp_path, combination, learning_rate=0.0)
    ratios = torch.cat([torch.exp(r["out"].seq_log_ratio[r["out"].lengths > 0]) for r in records])
    assert ratios.numel() == SCHEDULE["max_steps"] * SCHEDULE["per_device_train_batch_size"]
    if rollout_logprobs:
        assert (ratios - 1).abs().max() < ROLLOUT_LOGPROBS_TOLERANCE, ratios
    else:
        assert (ratios == 1.0).all(), (ratios - 1).abs().max()
    # in float32 and before any update the training forwards route every row as generation did (on this model; this
    # also shows that the tap lays packed rows out right, which the comparisons with replay rely on)
    assert check_routing(tap, replay, tokenizer.eos_token_id) == 0


@pytest.mark.parametrize("padding_free, rollout_logprobs, replay, level", ACCEPTED)
def test_gradient_wrt_policy_log_probs_equals_the_reference(
    make_model, tokenizer, tmp_path, padding_free, rollout_logprobs, replay, level
):
    combination = (padding_free, rollout_logprobs, replay, level)
    trainer, records, tap = train(make_model, tokenizer, tmp_path, combination, learning_rate=LEARNING_RATE)
    second = records[1]  # one update after the rollout: the ratio has moved
    assert (second["out"].seq_log_ratio[second["out"].lengths > 0] != 0).all()
    for step, record in enumerate(records):
        assert record["level"] == level
        logps = record["per_token_logps"].double().requires_grad_(True)
        expected = reference_objective(
            level,
            logps,
            record["old_per_token_logps"].double(),
            record["advantages"].double(),
            record["mask"].double(),
            record["epsilon_low"],
            record["epsilon_high"],
            seq_weights=record["sequence_weights"],
            tok_weights=record["token_weights"],
            ref=record["ref_per_token_logps"],
            beta=record["beta"],
            kl_correction=record["kl_importance_correction"],
            bound=record["log_ratio_bound"],
        )
        (expected_grad,) = torch.autograd.grad(expected / trainer.args.gradient_accumulation_steps, logps)
        torch.testing.assert_close(record["grad"].double(), expected_grad, rtol=1e-5, atol=1e-8)
        if step == 1:  # the comparison covers both sides of the clip: sequences with and without a gradient
            carries = expected_grad.abs().sum(-1) > 0
            in_loss = (record["mask"].sum(-1) > 0) & (record["advantages"].reshape(len(carries), -1) != 0).any(-1)
            assert carries.any() and (in_loss & ~carries).any(), carries
    differing = check_routing(tap, replay, tokenizer.eos_token_id)
    if replay == "no_replay":  # the update moved the routing: a forward that routes on its own is noticed
        assert differing > 0


@pytest.mark.parametrize(
    "padding_free, rollout_logprobs, replay, level",
    [c for c in ACCEPTED if c.values[2] == "R3" and c.values[3] == "sequence"],
)
def test_rollout_routing_replay_holds_when_generation_routed_otherwise(
    make_model, tokenizer, tmp_path, padding_free, rollout_logprobs, replay, level
):
    """Generation with perturbed routers, so that its experts are not those the trainer's routers pick for the same
    rows (in float32 they would coincide before the first update, and (c) could not tell a replayed pi_old pass from
    one routing on its own): every training forward still uses generation's experts."""
    combination = (padding_free, rollout_logprobs, replay, level)
    trainer, records, tap = train(
        make_model,
        tokenizer,
        tmp_path,
        combination,
        learning_rate=LEARNING_RATE,
        perturb_generation=True,
    )
    check_routing(tap, replay, tokenizer.eos_token_id)
    # the trainer's routers before any update (the same model, built again) route the rollout otherwise
    initial = make_model("qwen3_moe")
    natural = RoutingTap(initial)
    differing = 0
    for tokens, candidates in tap.generation_routing(tokenizer.eos_token_id).items():
        with torch.no_grad():
            initial(input_ids=torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long))
        own = sorted_experts(natural.forwards[-1]["experts"][0, :-1])
        differing += sum(not torch.equal(own, sorted_experts(c)) for c in candidates)
    natural.remove()
    assert differing > 0


def check_routing(tap, replay, eos_token_id):
    """(c): R3, every training forward used generation's experts wherever generation fed the position; R2, every
    policy pass used the experts its rows had in the pi_old pass. Returns the number of training rows whose experts
    differ from generation's somewhere (the callers show that the comparison can tell)."""
    generated = tap.generation_routing(eos_token_id)
    assert tap.forwards and generated
    pi_old_rows = {}  # R2: token sequence -> experts of the pi_old pass, (L, layers, k) at the real tokens
    if replay == "R2":
        for forward in tap.forwards:
            if not forward["grad"]:
                for tokens, experts in real_rows(forward):
                    pi_old_rows.setdefault(tokens, []).append(experts)
    differing = 0
    for number, forward in enumerate(tap.forwards):
        for tokens, experts in real_rows(forward):
            fed = experts[:-1]  # the last token was sampled, never fed: generation did not route it
            candidates = generated.get(tokens)
            assert candidates, f"training forward {number} has a row no generate() call produced: {tokens}"
            matches = any(torch.equal(sorted_experts(fed), sorted_experts(c)) for c in candidates)
            differing += not matches
            if replay == "R3":
                assert matches, (
                    f"rollout_routing_replay: training forward {number} ({'policy' if forward['grad'] else 'no-grad'}"
                    f" pass, {'packed' if forward['packed'] else 'padded'}) used experts other than generation's "
                    f"at {first_difference(fed, candidates)} of row {tokens}"
                )
            if replay == "R2" and forward["grad"]:
                pi_old = pi_old_rows.get(tokens, [])
                assert any(torch.equal(sorted_experts(experts), sorted_experts(e)) for e in pi_old), (
                    f"routing_replay: policy forward {number} used experts other than the pi_old pass's for {tokens}"
                )
    return differing


def real_rows(forward):
    """(token tuple, experts (n, layers, k)) of each row's real tokens, in order."""
    for ids, mask, experts in zip(forward["input_ids"], forward["attention_mask"].bool(), forward["experts"]):
        yield tuple(ids[mask].tolist()), experts[mask]


def sorted_experts(experts):
    return experts.long().sort(-1).values


def first_difference(used, candidates):
    expected = candidates[0]
    position, layer = (sorted_experts(used) != sorted_experts(expected)).any(-1).nonzero()[0].tolist()
    used, expected = used[position, layer].tolist(), expected[position, layer].tolist()
    return f"position {position}, layer {layer} ({used} != {expected})"
