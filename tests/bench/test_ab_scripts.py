"""The A/B scripts under benchmarks/ answer --help with their usage instead of a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, argument", [
    ("eager_overhead_ab", "ROUNDS"), ("gemm_transpose_ab", "STEPS"), ("attention_cpu_forward_ab", "CALLS"),
    ("attention_cpu_train_ab", "CALLS"),
])
def test_help_prints_usage_and_a_bad_count_is_refused(script, argument):
    path = str(ROOT / "benchmarks" / f"{script}.py")
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    shown = subprocess.run([sys.executable, path, "--help"], **run)
    assert shown.returncode == 0 and f"usage: {script}.py [-h] [{argument}]" in shown.stdout, shown.stderr
    refused = subprocess.run([sys.executable, path, "0"], **run)
    assert refused.returncode == 2 and f"{argument} must be at least 1" in refused.stderr
