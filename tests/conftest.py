"""Shared fixtures: tiny local models, tokenizers and prompt datasets (no download), small trainer configs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from trl_gspo.tiny import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402

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


def small_config(output_dir, **overrides):
    from trl_gspo import GSPOConfig

    values = dict(
        output_dir=str(output_dir),
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
    values.update(overrides)
    return GSPOConfig(**values)
