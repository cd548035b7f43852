"""GSPOTrainer from Python, end to end: the README's "Use it from Python" snippet, runnable as is.

    python scripts/quickstart.py                     # a tiny model built on the spot: CPU, no download, about 10 seconds
    python scripts/quickstart.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200   # a real model (GPU, hub)

It needs only the trl_gspo package (the wheel, or `pip install .` in a clone): the tiny model comes from
trl_gspo.tiny. The README shows the lines between the "README snippet" markers; tests/e2e/test_docs.py checks that
they match.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--model", help="hub name or local folder (default: a tiny model built in a temp folder)")
    parser.add_argument("--max-steps", type=int, default=8, help="optimizer steps (default 8)")
    parser.add_argument("--output-dir", default="runs/quickstart", help="run folder (default runs/quickstart)")
    flags = parser.parse_args(argv)
    output_dir, max_steps = flags.output_dir, flags.max_steps
    with tempfile.TemporaryDirectory() as scratch:
        if flags.model:
            model = flags.model
        else:
            from trl_gspo.tiny import save_tiny_model

            model = save_tiny_model(Path(scratch) / "tiny-model")

        # --- README snippet ---
        from datasets import Dataset

        from trl_gspo import GSPOConfig, GSPOTrainer

        def brevity_reward(completions, **kwargs):  # any GRPO reward: one float per completion
            return [-len(completion[-1]["content"]) / 100 for completion in completions]

        dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{i} + {i} = ?"}] for i in range(64)]})
        args = GSPOConfig(  # the paper's GSPO defaults; bf16 only where the hardware has it
            output_dir=output_dir,
            per_device_train_batch_size=8,
            num_generations=8,
            max_completion_length=32,
            max_steps=max_steps,
            report_to="none",
        )
        trainer = GSPOTrainer(model=model, reward_funcs=brevity_reward, args=args, train_dataset=dataset)
        trainer.train()
        # --- end of README snippet ---
    print(f"quickstart: {trainer.state.global_step} GSPO steps done, run folder {output_dir}")
    return {"steps": trainer.state.global_step, "log_history": trainer.state.log_history}


if __name__ == "__main__":
    main()
