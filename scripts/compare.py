"""GSPO vs GSPO-token (span reward) vs GRPO on a built-in task, on CPU: a markdown table and PNG figures.

The machinery is trl_gspo.compare (read its docstring for the arms and what is shared). Each seed warm-starts one
model (cached under --cache-dir), and every arm trains a copy of it for the same number of steps.

Commands
    python scripts/compare.py                                   # place task, seed 0, gspo/gspo_token/grpo, 300 steps
    python scripts/compare.py --seeds 0 1 2 --arms gspo gspo_token gspo_dense
    python scripts/compare.py --task sort_digits --steps 200 --output-dir runs/compare-sort

Writes <output-dir>/results.json (every run's log history), comparison.md and comparison.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from trl_gspo.compare import ARMS, DEFAULT_ARMS, TrainSettings, run_comparison, write_report  # noqa: E402


def parse_flags(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="place", help="built-in task (default place: local precision)")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=sorted(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="optimizer steps per run")
    parser.add_argument("--learning-rate", type=float, default=TrainSettings.learning_rate)
    parser.add_argument("--eval-every", type=int, default=TrainSettings.eval_every)
    parser.add_argument("--test-rows", type=int, default=TrainSettings.test_rows)
    parser.add_argument(
        "--token-advantage-weight",
        type=float,
        default=TrainSettings.token_advantage_weight,
        help="lambda of GSPO-token's group-normalised token component (GSPOConfig.token_advantage_weight)",
    )
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--cache-dir", default=".cache/trl_gspo", help="where warm-started models are cached")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see scripts/demo.py)")
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps on a small model and small splits (for the tests)"
    )
    return parser.parse_args(argv)


def main(argv=None):
    flags = parse_flags(argv)
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
    settings = TrainSettings(
        steps=flags.steps,
        learning_rate=flags.learning_rate,
        eval_every=flags.eval_every,
        test_rows=flags.test_rows,
        monitor_rows=min(TrainSettings.monitor_rows, flags.test_rows),
        threads=flags.threads,
        token_advantage_weight=flags.token_advantage_weight,
    )
    if flags.tiny:
        settings.split_sizes = {"train": 64, "dev": 16, "test": 16}
        settings.model_kwargs = {"hidden_size": 32, "intermediate_size": 64}
        settings.target_accuracy = 0.0  # stop the warm start at its first check
        settings.per_device_train_batch_size = 16
        settings.logging_steps = 1
    start = time.perf_counter()
    results = run_comparison(flags.task, flags.arms, flags.seeds, settings, flags.output_dir, flags.cache_dir)
    command = "python scripts/compare.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = write_report(results, flags.output_dir, command.strip(), flags.task, settings)
    print(report.read_text())
    print(f"== wrote {report} and {report.with_suffix('.png')} in {time.perf_counter() - start:.0f} s")
    return report


if __name__ == "__main__":
    main()
