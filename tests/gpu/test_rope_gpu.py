"""RoPE on CUDA through the compiled Triton kernel, every dtype including bf16."""

import pytest
import torch

import fastlm
from fastlm.ops.rope import rope, rope_ref
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.ops.test_rope import forward_backward, make_positions, plain_pair, tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 2, 2), (2, 1023, 32, 8, 128, 128), (3, 37, 5, 1, 80, 40)],
                         ids=lambda s: "b{}s{}hq{}hk{}d{}r{}".format(*s))
@pytest.mark.parametrize("positions", ["none", "offset", "per-token"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_matches_float64_reference_on_cuda(dtype, shape, positions, interleaved):
    batch, seqlen, hq, hk, headdim, rotary_dim = shape
    q = random_tensor(batch, seqlen, hq, headdim, dtype=dtype, device="cuda")
    k = random_tensor(batch, seqlen, hk, headdim, dtype=dtype, device="cuda")
    cos, sin = (t.cuda() for t in tables(rotary_dim, positions=2048))
    pos = make_positions(positions, batch, seqlen)
    pos = pos.cuda() if pos is not None else None
    grads_out = [random_tensor(*t.shape, dtype=torch.float64, device="cuda") for t in (q, k)]
    ref, ref_grads = forward_backward(
        lambda q, k: rope_ref(q, k, cos, sin, pos, interleaved), [q.double(), k.double()], grads_out
    )
    base, base_grads = forward_backward(lambda q, k: plain_pair(q, k, cos, sin, pos, interleaved), [q, k], grads_out)
    with fastlm.use_backend("triton"), poison_outputs():
        outs, grads = forward_backward(lambda q, k: rope(q, k, cos, sin, pos, interleaved), [q, k], grads_out)
    for name, out, r, b in zip(["q", "k"], outs, ref, base):
        assert_matches_reference(name, out, r, b, dtype)
    for name, g, r, b in zip(["dq", "dk"], grads, ref_grads, base_grads):
        assert_matches_reference(name, g, r, b, dtype, grad=True)
