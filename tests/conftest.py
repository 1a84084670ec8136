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
