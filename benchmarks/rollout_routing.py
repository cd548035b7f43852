"""What rollout routing replay (R3) buys: rollout vs trainer routing and log-probs, with and without R3.

    python scripts/measure_rollout_routing.py [--batch 64] [--max-new-tokens 64] [--json out.json]

A tiny random Qwen3-MoE (hidden 128, 4 layers, 8 experts, top-2, char vocabulary) samples completions with
transformers `generate()` (temperature 1, KV cache), once in float32 and once under bf16 autocast (the rollout
engine's precision; the minimal knob for this measurement, not a trainer setting), recording the experts of every
fed position with the trainer's own pieces (`RouterHooks`, `records_from_generation`, `rollout_routing_rows`) and the
sampled tokens' log-probs (`SampledTokenLogProbs`). The float32 training forward of the same rows (TRL's call:
padded rows, no position ids) then runs without replay and with R3 (the rollout's experts where it routed, the
trainer's own elsewhere). Reported per setting, over completion tokens:

- routing disagreement: share of (token, layer) pairs, and of tokens in any layer, whose top-k set in the training
  forward differs from the rollout's (with R3: what the router would have picked; the forward uses the rollout's);
- per-token mismatch: mean |log pi_train - log pi_rollout|;
- sequence mismatch: |log s_i| = |mean_t (log pi_train - log pi_rollout)|, the log-ratio the objective sees at the
  rollout's first optimizer step if the rollout's log-probs were pi_old, its mean and max, and the share of
  sequences outside GSPO's clip band [log(1 - 3e-4), log(1 + 4e-4)].

Two router scales: transformers' initialisation (weights ~ N(0, 0.02): near-tied router logits, the worst case for
flips) and weights ~ N(0, 0.5) (confident routers, closer to a trained model's).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
from trl_gspo.moe import RouterHooks, drift_fractions, find_routers, routing_drift_counts
from trl_gspo.packing import PaddedLayout
from trl_gspo.rollout_logprobs import SampledTokenLogProbs, mismatch_log_ratios, recording_generate, rollout_mismatch
from trl_gspo.rollout_routing import records_from_generation, rollout_routing_rows

EPSILON_LOW, EPSILON_HIGH = 3e-4, 4e-4
ROUTER_SCALES = {"init (std 0.02)": None, "std 0.5": 0.5}
GENERATION = {"float32": None, "bf16 autocast": torch.bfloat16}


def build_model(tokenizer, router_std: float | None):
    model = build_tiny_causal_lm(tokenizer, model_type="qwen3_moe", hidden_size=128, num_layers=4, num_experts=8)
    if router_std is not None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for router in find_routers(model):
                router.weight.copy_(router_std * torch.randn(router.weight.shape, generator=generator))
    return model.eval()


def rollout(model, tokenizer, hooks, prompts, max_new_tokens, dtype, seed):
    """Sample completions (generation under `dtype` autocast, or float32), as TRL keeps them (up to the first EOS),
    with the rollout's routing in TRL's row layout and the sampled tokens' log-probs."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    recorder = SampledTokenLogProbs(temperature=1.0)
    torch.manual_seed(seed)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), autocast, hooks.recording(), recording_generate(model, recorder):
        output = model.generate(
            **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens
        )
    routing, prefill = hooks.recorded_steps(len(prompts))
    padded = batch["input_ids"].size(1)
    assert prefill == padded
    completions = []
    for row in output[:, padded:].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        completions.append(row[:end])
    prompt_lengths = batch["attention_mask"].sum(1).tolist()
    records = records_from_generation(routing, prompt_lengths, [len(c) for c in completions], padded)
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    logprobs = torch.zeros(len(completions), width)
    for row, values in enumerate(recorder.per_sequence(completions)):
        logprobs[row, : len(values)] = torch.tensor(values)
    rollout_experts, known = rollout_routing_rows(records, padded, width)
    return {
        "input_ids": torch.cat([batch["input_ids"], completion_ids], 1),
        "attention_mask": torch.cat([batch["attention_mask"], completion_mask], 1),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "rollout_logprobs": logprobs,
        "rollout_experts": rollout_experts,
        "known": known,
    }


def training_pass(model, hooks, rows, replay: bool):
    """The float32 training forward of the rollout's rows; with replay, the rollout's experts where it routed."""
    layout = PaddedLayout(rows["attention_mask"])  # the model sees the padded rows: model order is row-major
    args = (layout.to_model_order(rows["rollout_experts"]), layout.to_model_order(rows["known"])) if replay else ()
    with torch.no_grad(), hooks.recording(*args):
        logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    natural = layout.from_model_order(hooks.recorded())
    width = rows["completion_ids"].size(1)
    logps = torch.log_softmax(logits[:, -width - 1 : -1].float(), -1)
    return logps.gather(-1, rows["completion_ids"][..., None]).squeeze(-1), natural


def measure(scale: str, generation: str, batch: int, max_new_tokens: int, seed: int = 0) -> dict:
    tokenizer = build_char_tokenizer()
    model = build_model(tokenizer, ROUTER_SCALES[scale])
    hooks = RouterHooks(find_routers(model))
    prompts = [f"{(37 * i) % 1000}+{i % 11}=" for i in range(batch)]
    rows = rollout(model, tokenizer, hooks, prompts, max_new_tokens, GENERATION[generation], seed)
    mask = rows["completion_mask"]
    width = mask.size(1)
    results = {}
    for replay in (False, True):
        logps, natural = training_pass(model, hooks, rows, replay)
        counts = routing_drift_counts(
            rows["rollout_experts"][:, -width:], natural[:, -width:], mask.bool() & rows["known"][:, -width:]
        )
        token_gap = ((logps - rows["rollout_logprobs"]).abs() * mask).sum() / mask.sum()
        sequence = rollout_mismatch(
            mismatch_log_ratios(logps, rows["rollout_logprobs"], mask), EPSILON_LOW, EPSILON_HIGH
        )
        results["R3" if replay else "no replay"] = {
            **drift_fractions(counts, "routing_disagreement"),
            "token_abs_log_ratio_mean": token_gap.item(),
            **sequence,
        }
    results["completion_tokens"] = int(mask.sum())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = {
        scale: {generation: measure(scale, generation, args.batch, args.max_new_tokens) for generation in GENERATION}
        for scale in ROUTER_SCALES
    }
    print(
        "| routers | generation | training forward | routing disagreement token-layer / token-any-layer | "
        "mean abs token log-ratio | mean abs seq log-ratio | max abs seq log-ratio | sequences outside the clip band |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for scale, by_generation in results.items():
        for generation, by_pass in by_generation.items():
            for name in ("no replay", "R3"):
                r = by_pass[name]
                print(
                    f"| {scale} | {generation} | {name} | {r['routing_disagreement/token_layer']:.4f} / "
                    f"{r['routing_disagreement/token_any_layer']:.4f} | {r['token_abs_log_ratio_mean']:.2e} | "
                    f"{r['seq_abs_log_ratio_mean']:.2e} | {r['seq_abs_log_ratio_max']:.2e} | "
                    f"{r['outside_clip_band']:.3f} |"
                )
    tokens = [r["completion_tokens"] for by_generation in results.values() for r in by_generation.values()]
    print(
        f"\n{args.batch} sequences per setting, {min(tokens)}-{max(tokens)} completion tokens; "
        f"{time.perf_counter() - start:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
