"""Shared fixtures: tiny local models, tokenizers and prompt datasets (no download), small trainer configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers.integrations.flash_attention as flash_integration  # noqa: E402
import transformers.modeling_flash_attention_utils as flash_utils  # noqa: E402
from datasets import Dataset  # noqa: E402

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402

torch.set_num_threads(1)  # xdist runs one worker per core


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    def make(model_type="qwen2", **kwargs):
        kwargs.setdefault("hidden_size", 32)
        return build_tiny_causal_lm(tokenizer, model_type=model_type, **kwargs)

    return make


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """A tiny model folder the vLLM tests load (engines take a path). vLLM's CPU attention needs head_dim 64 (it
    refuses 16): hidden 128 with 2 heads. Qwen3, not Qwen2: a qwen2 folder reloads the character tokenizer as the
    byte-level Qwen2Tokenizer (examples/tiny.py)."""
    from gspo_examples.tiny import save_tiny_model

    path = tmp_path_factory.mktemp("tiny_qwen3")
    return save_tiny_model(path, model_type="qwen3", hidden_size=128, num_heads=2, num_layers=2)


def prompt_dataset(kind="conversational", n=16):
    """`n` prompts of the form 'i+j=' with their sums, as plain strings or as chat messages."""
    questions = [f"{i}+{i % 7}=" for i in range(n)]
    answers = [str(i + i % 7) for i in range(n)]
    if kind == "conversational":
        prompts = [[{"role": "user", "content": q}] for q in questions]
    else:
        prompts = questions
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def completion_length_reward(completions, **kwargs):
    """A reward with spread inside each group, so advantages are non-zero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 4) for t in texts]


# The shape of a small off-the-shelf test run, for GSPOConfig and for TRL's GRPOConfig alike.
SMALL_RUN = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=8,
    max_steps=4,
    learning_rate=5e-3,
    logging_steps=1,
    report_to="none",
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    seed=0,
)


def small_config(output_dir, **overrides):
    from trl_gspo import GSPOConfig

    return GSPOConfig(output_dir=str(output_dir), **{**SMALL_RUN, **overrides})


def small_trainer(model, tokenizer, tmp_path, reward_funcs=completion_length_reward, **overrides):
    """A GSPOTrainer on `prompt_dataset()` with `small_config(tmp_path, **overrides)`."""
    from trl_gspo import GSPOTrainer

    return GSPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=small_config(tmp_path, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=tokenizer,
    )


def reference_attention(q, k, v, causal, scale, window_size, softcap):
    """Attention of one sequence, (S, H, D) layout as flash-attention takes it (grouped key/value heads)."""
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * (q.size(-1) ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query, key = torch.arange(q.size(0))[:, None], torch.arange(k.size(0))[None, :]
    allowed = (key <= query) if causal else torch.ones_like(query == key)
    if window_size[0] >= 0:
        allowed &= query - key <= window_size[0]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


@pytest.fixture
def flash_calls(monkeypatch):
    """transformers' flash-attention dispatch with torch reference kernels in place of the CUDA ones.

    Everything above the kernel is transformers' own (`_flash_attention_forward`: `_is_packed_sequence`, cu_seqlens
    from the position ids), so a test sees which kernel a packed pass reaches and with which arguments. Returns the
    list of calls: ("dense", batch size) or ("varlen", sequence lengths).
    """
    calls = []

    def flash_fn(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        calls.append(("dense", q.size(0)))
        rows = [reference_attention(*t, causal, softmax_scale, window_size, softcap) for t in zip(q, k, v)]
        return torch.stack(rows)

    def flash_varlen_fn(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
    ):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        bounds = cu_seqlens_q.tolist()
        calls.append(("varlen", [end - start for start, end in zip(bounds, bounds[1:])]))
        parts = [
            reference_attention(q[a:b], k[a:b], v[a:b], causal, softmax_scale, window_size, softcap)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(parts)

    functions = (flash_fn, flash_varlen_fn, None, flash_utils._pad_input, flash_utils._unpad_input)
    processing = (flash_utils._lazy_define_process_function(flash_varlen_fn), dict)
    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lambda *args, **kwargs: (functions, processing))
    # the CUDA kernels need half precision, so transformers would cast float32 queries; the reference ones do not
    monkeypatch.setattr(flash_integration, "get_target_dtype", lambda query, module: None)
    return calls
