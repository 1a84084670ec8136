"""The norm checks on a GPU: the compiled Triton kernels in bf16/fp16/fp32 (the interpreter
cannot run bf16), plus determinism of the weight gradients at a realistic size."""

import pytest
import torch

import fastlm
from fastlm.testing import random_tensor
from tests.ops.test_norm import WIDTHS, check_against_reference, run_norm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("n", WIDTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_triton_matches_float64_reference(dtype, n, kind, with_residual):
    check_against_reference("triton", dtype, n, kind, with_residual, affine=True, device="cuda")


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_weight_grads_are_deterministic_at_scale(kind):
    x = random_tensor(8192, 4096, dtype=torch.bfloat16, device="cuda").requires_grad_()
    w = random_tensor(4096, dtype=torch.bfloat16, device="cuda").requires_grad_()
    dy = random_tensor(8192, 4096, dtype=torch.bfloat16, device="cuda")
    grads = []
    for _ in range(2):
        with fastlm.use_backend("triton"):
            y = run_norm(kind, x, w, None, None, 1e-5)
        grads.append(torch.autograd.grad(y, (x, w), dy))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
