"""Plot a GSPO/GRPO run: reward, held-out accuracy, clip fractions and the sequence-ratio range over steps.

    python scripts/plot_run.py runs/demo/sort_digits --clip-range 3e-4 4e-4   # runs/demo/sort_digits/training_curves.png
    python scripts/plot_run.py runs/my-run -o fig.png
    python scripts/plot_run.py path/to/trainer_state.json

RUN accepts a trainer_state.json, a run folder holding one (every run of scripts/train_gspo.py leaves it there),
or a run folder whose latest checkpoint-*/ holds one. The figure goes to -o/--output, by default
training_curves.png in the run folder (never inside a checkpoint), titled with the run folder's name. A panel whose
metrics the run did not log is left out, and the script names it. Needs matplotlib (`pip install 'trl-gspo[plots]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trl_gspo.plotting import absent_panels, find_trainer_state, load_log_history, plot_run, run_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("run", help="run folder, checkpoint folder or trainer_state.json")
    parser.add_argument("-o", "--output", help="PNG to write (default: training_curves.png in the run folder)")
    parser.add_argument("--title", help="figure title (default: the run folder's name)")
    parser.add_argument(
        "--clip-range",
        nargs=2,
        type=float,
        metavar=("EPS_LOW", "EPS_HIGH"),
        help="shade the unclipped band of the sequence ratio, e.g. 3e-4 4e-4",
    )
    args = parser.parse_args(argv)
    try:
        state_path = find_trainer_state(args.run)
        log_history = load_log_history(state_path)
        folder = run_folder(state_path)
        output = Path(args.output) if args.output else folder / "training_curves.png"
        plot_run(log_history, output, title=args.title or folder.name, clip_range=args.clip_range)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"plot_run.py: error: {error}", file=sys.stderr)
        return 1
    print(f"figure written to {output}")
    for absent in absent_panels(log_history):
        print(f"  not logged by this run, left out: {absent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
