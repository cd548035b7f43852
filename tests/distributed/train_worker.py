"""Worker for tests/test_distributed.py: a fixed-seed tiny GSPO run under whatever `accelerate launch` set up.

Writes {"world_size", "distributed_type", "losses", "rollout_mismatch"} to the JSON path given as argv[1] (main process only).
argv[2]: a DeepSpeed config (JSON) or "null"; argv[3]: extra GSPOConfig fields (JSON), e.g. {"padding_free": true}.
"""

import json
import sys

import torch
from accelerate import PartialState
from datasets import Dataset

from trl_gspo import GSPOConfig, GSPOTrainer
from trl_gspo.tiny import build_char_tokenizer, build_tiny_causal_lm


def reward(completions, **kwargs):
    return [float(len(c[-1]["content"]) % 4) for c in completions]


def main(out_path, deepspeed_config=None, extra_fields=None):
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, hidden_size=32, seed=0)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i % 7}="}] for i in range(32)]})
    world = PartialState().num_processes
    args = GSPOConfig(
        output_dir="/tmp/trl_gspo_dist",
        per_device_train_batch_size=8 // world,  # the same global batch whatever the world size
        num_generations=4,
        max_completion_length=6,
        max_steps=3,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        deepspeed=deepspeed_config,
        **(extra_fields or {}),
    )
    trainer = GSPOTrainer(model, reward, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        state = trainer.accelerator.state
        with open(out_path, "w") as f:
            json.dump(
                {
                    "world_size": state.num_processes,
                    "distributed_type": str(state.distributed_type),
                    "losses": losses,
                    "rollout_mismatch": [
                        h["gspo/rollout_logprobs/seq_abs_log_ratio_max"]
                        for h in trainer.state.log_history
                        if "gspo/rollout_logprobs/seq_abs_log_ratio_max" in h
                    ],
                },
                f,
            )


if __name__ == "__main__":
    main(*[sys.argv[1], *(json.loads(arg) for arg in sys.argv[2:])])
