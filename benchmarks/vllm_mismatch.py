"""Measure the training-inference mismatch against a real vLLM engine, per engine dtype and completion length.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m gspo_benchmarks.vllm_mismatch [--json out.json]

Runs in .venv-vllm (`make vllm-env`). For each engine dtype a colocated-style vLLM engine (`LLM(...)` with TRL's
`logprobs_mode="processed_logprobs"`) serves a tiny random float32 qwen3 (hidden 128, 2 heads of 64, 2 layers:
vLLM's CPU attention needs head_dim 64). It samples `--group` completions for each of `--prompts` prompts at
temperature 1 with exactly L tokens (`ignore_eos`, `max_tokens` = L; eos may be sampled) and returns each sampled
token's log-prob; the trainer's side is one float32 transformers forward of the same tokens, as GRPOTrainer's pi_old
pass computes it. Per (dtype, L), over the sampled tokens / sequences:

- token |d|: d_t = log p_trainer - log p_engine, mean and max of |d_t| (TRL logs these as
  `sampling/sampling_logp_difference/*`).
- sequence |r|: r_i = mean_t d_t, the length-normalised log-ratio: log s_i at the first optimizer step of a rollout
  with `use_rollout_logprobs=True` (the engine's log-probs as pi_old, the trainer's as pi_theta), mean and max of
  |r_i| (`gspo/rollout_logprobs/seq_abs_log_ratio_*`).
- outside band: fraction of sequences with r_i outside GSPO's clip band [log(1 - eps_low), log(1 + eps_high)] at
  the paper's epsilons (`objective.outside_clip_band`): clipped by the engine, before any learning.
- importance weights of vLLM's importance-sampling correction: TRL's sequence weight exp(sum_t d_t) (a product over
  tokens) against the length-normalised exp(r_i) (`GSPOConfig.vllm_importance_sampling_length_normalized`), as the
  range min-max over sequences, and how often TRL's default `vllm_importance_sampling_clip_max=3` fires on each
  (the share of sequences `sequence_mask` would drop).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

DTYPES = ("float32", "bfloat16", "float16")
LENGTHS = (16, 64, 128, 512)
TRL_DEFAULT_CLIP_MAX = 3.0  # GRPOConfig.vllm_importance_sampling_clip_max (clip_min: None)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _str_list(text: str) -> list[str]:
    return text.replace(",", " ").split()


def build_model(folder: str, max_length: int, seed: int = 0) -> str:
    """Save the benchmark's tiny float32 qwen3 (and its character tokenizer) to `folder`."""
    from gspo_examples.tiny import save_tiny_model

    return save_tiny_model(
        folder,
        model_type="qwen3",
        hidden_size=128,
        num_heads=2,
        num_layers=2,
        max_position_embeddings=max_length,
        seed=seed,
    )


def prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` short arithmetic prompts as token ids (chat template, generation prompt)."""
    messages = [[{"role": "user", "content": f"{i}+{(7 * i) % 13}="}] for i in range(count)]
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def sample(llm, prompt_ids: list[list[int]], length: int, group: int, seed: int):
    """`group` completions of exactly `length` tokens per prompt: [(prompt, completion ids, engine log-probs)]."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=group,
        temperature=1.0,
        max_tokens=length,
        ignore_eos=True,  # not min_tokens: it masks eos out of the distribution the processed log-probs are of
        logprobs=0,
        seed=seed,
        detokenize=False,
    )
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    samples = []
    for prompt, output in zip(prompt_ids, outputs):
        for completion in output.outputs:
            ids = list(completion.token_ids)
            logps = [entry[token].logprob for entry, token in zip(completion.logprobs, ids)]
            samples.append((prompt, ids, logps))
    return samples


def trainer_logprobs(model, prompt: list[int], completions: list[list[int]]) -> torch.Tensor:
    """(G, L) float32 log-probs of equal-length completions of one prompt: one forward, no padding."""
    ids = torch.tensor([prompt + completion for completion in completions])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, len(prompt) :, None]).squeeze(-1)


def mismatch_statistics(trainer: torch.Tensor, engine: torch.Tensor, epsilon_low, epsilon_high) -> dict:
    """The table's numbers for (N, L) trainer and engine log-probs of N sampled sequences (module docstring)."""
    from trl_gspo.objective import outside_clip_band

    token = (trainer - engine).double()
    log_product = token.sum(-1)  # TRL's sequence_* modes: exp of the sum over tokens
    log_normalized = token.mean(-1)  # GSPO's length-normalised form: r_i
    product, normalized = log_product.exp(), log_normalized.exp()
    return {
        "sequences": token.size(0),
        "token_abs_mean": token.abs().mean().item(),
        "token_abs_max": token.abs().max().item(),
        "seq_abs_mean": log_normalized.abs().mean().item(),
        "seq_abs_max": log_normalized.abs().max().item(),
        "outside_clip_band": outside_clip_band(log_normalized, epsilon_low, epsilon_high).double().mean().item(),
        "product_weight_min": product.min().item(),
        "product_weight_max": product.max().item(),
        "normalized_weight_min": normalized.min().item(),
        "normalized_weight_max": normalized.max().item(),
        "product_masked_at_cap": (product > TRL_DEFAULT_CLIP_MAX).double().mean().item(),
        "normalized_masked_at_cap": (normalized > TRL_DEFAULT_CLIP_MAX).double().mean().item(),
    }


def measure_dtype(model_dir: str, dtype: str, lengths, prompt_count: int, group: int, seed: int = 0) -> dict:
    """{length: statistics} for one engine dtype, or {"error": reason} when vLLM cannot serve the model in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    from trl_gspo.config import PAPER_EPSILON_HIGH, PAPER_EPSILON_LOW

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = prompts(tokenizer, prompt_count)
    started = time.perf_counter()
    llm = None
    try:
        # the LLM(...) arguments of TRL's colocate mode that change what is sampled and returned
        llm = LLM(
            model=model_dir,
            dtype=dtype,
            max_model_len=max(len(p) for p in prompt_ids) + max(lengths),
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",
            seed=seed,
            gpu_memory_utilization=0.1,  # on a CPU: the share of RAM reserved (KV cache); the tiny model needs little
        )
    except Exception as error:  # a dtype the engine cannot serve: its reason goes into the table
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    try:
        engine_start = time.perf_counter() - started
        results = {"engine_dtype": str(llm.llm_engine.model_config.dtype), "engine_start_s": engine_start}
        for length in lengths:
            samples = sample(llm, prompt_ids, length, group, seed)
            engine = torch.tensor([logps for _, _, logps in samples])
            trainer = torch.cat(
                [
                    trainer_logprobs(model, prompt, [ids for p, ids, _ in samples if p is prompt])
                    for prompt in prompt_ids
                ]
            )
            results[length] = mismatch_statistics(trainer, engine, PAPER_EPSILON_LOW, PAPER_EPSILON_HIGH)
        return results
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def markdown_table(results: dict, lengths) -> str:
    header = (
        "| engine dtype | L | token abs(d) mean / max | seq abs(r) mean / max | outside clip band "
        "| TRL weight exp(sum d) min - max | length-normalised exp(r) min - max | masked at cap 3: TRL / normalised |"
    )
    lines = [header, "|" + "---|" * 8]
    for dtype, per_length in results.items():
        if "error" in per_length:
            lines.append(f"| {dtype} | - | not served: {per_length['error']} | | | | | |")
            continue
        for length in lengths:
            s = per_length[length]
            lines.append(
                f"| {dtype} | {length} | {s['token_abs_mean']:.1e} / {s['token_abs_max']:.1e} "
                f"| {s['seq_abs_mean']:.1e} / {s['seq_abs_max']:.1e} | {100 * s['outside_clip_band']:.0f} % "
                f"| {s['product_weight_min']:.4f} - {s['product_weight_max']:.4f} "
                f"| {s['normalized_weight_min']:.5f} - {s['normalized_weight_max']:.5f} "
                f"| {100 * s['product_masked_at_cap']:.0f} % / {100 * s['normalized_masked_at_cap']:.0f} % |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dtypes", type=_str_list, default=list(DTYPES), help="engine dtypes, e.g. 'float32,bfloat16'"
    )
    parser.add_argument("--lengths", type=_int_list, default=list(LENGTHS), help="completion lengths, e.g. '16,512'")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per length")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes {unknown}: expected some of {DTYPES}")
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        parser.error("set VLLM_ENABLE_V1_MULTIPROCESSING=0: the engines run one after the other in this process")
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model_dir = build_model(folder, max_length=64 + max(args.lengths), seed=args.seed)
        results = {
            dtype: measure_dtype(model_dir, dtype, args.lengths, args.prompts, args.group, args.seed)
            for dtype in args.dtypes
        }
    print(markdown_table(results, args.lengths))
    print(
        f"\n{args.prompts} prompts x {args.group} completions per length; clip band [log(1 - 3e-4), log(1 + 4e-4)]; "
        f"{time.perf_counter() - started:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
