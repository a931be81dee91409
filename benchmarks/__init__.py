"""Benchmark suite for onecycle_fused: ``python -m benchmarks.run --help``."""
