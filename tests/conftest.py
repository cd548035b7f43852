"""Shared fixtures: tiny local models, tokenizers and prompt datasets (no download), small trainer configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
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


@pytest.fixture
def flash_calls():
    """transformers' flash-attention dispatch with torch reference kernels in place of the CUDA ones
    (gspo_benchmarks.packing_sweep.reference_flash_attention, the sweep's own).

    Everything above the kernel is transformers' own (`_flash_attention_forward`: `_is_packed_sequence`, cu_seqlens
    from the position ids), so a test sees which kernel a packed pass reaches and with which arguments. Returns the
    list of calls: ("dense", batch size) or ("varlen", sequence lengths).
    """
    from gspo_benchmarks.packing_sweep import reference_flash_attention

    calls = []
    with reference_flash_attention(calls):
        yield calls
