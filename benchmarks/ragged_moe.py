"""The ragged-MoE workload of scripts/benchmark.py: a tiny Mixture-of-Experts model that generates ragged completions.

Rollout routing replay (R3) replays the experts transformers `generate()` chose, so this workload cannot replace
generation by a `rollout_func` as the ragged workload does: both trainers generate with transformers, from the same
model (same architecture, same seed) on the same prompts. The model is a tiny MoE (qwen3_moe by default: 4 experts,
top-2) whose LM head gets a constant bias on the EOS logit, identical on both sides, so that its completions end at
random lengths. An untrained tiny model's logits are nearly uniform over the vocabulary of V tokens; a bias

    b = log((V - 1) / (m - 1))

makes it end a completion with probability 1/m per token: completion lengths are then geometric with mean m,
capped at max_completion_length (MEAN_COMPLETION_AT_INIT below; the benchmark reports the measured means, which
drift slowly as training moves the logits). The bias is a frozen parameter of the LM head (`nn.Linear.bias`), so
generation, TRL's fused LM head and the packed passes all score with it.

What recording a rollout costs inside generate(): `python -m gspo_benchmarks.ragged_moe [--rounds 5] [--json F]`
times one rollout's generate() call (the benchmark's shape: 32 prompts, up to 256 tokens, same seed every call, so
every variant samples the same tokens), alternating the variants every round: TRL's (no hooks), with GSPOTrainer's
router hooks installed but idle, with the sampled-token log-prob recorder (use_rollout_logprobs), with the routing
record (R3: the hooks record every fed position's experts, then cut into per-row records), and with both.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from contextlib import ExitStack

import torch

from gspo_examples.tiny import ARCHITECTURES

MOE_MODEL_TYPES = tuple(name for name, fields in ARCHITECTURES.items() if "num_experts_per_tok" in fields)
MEAN_COMPLETION_AT_INIT = 64  # tokens: m above
DEFAULT_MAX_COMPLETION_LENGTH = 256


def eos_logit_bias(vocab_size: int, mean_length: float) -> float:
    """The EOS logit bias b that gives a model of uniform logits over `vocab_size` tokens an EOS probability of
    1 / mean_length per token."""
    if mean_length <= 1:
        raise ValueError(f"eos_logit_bias: mean_length={mean_length} must exceed 1 token")
    return math.log((vocab_size - 1) / (mean_length - 1))


def add_eos_logit_bias(model, eos_token_id: int, bias: float):
    """Give `model`'s LM head a frozen bias: `bias` on the EOS logit, 0 elsewhere. The weight stays the same
    parameter (tied to the input embeddings where it was). Returns the model."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[eos_token_id] = bias
    biased.bias.requires_grad_(False)
    model.set_output_embeddings(biased)
    return model


GENERATION_VARIANTS = ("no hooks (TRL)", "idle router hooks", "log-prob recorder", "routing record (R3)", "both")


def generation_recording_cost(rounds: int = 5, batch: int = 32, max_new_tokens: int = DEFAULT_MAX_COMPLETION_LENGTH):
    """Median seconds of one generate() call per variant (GENERATION_VARIANTS), alternating the order each round,
    and each variant's median ratio to the first."""
    from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
    from trl_gspo.moe import RouterHooks, find_routers
    from trl_gspo.rollout_logprobs import SampledTokenLogProbs, recording_generate
    from trl_gspo.rollout_routing import records_from_generation

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, model_type="qwen3_moe", max_position_embeddings=512)
    add_eos_logit_bias(model, tokenizer.eos_token_id, eos_logit_bias(len(tokenizer), MEAN_COMPLETION_AT_INIT))
    plain = copy.deepcopy(model).eval()
    model.eval()
    hooks = RouterHooks(find_routers(model))
    prompts = [f"{i % 97:02d}+{(7 * i) % 89:02d}=" for i in range(batch)]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    padded = inputs["input_ids"].size(1)
    prompt_lengths = inputs["attention_mask"].sum(1).tolist()

    def rollout(variant):
        record_logprobs = variant in ("log-prob recorder", "both")
        record_routing = variant in ("routing record (R3)", "both")
        target = plain if variant == GENERATION_VARIANTS[0] else model
        recorder = SampledTokenLogProbs(temperature=1.0)
        torch.manual_seed(0)
        with torch.no_grad(), ExitStack() as stack:
            if record_logprobs:
                stack.enter_context(recording_generate(target, recorder))
            if record_routing:
                stack.enter_context(hooks.recording())
            output = target.generate(
                **inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens
            )
        completions = output[:, padded:].tolist()
        lengths = [
            row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row) for row in completions
        ]
        if record_routing:
            routing, _ = hooks.recorded_steps(batch)
            records_from_generation(routing, prompt_lengths, lengths, padded)
        if record_logprobs:
            recorder.per_sequence([row[:n] for row, n in zip(completions, lengths)])
        return lengths

    lengths = {variant: rollout(variant) for variant in GENERATION_VARIANTS}  # warm-up (same_samples below)
    times = {variant: [] for variant in GENERATION_VARIANTS}
    for r in range(rounds):
        for variant in GENERATION_VARIANTS if r % 2 == 0 else GENERATION_VARIANTS[::-1]:
            start = time.perf_counter()
            rollout(variant)
            times[variant].append(time.perf_counter() - start)
    base = times[GENERATION_VARIANTS[0]]
    return {
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "rounds": rounds,
        "mean_completion_length": statistics.mean(lengths[GENERATION_VARIANTS[0]]),
        "same_samples": all(lengths[v] == lengths[GENERATION_VARIANTS[0]] for v in GENERATION_VARIANTS),
        "variants": {
            variant: {
                "median_s": statistics.median(times[variant]),
                "ratio": statistics.median(t / b for t, b in zip(times[variant], base)),
            }
            for variant in GENERATION_VARIANTS
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="What recording a rollout costs inside generate() (module docstring)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = generation_recording_cost(args.rounds)
    print(
        f"one generate(): {result['batch']} prompts, up to {result['max_new_tokens']} tokens, mean completion "
        f"{result['mean_completion_length']:.1f}, same samples in every variant: {result['same_samples']}, "
        f"{result['rounds']} alternating rounds\n"
    )
    print("| variant | median per generate() | median ratio to no hooks |\n|---|---|---|")
    for variant, entry in result["variants"].items():
        print(f"| {variant} | {entry['median_s'] * 1e3:.0f} ms | {entry['ratio']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
