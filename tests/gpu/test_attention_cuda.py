"""Attention's Triton kernels on a GPU: bf16, the real Hopper tiles and long sequences.

The CPU suite (tests/ops/test_attention.py) runs the same kernels through the interpreter
with small tiles; here they run compiled, at the sizes the tiles were chosen for.
"""

import pytest
import torch

import fastlm
from fastlm.ops.attention import attention, attention_dropout_mask, attention_ref, attention_with_kvcache
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DTYPES = [torch.bfloat16, torch.float16]


def _inputs(shape_q, shape_k, dtype):
    q = random_tensor(*shape_q, dtype=dtype, device="cuda")
    k = random_tensor(*shape_k, dtype=dtype, device="cuda")
    v = random_tensor(*shape_k, dtype=dtype, device="cuda")
    return q, k, v


def _forward_backward(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out.double() * dout).sum().backward()
    return out, [t.grad for t in leaves]


def _check(inputs, dout, dtype, deterministic=True, **kwargs):
    ref, ref_grads = _forward_backward(lambda *a: attention_ref(*a, **kwargs), [t.double() for t in inputs], dout)
    base, base_grads = _forward_backward(lambda *a: attention_ref(*a, **kwargs), inputs, dout)
    with fastlm.use_backend("triton"), poison_outputs():
        out, grads = _forward_backward(lambda *a: attention(*a, deterministic=deterministic, **kwargs), inputs, dout)
    assert_matches_reference("out", out, ref, base, dtype)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_matches_reference(name, g, r, b, dtype, grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_large(dtype, head_dim, causal):
    # Non-multiples of every tile size; GQA 8:2; seqlen_q != seqlen_k for the bottom-right alignment.
    inputs = _inputs((2, 1000, 8, head_dim), (2, 1031, 2, head_dim), dtype)
    dout = random_tensor(2, 1000, 8, head_dim, dtype=torch.float64, device="cuda")
    _check(inputs, dout, dtype, causal=causal)


# deterministic=False (dQ summed with float atomics): bf16 only, a padded and the main head dim, so
# that the extra kernel builds stay within the device window's test step.
@pytest.mark.parametrize("head_dim", [80, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_large_atomic_dq(head_dim, causal):
    inputs = _inputs((2, 1000, 8, head_dim), (2, 1031, 2, head_dim), torch.bfloat16)
    dout = random_tensor(2, 1000, 8, head_dim, dtype=torch.float64, device="cuda")
    _check(inputs, dout, torch.bfloat16, deterministic=False, causal=causal)


def test_float32_uses_ieee_dots():
    # fp32 runs IEEE (not TF32) dots: it must meet the fp32 tolerance.
    inputs = _inputs((1, 515, 4, 64), (1, 515, 4, 64), torch.float32)
    _check(inputs, random_tensor(1, 515, 4, 64, dtype=torch.float64, device="cuda"), torch.float32, causal=True)


@pytest.mark.parametrize(
    "dtype,deterministic",
    [(torch.bfloat16, True), (torch.float16, True), (torch.bfloat16, False)],
    ids=["bfloat16", "float16", "bfloat16-atomic-dq"],
)
def test_varlen_and_window(dtype, deterministic):
    lengths = [1, 700, 33, 1290, 5]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    inputs = _inputs((sum(lengths), 4, 128), (sum(lengths), 4, 128), dtype)
    dout = random_tensor(sum(lengths), 4, 128, dtype=torch.float64, device="cuda")
    _check(inputs, dout, dtype, deterministic, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
    dense = _inputs((1, 2000, 4, 64), (1, 2000, 4, 64), dtype)
    _check(dense, random_tensor(1, 2000, 4, 64, dtype=torch.float64, device="cuda"), dtype, deterministic,
           window=(256, 16))


def test_dropout_bf16_is_reproducible_and_keeps_the_right_fraction():
    q, k, v = _inputs((2, 1024, 8, 128), (2, 1024, 8, 128), torch.bfloat16)
    torch.manual_seed(7)
    a = attention(q, k, v, causal=True, dropout_p=0.1)
    torch.manual_seed(7)
    b = attention(q, k, v, causal=True, dropout_p=0.1)
    assert torch.equal(a, b)
    with fastlm.use_backend("triton"):
        keep = attention_dropout_mask(q, k, 0.1)
    # 16.8M Bernoulli(0.9) draws: std 7e-5, so 0.001 is ~14 sigma yet catches a biased generator.
    assert abs(keep.float().mean().item() - 0.9) < 0.001


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_kvcache_long(dtype):
    batch, cache_len, n_heads, n_kv_heads, head_dim = 4, 8192, 32, 8, 128
    cache_seqlens = torch.tensor([8191, 3000, 1, 5000], dtype=torch.int32, device="cuda")
    k_cache = random_tensor(batch, cache_len, n_kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = random_tensor(batch, cache_len, n_kv_heads, head_dim, dtype=dtype, device="cuda")
    k_new = random_tensor(batch, 1, n_kv_heads, head_dim, dtype=dtype, device="cuda")
    v_new = random_tensor(batch, 1, n_kv_heads, head_dim, dtype=dtype, device="cuda")
    q = random_tensor(batch, 1, n_heads, head_dim, dtype=dtype, device="cuda")
    with fastlm.use_backend("triton"), poison_outputs():
        out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    for b, length in enumerate(cache_seqlens.tolist()):
        args = (q[b:b + 1], k_cache[b:b + 1, :length + 1], v_cache[b:b + 1, :length + 1])
        ref = attention_ref(*(t.double() for t in args), causal=True)
        assert_matches_reference(f"out[{b}]", out[b:b + 1], ref, attention_ref(*args, causal=True), dtype)
