"""Tiny local models and tokenizers: built from a config on the spot, no download.

The quickstart's default model (`python scripts/quickstart.py` with only the wheel installed), and the models of
the tests, the CPU demo and the benchmarks. The tokenizer is character-level (one token per character), trained
on nothing: its vocabulary is given. It carries a chat template, pad and eos tokens, so it goes through TRL's
conversational code paths like a real chat tokenizer.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
DEFAULT_CHARS = string.digits + string.ascii_letters + " +-*/=?:,.()[]<>#\\{}_\n"
# One line per message ("u:" user, "s:" system, "a:" assistant); the eos token ends an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'][0] + ':' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)

ARCHITECTURES = {
    # model_type -> config fields beyond the shared shape; a None is sized from that shape in build_tiny_causal_lm
    "qwen3": {"head_dim": None},
    "qwen2": {},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": None, "head_dim": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with pad/eos/unk tokens, no BOS, and a chat template."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *dict.fromkeys(chars)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast,
    model_type: str = "qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides,
):
    """A randomly initialised causal LM of `model_type` (see ARCHITECTURES) sized for a CPU.

    MoE types get 4 experts, top-2, and a router aux-loss coefficient, so TRL adds the load-balancing loss.
    """
    if model_type not in ARCHITECTURES:
        raise ValueError(f"build_tiny_causal_lm: model_type={model_type!r}; expected one of {sorted(ARCHITECTURES)}")
    intermediate_size = intermediate_size or 4 * hidden_size
    sized = {"head_dim": hidden_size // num_heads, "moe_intermediate_size": intermediate_size}
    extra = {key: sized.get(key, value) for key, value in ARCHITECTURES[model_type].items()}
    if model_type in ("qwen3_moe", "mixtral"):
        # output_router_logits stays False (generation with a KV cache cannot build the aux loss); TRL asks for the
        # router logits itself whenever router_aux_loss_coef != 0.
        extra.update(router_aux_loss_coef=0.01)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{**extra, **overrides},
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)  # its generation config takes the token ids above


def save_tiny_model(path, model_type: str = "qwen3", **kwargs):
    """Build a tiny model and tokenizer and save both to `path`, loadable with from_pretrained(path).

    The default is qwen3; the reload is checked (see `check_char_tokenizer_reloads`).
    """
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, model_type=model_type, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    check_char_tokenizer_reloads(path, "sort 12\n3")
    return str(path)


def check_char_tokenizer_reloads(folder, *texts: str) -> None:
    """Raise unless the tokenizer saved in `folder`, loaded with AutoTokenizer as TRL does, gives one token per
    character of each text and decodes it back.

    transformers 5 loads the tokenizer of a *qwen2* folder as the byte-level Qwen2Tokenizer, which silently drops
    this tokenizer's spaces and newlines; other model types load it as saved.
    """
    reloaded = AutoTokenizer.from_pretrained(folder)
    for text in texts:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        if len(ids) == len(text) and reloaded.decode(ids) == text:
            continue
        raise ValueError(
            f"the character tokenizer saved in {folder} reloads as {type(reloaded).__name__}, which does not "
            f"round-trip {text!r} (got {reloaded.decode(ids)!r}); a qwen2 model folder does this. Use model_type "
            "'qwen3' (the default) or another type in ARCHITECTURES."
        )
