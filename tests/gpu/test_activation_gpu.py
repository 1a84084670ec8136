"""SwiGLU / GeGLU / GELU and the MLP modules on CUDA, every dtype including bf16 (the interpreter cannot run bf16)."""

import pytest
import torch

from fastlm.testing import random_tensor
from tests.nn.test_mlp import MLP_VARIANTS, check_mlp
from tests.ops.test_activation import ACTIVATIONS, check_against_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(1, 1), (37, 1151), (1023, 123), (4096, 11008)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_matches_float64_reference_on_cuda(dtype, shape, name):
    gated = ACTIVATIONS[name][3]
    inputs = [random_tensor(*shape, dtype=dtype, device="cuda", scale=3.0) for _ in range(2 if gated else 1)]
    check_against_reference(name, inputs, dtype, "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_packed_halves_on_cuda(dtype):
    gate, up = random_tensor(64, 2 * 1000, dtype=dtype, device="cuda", scale=3.0).chunk(2, dim=-1)
    check_against_reference("swiglu", [gate, up], dtype, "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@MLP_VARIANTS
def test_mlp_on_cuda(dtype, kind, bias, approximate):
    check_mlp(kind, bias, approximate, dtype, "triton", device="cuda")
