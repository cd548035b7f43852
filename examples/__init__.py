"""gspo_examples: the demo and tooling around trl_gspo, not part of the plugin wheel (installed by `make install`).

- `tiny`: tiny local models and a character tokenizer (tests, demo, benchmarks).
- `tasks`: the built-in verifiable tasks, their span rewards, warm-started models and the held-out accuracy callback.
- `compare`: GSPO vs GSPO-token vs GRPO on one task (scripts/compare.py).
- `token_advantages`: other GSPO-token token components, as GSPOTrainer subclasses, for `compare`.
- `demo`, `moe_experiment`: the bodies of scripts/demo.py and scripts/moe_experiment.py.
"""
