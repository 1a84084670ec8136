"""Benchmarks: the harness (timing, memory, provenance), the per-op cases, the report, and
the ``fastlm-bench`` command that runs them all."""
