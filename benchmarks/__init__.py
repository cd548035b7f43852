"""gspo_benchmarks: the measurements behind BENCHMARKS.md and docs/, not part of the plugin wheel (`make install`).

- `cli`: the command line of scripts/benchmark.py; `trainer_ab`: its machinery (A/B runs, summaries, tables);
  `ragged`: the ragged-length workload; `rollout_mismatch`: engine/trainer mismatch (`python -m`).
- `vllm_mismatch`: the mismatch against a real vLLM engine per dtype and completion length (`python -m`, .venv-vllm).
- `precision`: bf16 error of the sequence log-ratio against float64 (scripts/measure_precision.py).
- `moe_overhead`: cost of the routing drift metric and of routing replay (scripts/measure_moe_overhead.py).
"""
