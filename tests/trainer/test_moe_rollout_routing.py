"""Rollout routing replay (R3): generate()'s routing recorded, laid out as TRL's rows, replayed in training.

The record's layout functions against naive loops (also in vLLM's form, prompt_start > 0); the record of a real
generate() call against a full forward of each sequence alone (float32, prefill and decoding positions, three
router families); the trainer's pi_old and policy forwards, seen through hooks of the test's own, using exactly the
rollout's experts through TRL's shuffle and split (GSPOTrainer's per-micro-batch pi_old); and the refusals.
"""

import pytest
import torch
from conftest import completion_length_reward, prompt_dataset, small_config
from helpers import perturbed_routers
from test_moe import tiny_moe

from trl_gspo import GSPOConfig, GSPOTrainer
from trl_gspo.moe import RouterHooks, find_routers
from trl_gspo.packing import PaddedLayout
from trl_gspo.rollout_routing import (
    ROLLOUT_ROUTING_KEY,
    ROLLOUT_ROUTING_KNOWN_KEY,
    RolloutRouting,
    records_from_generation,
    rollout_routing_rows,
)

R3_FAMILIES = [
    "qwen3_moe",
    "mixtral",
    "minimax_m2",
]  # softmax + renormalise, softmax always renormalised, sigmoid + bias


# ---- the record's layout ------------------------------------------------------------------------------------------


def random_records(prompt_lengths, completion_lengths, prompt_starts, layers=3, top_k=2, experts=8):
    generator = torch.Generator().manual_seed(0)
    return [
        RolloutRouting(
            torch.randint(experts, (p - s + c - 1, layers, top_k), generator=generator, dtype=torch.uint8), p, c, s
        )
        for p, c, s in zip(prompt_lengths, completion_lengths, prompt_starts, strict=True)
    ]


def test_rollout_routing_rows_match_a_position_loop():
    """vLLM's form (prompt_start > 0, down to the C-row record of prompt_start = P - 1) and transformers' (0)."""
    prompt_lengths, completion_lengths, prompt_starts = [3, 5, 1, 4], [4, 1, 6, 2], [0, 2, 0, 3]
    records = random_records(prompt_lengths, completion_lengths, prompt_starts)
    assert records[3].experts.size(0) == completion_lengths[3]  # prompt_start = P - 1: one row per completion token
    experts, known = rollout_routing_rows(records, prompt_width=6, completion_width=7)
    assert experts.shape == (4, 13, 3, 2) and known.shape == (4, 13)
    for row, record in enumerate(records):
        p, c, s = record.prompt_length, record.completion_length, record.prompt_start
        for position in range(13):
            # TRL's row: prompt token i at 6 - p + i, completion token t at 6 + t
            unpadded = position - (6 - p)
            routed = s <= unpadded < p + c - 1
            assert known[row, position].item() == routed
            if routed:
                assert torch.equal(experts[row, position], record.experts[unpadded - s])
    with pytest.raises(
        ValueError, match="row 1 has a prompt of 5 and a completion of 1 tokens; the rows hold 4 and 7"
    ):
        rollout_routing_rows(records, prompt_width=4, completion_width=7)


def test_records_from_generation_cut_each_row_from_the_left_padded_generation():
    generator = torch.Generator().manual_seed(1)
    routing = torch.randint(4, (3, 6 + 5 - 1, 2, 2), generator=generator)  # prompts padded to 6, 5 decoding steps
    records = records_from_generation(routing, [6, 2, 4], [5, 1, 3], padded_prompt_length=6)
    for row, record in enumerate(records):
        pad = 6 - record.prompt_length
        for j in range(record.experts.size(0)):
            assert torch.equal(record.experts[j], routing[row, pad + j])
        assert record.prompt_start == 0
    with pytest.raises(ValueError, match="row 0 .* needs positions 0 .. 10 of a generation that fed 10 positions"):
        records_from_generation(routing, [6, 2, 4], [6, 1, 3], padded_prompt_length=6)


def test_a_record_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"expected \(5, layers, top_k\).*the last sampled token is never fed"):
        RolloutRouting(torch.zeros(6, 2, 2, dtype=torch.uint8), prompt_length=3, completion_length=3)
    with pytest.raises(ValueError, match="prompt_start=4 must lie in"):
        RolloutRouting(torch.zeros(2, 2, 2, dtype=torch.uint8), prompt_length=3, completion_length=4, prompt_start=4)


# ---- the record of a real generate() call --------------------------------------------------------------------------


def r3_trainer(tmp_path, model, tokenizer, trainer_class=GSPOTrainer, **overrides):
    overrides = {"steps_per_generation": 4, "rollout_routing_replay": True, **overrides}
    return trainer_class(
        model,
        completion_length_reward,
        args=small_config(tmp_path, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )


def natural_routing(model, token_ids):
    """The experts each router picks in one forward of one unpadded sequence, (positions, layers, k), sorted."""
    routers = find_routers(model)
    seen = [None] * len(routers)
    taps = [
        router.register_forward_hook(lambda module, args, out, i=i: seen.__setitem__(i, out[2]))
        for i, router in enumerate(routers)
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor([token_ids]))
    for tap in taps:
        tap.remove()
    return torch.stack(seen, dim=1).sort(-1).values


@pytest.mark.parametrize("name", R3_FAMILIES)
def test_recorded_generation_routing_equals_a_full_forward_of_each_sequence(tmp_path, tokenizer, name):
    """float32: the experts recorded in prefill (prompt positions) and cached decoding (completion positions) are
    those a full forward of the sequence alone, without padding, picks at every fed position."""
    model = tiny_moe(tokenizer, name)
    trainer = r3_trainer(tmp_path, model, tokenizer, max_completion_length=12)
    prompts = ["1+1=", "123+456=789", "42=", "7*8=5"]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    torch.manual_seed(0)
    model.eval()
    completion_ids, _ = trainer._generate_single_turn(prompt_ids, None, {}, 1)
    records = trainer.routing._rollout_records
    assert len({len(c) for c in completion_ids}) > 1 and max(len(c) for c in completion_ids) > 3
    decoded_positions = 0
    for prompt, completion, record in zip(prompt_ids, completion_ids, records, strict=True):
        assert (record.prompt_length, record.completion_length, record.prompt_start) == (
            len(prompt),
            len(completion),
            0,
        )
        fed = prompt + completion[:-1]  # the last sampled token is never fed
        expected = natural_routing(model, fed)
        assert torch.equal(record.experts.long().sort(-1).values, expected)
        decoded_positions += len(completion) - 1
    assert decoded_positions > 10


# ---- the trainer ------------------------------------------------------------------------------------------------


def spied(trainer_class):
    """`trainer_class` generating with perturbed routers, keeping each rollout's records by token sequence."""

    class Spied(trainer_class):
        def __init__(self, *args, **kwargs):
            self.rollout_records, self.generating = {}, False  # token sequence -> its records; inside generate()?
            super().__init__(*args, **kwargs)

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            self.generating = True
            try:
                with perturbed_routers(self.model):
                    completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            finally:
                self.generating = False
            for prompt, completion, record in zip(
                prompt_ids, completion_ids, self.routing._rollout_records, strict=True
            ):
                self.rollout_records.setdefault(tuple(prompt + completion), []).append(record)
            return completion_ids, logprobs

    return Spied


def training_forwards(trainer):
    """Every forward of the policy model outside generation: its input rows and the experts each router handed to
    its experts (hooks registered after the trainer's, so they see the replayed routing)."""
    model = trainer.model
    forwards = []

    def start(module, args, kwargs):
        if not trainer.generating:
            forwards.append(
                {
                    "input_ids": kwargs["input_ids"],
                    "attention_mask": kwargs["attention_mask"],
                    "policy": torch.is_grad_enabled(),  # the pi_old pass runs without gradients
                    "used": {},
                    "natural": {},
                }
            )

    def router_hook(layer):
        def hook(module, args, out):
            if not trainer.generating:
                forwards[-1]["used"][layer] = out[2].detach().clone()
                forwards[-1]["natural"][layer] = out[0].detach().topk(out[2].size(-1), dim=-1).indices

        return hook

    model.register_forward_pre_hook(start, with_kwargs=True)
    for layer, router in enumerate(find_routers(model)):
        router.register_forward_hook(router_hook(layer))
    return forwards


def rows_using_the_rollout_experts(trainer, forwards) -> int:
    """Assert that every row of every training forward handed each router's experts the ones generation chose for
    that row (matched by token content) at every position generation routed; returns the number of rows checked."""
    checked = 0
    for forward in forwards:
        used = torch.stack([forward["used"][layer] for layer in sorted(forward["used"])], dim=1)
        used = used.view(*forward["input_ids"].shape, *used.shape[1:])  # (B, L, layers, k)
        for row, (ids, mask) in enumerate(zip(forward["input_ids"], forward["attention_mask"].bool(), strict=True)):
            start = int(mask.int().argmax())  # the row's first real token (left-padded prompt)
            candidates = trainer.rollout_records[tuple(ids[mask].tolist())]
            assert any(
                torch.equal(used[row, start : start + record.experts.size(0)], record.experts.long())
                for record in candidates
            )
            checked += 1
    return checked


def test_training_forwards_use_the_rollout_experts_through_shuffle_and_split(tmp_path, tokenizer):
    """steps_per_generation 4 > gradient accumulation 2, lr > 0: every pi_old and policy forward of the rollout
    hands each router's experts the ones generation chose, row by row (matched by token content, so a wrong row
    after the shuffle would show), at every position generation routed. GSPOTrainer computes pi_old per
    micro-batch."""
    trainer = r3_trainer(
        tmp_path,
        tiny_moe(tokenizer, "qwen3_moe"),
        tokenizer,
        trainer_class=spied(GSPOTrainer),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    forwards = training_forwards(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    # one rollout of 16 rows: 16 pi_old rows (4 micro-batches) and 4 policy passes of 4 rows
    assert (
        rows_using_the_rollout_experts(trainer, forwards) == 32
        and [f["policy"] for f in forwards] == [False] * 4 + [True] * 4
    )
    # the perturbation made the trainer's own routing differ from the rollout's: replay had something to undo
    assert logs[0]["moe/rollout_routing_mismatch/token_layer"] > 0.05
    assert all(0 < entry["moe/routing_drift/token_layer"] for entry in logs[1:])  # the router moved; replay held


def test_on_policy_r3_replays_the_rollout_experts_in_every_policy_forward(tmp_path, tokenizer):
    """Every step on-policy (no pi_old pass): R3 needs none, the policy forwards replay the rollout's experts."""
    trainer = r3_trainer(
        tmp_path,
        tiny_moe(tokenizer, "qwen3_moe"),
        tokenizer,
        trainer_class=spied(GSPOTrainer),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        steps_per_generation=2,
        max_steps=2,
    )
    forwards = training_forwards(trainer)
    trainer.train()
    assert [f["policy"] for f in forwards] == [True] * 4  # two rollouts of 8 rows, 4 micro-steps, no pi_old pass
    assert rows_using_the_rollout_experts(trainer, forwards) == 16


def test_policy_pass_routes_itself_where_generation_routed_nothing(tmp_path, tokenizer):
    """The last completion token (never fed in generation) and padding: the policy pass uses the router's own
    choice there (they feed no scored log-prob), the rollout's experts everywhere else."""
    trainer = r3_trainer(tmp_path, tiny_moe(tokenizer, "mixtral"), tokenizer, trainer_class=spied(GSPOTrainer))
    policy_inputs = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        policy_inputs.append(inputs)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    forwards = training_forwards(trainer)
    trainer.train()
    policy_forwards = [f for f in forwards if f["policy"]]
    for inputs, forward in zip(policy_inputs, policy_forwards, strict=True):
        known = inputs[ROLLOUT_ROUTING_KNOWN_KEY]
        assert (~known).any() and known.any()
        layers = sorted(forward["used"])
        used = torch.stack([forward["used"][layer].view(*known.shape, -1) for layer in layers], 2)
        # Mixtral's router: softmax of its logits, then top-k; its own choice is the top-k of its logits
        natural = torch.stack([forward["natural"][layer].view(*known.shape, -1) for layer in layers], 2)
        expected = torch.where(known[:, :, None, None], inputs[ROLLOUT_ROUTING_KEY].long(), natural)
        assert torch.equal(used.sort(-1).values, expected.sort(-1).values)


def test_routing_where_generation_routed_nothing_changes_no_scored_log_prob(tokenizer):
    """Why R3 needs no pi_old routing there: forcing two different expert choices at the positions generation did
    not route (the last completion token, padding) leaves every completion log-prob bit for bit the same."""
    model = tiny_moe(tokenizer, "qwen3_moe")
    batch = tokenizer(["1+1=2", "123+456=579", "42=4"], return_tensors="pt", padding=True)
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    routers = find_routers(model)
    hooks = RouterHooks(routers)
    shape = (*input_ids.shape, hooks.num_layers, hooks.top_k)
    routed = attention_mask.bool().clone()
    last = attention_mask.size(1) - 1 - attention_mask.flip(1).int().argmax(1)  # each row's last real token
    routed[torch.arange(len(last)), last] = False  # the last completion token: never fed in generation
    chosen = torch.randint(routers[0].num_experts, shape, generator=torch.Generator().manual_seed(0))
    logps = []
    for seed in (1, 2):
        elsewhere = torch.randperm(routers[0].num_experts, generator=torch.Generator().manual_seed(seed))[
            : hooks.top_k
        ]
        forced = torch.where(routed[:, :, None, None], chosen, elsewhere.expand(shape))
        layout = PaddedLayout(attention_mask)
        hooks.start_policy_pass(layout.to_model_order(forced))
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hooks.clear()
        logps.append(torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1))
    scored = attention_mask[:, 1:].bool()  # the log-prob of every real token after the first
    assert torch.equal(logps[0][scored], logps[1][scored])


# ---- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(use_vllm=True), "cannot be combined with use_vllm=True.*Model Runner V2, which needs Triton"),
        (dict(use_transformers_continuous_batching=True), "use_transformers_continuous_batching=True"),
    ],
    ids=["vllm", "continuous_batching"],
)
def test_rollout_routing_replay_refuses_what_it_does_not_record_at_config_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=f"GSPOConfig.rollout_routing_replay=True.*{message}"):
        GSPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, rollout_routing_replay=True, **overrides)


def test_rollout_routing_replay_refuses_untested_routers_and_other_generation_at_construction(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="model_type='phimoe'.*PhimoeTopKRouter.*rollout_routing_replay=False"):
        r3_trainer(tmp_path, tiny_moe(tokenizer, "phimoe"), tokenizer)
    with pytest.raises(ValueError, match="model_type='qwen2'.*Set rollout_routing_replay=False"):
        r3_trainer(tmp_path, tiny_moe(tokenizer, "qwen2"), tokenizer)

    def rollout_func(prompts, trainer):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"with \['rollout_func'\] the completions are produced otherwise"):
        GSPOTrainer(
            tiny_moe(tokenizer, "qwen3_moe"),
            completion_length_reward,
            args=small_config(tmp_path, steps_per_generation=4, rollout_routing_replay=True),
            train_dataset=prompt_dataset(),
            processing_class=tokenizer,
            rollout_func=rollout_func,
        )


# ---- the measurement (docs/MOE.md) ------------------------------------------------------------------------------


def test_measurement_finds_no_mismatch_when_generation_runs_in_float32():
    """The measurement's pipeline is aligned: with float32 generation the rollout's experts and log-probs are the
    training forward's (a row or position off would show as disagreement); bf16 generation shows some."""
    from gspo_benchmarks.rollout_routing import measure

    same = measure("std 0.5", "float32", batch=8, max_new_tokens=8)
    for name in ("no replay", "R3"):
        assert same[name]["routing_disagreement/token_layer"] == 0.0
        assert same[name]["token_abs_log_ratio_mean"] < 1e-6
    bf16 = measure("std 0.5", "bf16 autocast", batch=8, max_new_tokens=8)
    assert bf16["no replay"]["token_abs_log_ratio_mean"] > 1e-4


def test_a_generation_that_is_not_one_prefill_then_one_position_per_step_is_refused(tmp_path, tokenizer):
    """Beam search routes num_beams rows per prompt: the record would be misread, so generation raises."""
    trainer = r3_trainer(tmp_path, tiny_moe(tokenizer, "qwen3_moe"), tokenizer, generation_kwargs={"num_beams": 2})
    prompt_ids = [tokenizer(p)["input_ids"] for p in ["1+1=", "123+456="]]
    with pytest.raises(RuntimeError, match="routed 16 positions per row in its first forward.*beam search"):
        trainer._generate_single_turn(prompt_ids, None, {}, 1)
