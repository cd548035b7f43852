"""max |s_i - 1| at learning rate 0, per source of train-mode randomness, with disable_dropout False and True.

At learning rate 0 the policy never changes, so every sequence ratio s_i must be exactly 1; whatever moves it is a
random draw that differs between the pi_old pass and the policy pass (docs/NOISE.md). One GSPOTrainer optimizer
step (the rollout's first, 16 sequences, float32 on the CPU) per source and setting; the sequence ratios are read
from the objective's own output. A refused configuration prints "refused", a crash its exception.

python scripts/measure_noise.py          # markdown table rows, about a minute on a CPU
python benchmarks/noise.py               # the same file run directly, e.g. on an older checkout's trl_gspo
"""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging  # noqa: E402

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm  # noqa: E402
from trl_gspo import GSPOConfig, GSPOTrainer  # noqa: E402

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
# source -> (label, model type, config fields, LoRA adapter or None); tests/trainer/test_noise.py tests each
SOURCES = {
    "attention_dropout": (
        "attention dropout 0.1 (Qwen2, float passed to attention)",
        "qwen2",
        dict(attention_dropout=0.1),
        None,
    ),
    "functional_dropout": (
        "residual + embedding dropout 0.1 (Starcoder2, F.dropout)",
        "starcoder2",
        dict(residual_dropout=0.1, embedding_dropout=0.1),
        None,
    ),
    "config_read_in_forward": (
        "hidden + attention dropout 0.1 (Falcon, read from config)",
        "falcon",
        dict(hidden_dropout=0.1, attention_dropout=0.1),
        None,
    ),
    "nn_dropout": (
        "nn.Dropout 0.1 (GPT-2 resid/embd/attn_pdrop)",
        "gpt2",
        dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
        None,
    ),
    "layerdrop": ("layerdrop 0.5 (OPT)", "opt", dict(layerdrop=0.5, dropout=0.0, attention_dropout=0.0), None),
    "router_jitter_noise": ("router_jitter_noise 0.1 (Mixtral)", "mixtral", dict(router_jitter_noise=0.1), None),
    "sampled_routing": (
        "input_jitter_noise 0.1 + sampled routing (PhiMoE)",
        "phimoe",
        dict(input_jitter_noise=0.1, router_aux_loss_coef=0.0),
        None,
    ),
    "lora_dropout": ("lora_dropout 0.05 (LoRA on Qwen2, B ~ N(0, 0.1))", "qwen2", {}, LORA),
}
# no setting switches these off: refused whenever a pi_old pass runs
UNSWITCHABLE_SOURCES = ("sampled_routing",)
SHAPES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False),
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32),
    "starcoder2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phimoe": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
}


class RatioRecordingTrainer(GSPOTrainer):
    """GSPOTrainer that keeps every s_i of its micro-batches, as the objective computed them."""

    def _log_objective_metrics(self, mode, out, *tensors):
        self.sequence_log_ratios.append(out.seq_log_ratio[out.lengths > 0])
        super()._log_objective_metrics(mode, out, *tensors)


def build_model(tokenizer, model_type, fields):
    if model_type not in SHAPES:
        return build_tiny_causal_lm(tokenizer, model_type=model_type, hidden_size=32, **fields)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **SHAPES[model_type],
        **fields,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def measure(tokenizer, source, disable_dropout, output_dir):
    _, model_type, fields, lora = SOURCES[source]
    args = GSPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        gradient_accumulation_steps=2,
        steps_per_generation=4,
        max_completion_length=16,
        max_steps=1,
        learning_rate=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_dropout=disable_dropout,
    )
    prompts = [[{"role": "user", "content": f"{i}+{i % 7}="}] for i in range(64)]
    try:
        trainer = RatioRecordingTrainer(
            model=build_model(tokenizer, model_type, fields),
            reward_funcs=lambda completions, **kwargs: [float(len(c[-1]["content"]) % 4) for c in completions],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            peft_config=None if lora is None else LoraConfig(**lora),
        )
    except ValueError:
        return "refused"
    trainer.sequence_log_ratios = []
    with torch.no_grad():  # an adapter that has moved: with B = 0 the dropout on A's input changes nothing
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    try:
        trainer.train()
    except Exception as error:  # noqa: BLE001 - a crash is a result here
        return f"crash ({type(error).__name__})"
    ratios = torch.exp(torch.cat(trainer.sequence_log_ratios).double())
    outside = ((ratios < 1 - args.epsilon) | (ratios > 1 + args.epsilon_high)).double().mean().item()
    return f"{(ratios - 1).abs().max().item():.1e} ({outside:.0%} outside)"


def main():
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    print("| source | disable_dropout=False | disable_dropout=True |")
    print("|---|---|---|")
    for source, (label, *_) in SOURCES.items():
        cells = [measure(tokenizer, source, flag, f"/tmp/measure_noise/{flag}") for flag in (False, True)]
        print(f"| {label} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
