"""The tiny local models and character tokenizer of the tests, the demo and the benchmarks.

They live in the plugin (`trl_gspo.tiny`), where the quickstart finds them with only the wheel installed; this
module keeps the `gspo_examples.tiny` names importable.
"""

from trl_gspo.tiny import (
    ARCHITECTURES,
    CHAT_TEMPLATE,
    DEFAULT_CHARS,
    EOS,
    PAD,
    UNK,
    build_char_tokenizer,
    build_tiny_causal_lm,
    check_char_tokenizer_reloads,
    save_tiny_model,
)

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "DEFAULT_CHARS",
    "EOS",
    "PAD",
    "UNK",
    "build_char_tokenizer",
    "build_tiny_causal_lm",
    "check_char_tokenizer_reloads",
    "save_tiny_model",
]
