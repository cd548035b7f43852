"""Benchmark workloads and helpers used by scripts/benchmark.py."""
