"""Benchmarks (scripts run from the repository root); shared helpers in bench.common."""
