"""The machinery of scripts/benchmark.py: the trainer A/B runs (trainer_ab), the ragged workload, the rollout mismatch."""
