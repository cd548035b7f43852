"""Which model types pack exactly under padding_free: every causal-LM type of the installed transformers, measured on
a tiny model (gspo_benchmarks.packing_sweep; docs/PACKING.md). Writes trl_gspo/packing_models.py, the table of
docs/PACKING.md and the list of README.md.

python scripts/sweep_packing_models.py                          # every type, 60 s per type at most
python scripts/sweep_packing_models.py --types gpt_neox opt --json /tmp/sweep.json   # some types, nothing written
"""

from gspo_benchmarks.packing_sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
