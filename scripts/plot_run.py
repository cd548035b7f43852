"""Plot a GSPO/GRPO run: reward, held-out accuracy, clip fractions and the sequence-ratio range over steps.

    python scripts/plot_run.py runs/demo                     # reads runs/demo/trainer_state.json
    python scripts/plot_run.py runs/demo/checkpoint-600 -o fig.png
    python scripts/plot_run.py path/to/trainer_state.json

RUN accepts a trainer_state.json, a run folder holding one, or a run folder whose latest checkpoint-*/ holds one.
The figure goes to -o/--output, by default training_curves.png next to the trainer_state.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trl_gspo.plotting import find_trainer_state, load_log_history, plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder, checkpoint folder or trainer_state.json")
    parser.add_argument("-o", "--output", help="PNG to write (default: training_curves.png next to the state file)")
    parser.add_argument("--title", help="figure title (default: the run folder's name)")
    args = parser.parse_args(argv)
    try:
        state_path = find_trainer_state(args.run)
        log_history = load_log_history(state_path)
        output = Path(args.output) if args.output else state_path.parent / "training_curves.png"
        plot_run(log_history, output, title=args.title or state_path.parent.name)
    except (FileNotFoundError, ValueError) as error:
        print(f"plot_run.py: error: {error}", file=sys.stderr)
        return 1
    print(f"figure written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
