"""Worker for tests/distributed/test_launch.py: GSPO-token with a span reward in a world of 2, groups straddling processes.

Each process saves, for its first rollout, the (B, T) advantages it trains on, its per-token rewards and loss mask
and TRL's sequence advantages, to <out_dir>/rank<i>.pt; the test rebuilds the advantages from all ranks together.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from train_worker import finish_rank  # this folder: the script's own

from gspo_examples.tiny import build_char_tokenizer, build_tiny_causal_lm
from trl_gspo import GSPOConfig, GSPOTrainer


def length_reward(completions, **kwargs):
    return [float(len(c[-1]["content"]) % 4) for c in completions]


def first_char_span(completions, **kwargs):
    return [[(0, 1, -1.0)] if c[-1]["content"] else 0.0 for c in completions]


class RecordingTrainer(GSPOTrainer):
    """Keeps the first rollout's advantages before and after GSPO-token's token component, with its inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        token_advantages = self.rewards.advantages

        def recording(output, collector, rewards_per_func, reward_weights, *rest):
            sequence_advantages = output["advantages"].clone()
            token_advantages(output, collector, rewards_per_func, reward_weights, *rest)
            if not hasattr(self, "recorded"):
                mask = output["completion_mask"].float()
                self.recorded = {
                    "advantages": output["advantages"].clone(),
                    "sequence_advantages": sequence_advantages,
                    "token_rewards": collector.token_reward_matrix(reward_weights.tolist(), mask.size(1)),
                    "mask": mask,
                }

        self.rewards.advantages = recording


def main(out_dir):
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(tokenizer, hidden_size=32, seed=0)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i}+{i % 7}="}] for i in range(32)]})
    state = PartialState()
    args = GSPOConfig(
        output_dir="/tmp/trl_gspo_dist_token",
        importance_sampling_level="sequence_token",
        per_device_train_batch_size=2,
        steps_per_generation=3,  # 6 completions per process, groups of 4: the second group straddles the ranks
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
    )
    trainer = RecordingTrainer(
        model, [length_reward, first_char_span], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    out_dir = Path(out_dir)
    torch.save(trainer.recorded, out_dir / f"rank{state.process_index}.pt")
    if state.is_main_process:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        (out_dir / "summary.json").write_text(json.dumps({"world_size": state.num_processes, "losses": losses}))
    finish_rank(trainer.accelerator)


if __name__ == "__main__":
    main(sys.argv[1])
