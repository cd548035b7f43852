"""GSPO end to end on a 2-core CPU, offline, in a few minutes: `make demo`. The demo is gspo_examples.demo.

python scripts/demo.py                   # sort_digits, 1000 GSPO steps (about 3 minutes)
python scripts/demo.py --quick           # the small form the tests run (~1 minute)
python scripts/demo.py --help            # what it does, what it shows, where it departs from the paper
"""

from gspo_examples.demo import main

if __name__ == "__main__":
    main()
