"""Which backends and dtypes the op tests run on this machine."""

import pytest
import torch

from fastlm._triton import HAS_TRITON, interpreter_enabled

# Dtypes each backend is tested in. The Triton interpreter gets bf16 arithmetic wrong
# (numpy has no bf16), so bf16 Triton runs only on a GPU (tests/gpu/).
CPU_BACKEND_DTYPES = {
    "torch": (torch.float32, torch.bfloat16, torch.float16),
    "cpp": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.float16),
}


def cpu_backend_params():
    """pytest params (backend, dtype) for every backend that runs on CPU tensors here."""
    params = []
    for name, dtypes in CPU_BACKEND_DTYPES.items():
        marks = []
        if name == "triton" and not (HAS_TRITON and interpreter_enabled()):
            marks = [pytest.mark.skip(reason="Triton on CPU needs triton installed and TRITON_INTERPRET=1")]
        for dtype in dtypes:
            params.append(pytest.param(name, dtype, id=f"{name}-{str(dtype).removeprefix('torch.')}", marks=marks))
    return params
