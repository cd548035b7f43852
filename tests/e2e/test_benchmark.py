"""scripts/benchmark.py: the quickest mode runs end to end, and its two objectives compute the same thing.

No timing is asserted: the machine is shared and the numbers are only what they are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import reference_objective

from gspo_benchmarks import trainer_ab as bench
from trl_gspo.objective import compute_policy_objective

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmark.py"


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_ratio(entry, where):
    for key in ("median", "pair_min", "pair_max"):
        assert _finite_positive(entry[key]), f"{where}.{key} = {entry[key]!r}"


@pytest.mark.slow
def test_quick_run_writes_expected_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| metric |" in proc.stdout  # the markdown table is printed
    report = json.loads(out.read_text())

    assert {"command", "machine", "settings", "configs", "not_available", "elapsed_s"} <= report.keys()
    assert report["settings"]["epsilon"] == 3e-4 and report["settings"]["epsilon_high"] == 4e-4
    assert report["settings"]["steps_per_generation"] == 4
    assert report["not_available"] == {}  # rollout log-probs: --rollout-logprobs
    assert report["settings"]["workload"] == "equal" and report["settings"]["baseline"] == "trl"
    (config,) = report["configs"]
    assert {"objective", "in_process", "lockstep", "trials", "trainer_summary", "goals"} <= config.keys()

    _check_ratio(config["objective"]["ratio"], "objective.ratio")
    _check_ratio(config["in_process"]["micro_step"]["ratio"], "in_process.micro_step.ratio")
    _check_ratio(config["in_process"]["loss_tail"]["ratio"], "in_process.loss_tail.ratio")
    lockstep = config["lockstep"]
    assert lockstep["runs"] == 2 and sorted(lockstep["first"]) == ["gspo", "trl"]
    for key in ("wall_all", "wall_gen", "wall_train", "cpu_all"):
        _check_ratio(lockstep[key]["ratio"], f"lockstep.{key}.ratio")
    summary = config["trainer_summary"]
    for metric in ("step_s_all", "step_s_gen", "step_s_train", "compute_loss_s", "peak_rss_mib", "tokens_per_s"):
        _check_ratio(summary[metric]["ratio"], f"trainer_summary.{metric}.ratio")
    assert {trial["trainer"] for trial in config["trials"]} == {"gspo", "trl"}
    for trial in config["trials"]:
        # EOS is suppressed: every completion reaches max_completion_length (16 in --quick)
        assert trial["completion_mean_length"] == 16
        assert _finite_positive(trial["peak_rss_mib"])
    # both trainers trained the same model on the same data with the same objective
    losses = config["in_process"]["micro_step"]["loss"]
    assert losses["gspo"] == pytest.approx(losses["trl"], abs=1e-5)
    assert config["in_process"]["loss_tail"]["max_abs_grad_diff"] < 1e-6
    assert {"step_time_ratio", "peak_memory_ratio", "objective_ratio"} <= config["goals"].keys()
    for goal in config["goals"].values():
        assert _finite_positive(goal["value"]) and isinstance(goal["met"], bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(8, 32), (5, 17)])
def test_trl_way_objective_matches_compute_policy_objective(seed, shape):
    batch, length = shape
    logps, old, advantages, mask = bench.make_objective_inputs(batch, length, seed=seed)
    # push some sequences out of the clip band on both sides, so the clipped branch is exercised too
    logps = (logps.detach() + 0.002 * torch.linspace(-1, 1, batch).unsqueeze(1)).requires_grad_(True)

    trl_loss, trl_stats = bench.trl_way_sequence_objective(logps, old, advantages, mask, 3e-4, 4e-4)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)
    out = compute_policy_objective("sequence", logps, old, advantages, mask, 3e-4, 4e-4)
    (gspo_grad,) = torch.autograd.grad(out.loss, logps)

    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gspo_grad, trl_grad, rtol=1e-5, atol=1e-8)
    assert gspo_grad.abs().sum() > 0
    # masked tokens and the all-masked row get no gradient on either side
    assert torch.all(gspo_grad[mask == 0] == 0) and torch.all(trl_grad[mask == 0] == 0)

    # the clip statistics agree per sequence (TRL counts the empty row; GSPO's flags leave it out). Under
    # "sequence" GSPO's flags are (B, 1), one per sequence, like TRL's
    assert out.low_clipped.shape == out.high_clipped.shape == (batch, 1)
    non_empty = mask.sum(-1) > 0
    gspo_low = out.low_clipped.squeeze(1)
    gspo_high = out.high_clipped.squeeze(1)
    assert torch.equal(gspo_low, trl_stats["low_per_seq"].bool() & non_empty)
    assert torch.equal(gspo_high, trl_stats["high_per_seq"].bool() & non_empty)
    assert (gspo_low | gspo_high).any(), "inputs should trigger the clip on some sequence"


@pytest.mark.parametrize("name", sorted(bench.OBJECTIVES))
def test_both_benchmarked_objectives_are_the_papers(name):
    """Each side the benchmark times computes GSPO's loss and gradient: both against an independent float64 loop
    over the paper's formula (tests/helpers.py), with sequences pushed out of the clip band on both sides."""
    batch, length = 6, 11
    logps, old, advantages, mask = bench.make_objective_inputs(batch, length, seed=3)
    logps = (logps.detach() + 0.002 * torch.linspace(-1, 1, batch).unsqueeze(1)).requires_grad_(True)
    loss, _ = bench.OBJECTIVES[name](logps, old, advantages, mask, 3e-4, 4e-4)
    (grad,) = torch.autograd.grad(loss, logps)
    logps64 = logps.detach().double().requires_grad_(True)
    expected = reference_objective("sequence", logps64, old.double(), advantages.double(), mask, 3e-4, 4e-4)
    (expected_grad,) = torch.autograd.grad(expected, logps64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert expected_grad.abs().sum() > 0


def test_alternating_order_and_ratio_summary():
    assert bench.alternating_order(3) == ["gspo", "trl", "trl", "gspo", "gspo", "trl"]
    trials = [
        {"trainer": "gspo", "step_s_all": 1.0, "completion_mean_length": 8.0},
        {"trainer": "trl", "step_s_all": 2.0, "completion_mean_length": 8.0},
        {"trainer": "trl", "step_s_all": 4.0, "completion_mean_length": 8.0},
        {"trainer": "gspo", "step_s_all": 2.0, "completion_mean_length": 8.0},
    ]
    summary = bench.summarize_trials(trials)
    ratio = summary["step_s_all"]["ratio"]
    assert ratio["median"] == pytest.approx(1.5 / 3.0)
    assert (ratio["pair_min"], ratio["pair_max"]) == (0.5, 0.5)


def test_baton_makes_two_threads_take_turns():
    import threading

    baton = bench._Baton(["a", "b"] * 3)
    log = []

    def worker(name, steps):
        for _ in range(steps):
            baton.acquire(name)
            log.append(name)
        baton.finish(name)

    threads = [threading.Thread(target=worker, args=(name, 3)) for name in ("b", "a")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert log == ["a", "b", "a", "b", "a", "b"]


def test_pool_lockstep_pairs_steps_after_warmup():
    steps = 8
    run = {
        "first": "gspo",
        "step_s": {"gspo": [2.0] * steps, "trl": [1.0] * steps},
        "step_cpu_s": {"gspo": [1.0] * steps, "trl": [1.0] * steps},
    }
    pooled = bench.pool_lockstep([run, {**run, "first": "trl"}])
    assert pooled["wall_all"]["ratio"]["median"] == 2.0
    assert pooled["wall_all"]["ratio"]["n"] == 2 * (steps - bench.STEPS_PER_GENERATION)
    assert pooled["wall_gen"]["ratio"]["n"] == 2  # steps 4 of each run
    assert pooled["cpu_train"]["ratio"]["median"] == 1.0


def test_ragged_rollouts_are_identical_for_both_trainers_and_ragged(tokenizer):
    from gspo_benchmarks.ragged import COMPLETION_LENGTHS, PROMPT_LENGTHS, ragged_rollout_func

    prompts = [p for p in ("a", "b", "c", "d") for _ in range(8)]  # 4 groups of 8
    first, second = ragged_rollout_func(tokenizer, 512, seed=0), ragged_rollout_func(tokenizer, 512, seed=0)
    out, again = first(prompts, None), second(prompts, None)
    assert out == again  # identical work on both sides
    assert first(prompts, None) != out  # the next rollout differs
    completion_lengths = [len(c) for c in out["completion_ids"]]
    assert all(c[-1] == tokenizer.eos_token_id for c in out["completion_ids"])
    assert COMPLETION_LENGTHS["low"] <= min(completion_lengths) and max(completion_lengths) <= 512
    assert max(completion_lengths) > 2 * min(completion_lengths)  # ragged
    for group in range(4):
        ids = out["prompt_ids"][8 * group : 8 * group + 8]
        assert all(p == ids[0] for p in ids) and PROMPT_LENGTHS["low"] <= len(ids[0]) <= PROMPT_LENGTHS["high"]
    assert [len(lp) for lp in out["logprobs"]] == completion_lengths


def test_padding_share_counts_slots():
    from gspo_benchmarks.ragged import padding_share

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]])  # lengths 3, 2, 1; width 4
    assert padding_share([mask], packed=False) == {"real_tokens": 6, "processed_tokens": 12, "padded_share": 0.5}
    # rows of at most 4 tokens, first fit decreasing: [3, 1] and [2] -> 2 rows of width 4
    packed = padding_share([mask], packed=True)
    assert packed["processed_tokens"] == 8 and packed["padded_share"] == pytest.approx(0.25)


def test_eos_logit_bias_sets_the_mean_completion_length(tokenizer, make_model):
    """b = log((V - 1) / (m - 1)) gives EOS probability 1 / m under uniform logits; the biased head keeps its weight
    (tied to the embeddings), adds b to the EOS logit only, and does not train the bias."""
    from gspo_benchmarks.ragged_moe import add_eos_logit_bias, eos_logit_bias

    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    bias = eos_logit_bias(vocab, 64)
    logits = torch.zeros(vocab, dtype=torch.float64)
    logits[eos] = bias
    assert torch.softmax(logits, -1)[eos].item() == pytest.approx(1 / 64, rel=1e-12)

    model = make_model("qwen3_moe")
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        add_eos_logit_bias(model, eos, bias)
        after = model(input_ids=ids).logits
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert not model.get_output_embeddings().bias.requires_grad
    expected = before.clone()
    expected[..., eos] += bias
    torch.testing.assert_close(after, expected)


@pytest.mark.slow
def test_ragged_moe_lockstep_gives_both_trainers_the_same_ragged_rollouts():
    """--workload ragged-moe with padding-free + rollout log-probs + R3: both trainers generate with the EOS-biased MoE
    model; in lockstep their rollouts are drawn with the same random numbers, so with the same initial weights the
    first rollout is the same on both sides; the completions are ragged, and the GSPO side's packed passes carry less
    padding than TRL's."""
    spec = dict(
        shape="tiny",
        model_type="qwen3_moe",
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        completion_length=48,
        num_generations=4,
        batch_size=4,
        steps=bench.STEPS_PER_GENERATION,  # one rollout
        bf16=False,
        device="cpu",
        seed=0,
        threads=1,
        suppress_eos=True,  # does not apply: EOS ends this workload's completions
        workload="ragged-moe",
        padding_free=True,  # GSPO's composed passes
        rollout_logprobs=True,
        rollout_routing_replay=True,
        mode="lockstep",
        first="trl",
    )
    result = bench.run_lockstep(spec)
    assert all(len(result["step_s"][name]) == spec["steps"] for name in bench.TRAINERS)
    lengths = result["completion_mean_length"]
    assert lengths["gspo"] == lengths["trl"] and 1 < lengths["trl"] < spec["completion_length"]
    share = {name: result["padded_share"][name]["padded_share"] for name in bench.TRAINERS}
    assert share["trl"] > 0.2 and share["gspo"] < share["trl"]
