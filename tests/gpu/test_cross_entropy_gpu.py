"""cross_entropy and linear_cross_entropy on CUDA with the Triton backend: bf16 (which the
interpreter cannot check), large vocabularies, and the fused head's memory."""

import pytest
import torch

import fastlm
from fastlm.ops.cross_entropy import cross_entropy_ref
from fastlm.ops.linear_cross_entropy import linear_cross_entropy_ref
from fastlm.testing import assert_matches_reference, poison_outputs
from tests.ops.test_cross_entropy import IGNORE, plain_torch
from tests.ops.test_cross_entropy import forward_backward as ce_forward_backward
from tests.ops.test_linear_cross_entropy import forward_backward as lce_forward_backward
from tests.ops.test_linear_cross_entropy import plain_torch_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize(
    "tokens,vocab", [(1023, 1000), (64, 50257), (8, 262144)], ids=["t1023-v1000", "t64-v50257", "t8-v262144"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_matches_float64_reference(dtype, tokens, vocab, reduction):
    logits = (torch.randn(tokens, vocab, device="cuda") * 3).to(dtype)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    target[::5] = IGNORE
    kwargs = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    grad_out = torch.rand(tokens if reduction == "none" else (), device="cuda", dtype=torch.float64)
    ref, ref_grad = ce_forward_backward(cross_entropy_ref, logits.double(), target, grad_out, **kwargs)
    base, base_grad = ce_forward_backward(plain_torch, logits, target, grad_out, **kwargs)
    with fastlm.use_backend("triton"), poison_outputs():
        loss, grad = ce_forward_backward(fastlm.cross_entropy, logits, target, grad_out, **kwargs)
    assert_matches_reference("loss", loss, ref, base, dtype)
    assert_matches_reference("dlogits", grad, ref_grad, base_grad, dtype, grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_matches_float64_reference(dtype, reduction):
    tokens, dim, vocab = 1000, 256, 32003
    hidden = torch.randn(tokens, dim, device="cuda").to(dtype)
    weight = (torch.randn(vocab, dim, device="cuda") * dim**-0.5 * 2).to(dtype)
    bias = torch.randn(vocab, device="cuda").to(dtype)
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    target[::7] = IGNORE
    kwargs = dict(reduction=reduction, z_loss=1e-4, chunk_size=300)
    grad_out = torch.rand(tokens if reduction == "none" else (), device="cuda", dtype=torch.float64)
    inputs = [hidden, weight, bias]
    ref, ref_grads = lce_forward_backward(
        linear_cross_entropy_ref, *[t.double() for t in inputs], target, grad_out, **kwargs
    )
    base, base_grads = lce_forward_backward(plain_torch_linear, *inputs, target, grad_out, **kwargs)
    with fastlm.use_backend("triton"), poison_outputs():
        loss, grads = lce_forward_backward(fastlm.linear_cross_entropy, *inputs, target, grad_out, **kwargs)
    assert_matches_reference("loss", loss, ref, base, dtype)
    for name, g, r, b in zip(["dhidden", "dweight", "dbias"], grads, ref_grads, base_grads):
        assert_matches_reference(name, g, r, b, dtype, grad=True)


def test_linear_cross_entropy_peak_memory_is_a_fraction_of_the_logits():
    tokens, dim, vocab = 4096, 1024, 65536
    hidden = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, dim, device="cuda") * dim**-0.5).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device="cuda")
    logits_bytes = tokens * vocab * 2
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastlm.linear_cross_entropy(hidden, weight, target).backward()
    torch.cuda.synchronize()
    # Gradients the caller keeps (hidden and weight grads, the fp32 weight accumulator)
    # are counted; the logits never are: the rest is about one chunk of logits.
    kept = hidden.numel() * 2 + weight.numel() * (2 + 4)
    extra = torch.cuda.max_memory_allocated() - before - kept
    assert extra <= logits_bytes / 4, f"peak extra {extra / 2**20:.0f} MiB vs logits {logits_bytes / 2**20:.0f} MiB"
