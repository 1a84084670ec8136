"""Test setup: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so before
fastlm is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def onednn_gemm(monkeypatch):
    """The cpp backend's float32 matmuls through oneDNN on every machine that can run it, also where
    fastlm leaves them to torch (``ONEDNN_FASTER`` is False on AVX2-only and Intel CPUs), and from the
    full-width threshold on (Zen 4's is higher), so that the oneDNN path is tested at the tests' sizes
    whichever CPU CI lands on."""
    import importlib

    gemm_module = importlib.import_module("fastlm.ops.gemm")  # the module, not the function fastlm.ops exports
    monkeypatch.setattr(gemm_module, "ONEDNN_FASTER", gemm_module.onednn_available())
    monkeypatch.setattr(gemm_module, "ONEDNN_MIN_MACS", gemm_module.FULL_WIDTH_MIN_MACS)
