"""Attention against a float64 reference on every backend that runs here (Triton through the interpreter).

Shapes stay small (the interpreter runs one program at a time) but cross several tile edges:
the interpreter's tiles are 32x16 / 16x32 (see ``_config``). Large shapes and bf16 Triton are
in tests/gpu/test_attention_cuda.py.
"""

import sys

import pytest
import torch

import fastlm
from fastlm._triton import interpreter_enabled
from fastlm.ops.attention import attention, attention_dropout_mask, attention_ref, attention_with_kvcache
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params

# Training attention (attention_fwd/bwd) runs on every backend; the cpp launchers hand fp16/bf16 and
# dropout to the torch ones, which their cpp-float16/bfloat16 params check. KV-cache decoding has no
# C++ kernel.
TRAIN_BACKENDS = cpu_backend_params()
TRAIN_FP32_BACKENDS = [p for p in TRAIN_BACKENDS if p.values[1] == torch.float32]
BACKENDS = [p for p in TRAIN_BACKENDS if p.values[0] != "cpp"]
TRITON_BACKENDS = [p for p in TRAIN_BACKENDS if p.values[0] == "triton"]
FP32_BACKENDS = [p for p in BACKENDS if p.values[1] == torch.float32]


def make_qkv(batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, dtype, packed=False):
    lead_q = (seqlen_q,) if packed else (batch, seqlen_q)
    lead_k = (seqlen_k,) if packed else (batch, seqlen_k)
    q = random_tensor(*lead_q, n_heads, head_dim, dtype=dtype)
    k = random_tensor(*lead_k, n_kv_heads, head_dim, dtype=dtype)
    v = random_tensor(*lead_k, n_kv_heads, head_dim, dtype=dtype)
    return q, k, v


def forward_backward(fn, inputs, dout):
    """fn on fresh leaf copies of inputs: (outputs tuple, input grads) for the loss sum(out * dout)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    (outs[0].double() * dout).sum().backward()
    return outs, [t.grad for t in leaves]


def check_against_reference(backend, dtype, inputs, dout, deterministic=True, **kwargs):
    """Output, LSE and dq/dk/dv of fastlm vs the fp64 reference, by the FlashAttention rule."""
    ref_outs, ref_grads = forward_backward(
        lambda *a: attention_ref(*a, return_lse=True, **kwargs), [t.double() for t in inputs], dout
    )
    base_outs, base_grads = forward_backward(lambda *a: attention_ref(*a, return_lse=True, **kwargs), inputs, dout)
    with fastlm.use_backend(backend), poison_outputs():
        outs, grads = forward_backward(
            lambda *a: attention(*a, return_lse=True, deterministic=deterministic, **kwargs), inputs, dout
        )
    (out, lse), (ref, ref_lse), (base, base_lse) = outs, ref_outs, base_outs
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_matches_reference("out", out, ref, base, dtype)
    # Rows that see no key: exactly zero output and +inf LSE (never NaN).
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert torch.isfinite(out).all()
    assert_matches_reference("lse", lse[~empty], ref_lse[~empty], base_lse[~empty], dtype)
    scales = cancellation_scales(inputs, dout, kwargs.get("softmax_scale"))
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert g.dtype == dtype
        assert_matches_reference(name, g, r, b, dtype, grad=True, scale=scales.get(name))
    return out, lse


def cancellation_scales(inputs, dout, softmax_scale):
    """Sizes of the terms that dq and dk cancel: ds = p * (dp - rowsum(p * dp)) with dp = dout . v.

    With one visible key, ds is exactly 0 in fp64 and in torch (p = 1), while a flash kernel's
    dp - delta leaves a rounding residue of |dp|'s size, so the floor is measured there.
    """
    q, k, v = (t.double() for t in inputs)
    group = q.shape[-2] // k.shape[-2]
    # All query/key pairs (across packed sequences too): an upper bound of the visible ones.
    dp = torch.einsum("...ihd,...jhd->...hij", dout, v.repeat_interleave(group, dim=-2)).abs().max().item()
    scale = softmax_scale or q.shape[-1] ** -0.5
    return {"dq": scale * dp * k.abs().max().item(), "dk": scale * dp * q.abs().max().item()}


# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, kwargs)
DENSE_CASES = {
    "len1": (2, 1, 1, 2, 2, 32, {}),
    "len37-d40-gqa-causal": (2, 37, 37, 4, 2, 40, {"causal": True}),
    # seqlen_q > seqlen_k, bottom-right causal: the first 63 queries see no key.
    "q100-k37-d64-causal": (1, 100, 37, 2, 2, 64, {"causal": True}),
    "q37-k129-d80-mqa-causal": (1, 37, 129, 4, 1, 80, {"causal": True}),
    # A scale above the default 1/sqrt(128) = 0.088, but not far above: in fp32 the backward's
    # recompute from the LSE adds roundings of size ulp(|scores|), so a very sharp softmax (e.g.
    # 0.3 here, scores up to ~25) puts fp32 dv at 3-4x torch's error (fp16/bf16 are unaffected).
    "len129-d128-scale": (1, 129, 129, 2, 2, 128, {"softmax_scale": 0.125}),
    "len100-d32-window": (1, 100, 100, 2, 2, 32, {"window": (17, 3)}),
    "q129-k64-window-left-causal": (1, 129, 64, 2, 1, 64, {"window": (10, -1), "causal": True}),
}


def check_dense_case(backend, dtype, case, deterministic=True):
    batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, kwargs = DENSE_CASES[case]
    inputs = make_qkv(batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, dtype)
    dout = random_tensor(batch, seqlen_q, n_heads, head_dim, dtype=torch.float64)
    out, _ = check_against_reference(backend, dtype, inputs, dout, deterministic, **kwargs)
    if case.startswith("q100-k37"):
        assert torch.equal(out[:, :63], torch.zeros_like(out[:, :63]))


@pytest.mark.parametrize("backend,dtype", TRAIN_BACKENDS)
@pytest.mark.parametrize("case", list(DENSE_CASES), ids=str)
def test_dense_matches_float64_reference(backend, dtype, case):
    check_dense_case(backend, dtype, case)


# (query lengths, key lengths, n_heads, n_kv_heads, head_dim, kwargs): very different lengths, including 1.
VARLEN_CASES = {
    "same-lengths-causal": ([1, 37, 5, 70], [1, 37, 5, 70], 2, 1, 32, {"causal": True}),
    "same-lengths-full": ([1, 37, 5, 70], [1, 37, 5, 70], 4, 2, 40, {}),
    "different-lengths-causal": ([3, 20, 1, 40], [10, 20, 7, 33], 2, 2, 64, {"causal": True}),
    "window": ([50, 1, 66], [50, 1, 66], 2, 2, 32, {"window": (8, 4)}),
}


def check_varlen_case(backend, dtype, case, deterministic=True):
    lengths_q, lengths_k, n_heads, n_kv_heads, head_dim, kwargs = VARLEN_CASES[case]
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    inputs = make_qkv(1, sum(lengths_q), sum(lengths_k), n_heads, n_kv_heads, head_dim, dtype, packed=True)
    dout = random_tensor(sum(lengths_q), n_heads, head_dim, dtype=torch.float64)
    _, lse = check_against_reference(
        backend, dtype, inputs, dout, deterministic, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kwargs
    )
    assert lse.shape == (n_heads, sum(lengths_q))


@pytest.mark.parametrize("backend,dtype", TRAIN_BACKENDS)
@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=str)
def test_varlen_matches_float64_reference(backend, dtype, case):
    check_varlen_case(backend, dtype, case)


# deterministic=False: the dK/dV kernel also adds dQ with float atomics (no dQ kernel).
@pytest.mark.parametrize("backend,dtype", TRITON_BACKENDS)
@pytest.mark.parametrize("case", [f"dense-{c}" for c in DENSE_CASES] + [f"varlen-{c}" for c in VARLEN_CASES], ids=str)
def test_atomic_dq_backward_matches_float64_reference(backend, dtype, case, monkeypatch):
    attn = sys.modules["fastlm.ops.attention"]
    monkeypatch.setattr(attn, "_attn_bwd_dq_kernel", None)  # it must not run: this backward has no dQ kernel
    kind, name = case.split("-", 1)
    check = check_dense_case if kind == "dense" else check_varlen_case
    check(backend, dtype, name, deterministic=False)


@pytest.mark.parametrize("backend,dtype", TRAIN_FP32_BACKENDS)
def test_varlen_never_attends_across_sequences(backend, dtype):
    # Changing the second sequence's keys must leave the first sequence's output untouched.
    q, k, v = make_qkv(1, 50, 50, 2, 2, 32, dtype, packed=True)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    k2, v2 = k.clone(), v.clone()
    k2[20:] += 1.0
    v2[20:] -= 2.0
    with fastlm.use_backend(backend):
        a = attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
        b = attention(q, k2, v2, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert torch.equal(a[:20], b[:20])
    assert not torch.equal(a[20:], b[20:])


@pytest.mark.parametrize("backend,dtype", TRAIN_FP32_BACKENDS)
def test_backward_is_deterministic(backend, dtype):
    inputs = make_qkv(1, 67, 67, 4, 2, 32, dtype)
    dout = random_tensor(1, 67, 4, 32, dtype=torch.float64)
    with fastlm.use_backend(backend):
        _, first = forward_backward(lambda *a: attention(*a, causal=True), inputs, dout)
        _, again = forward_backward(lambda *a: attention(*a, causal=True), inputs, dout)
        _, atomic = forward_backward(lambda *a: attention(*a, causal=True, deterministic=False), inputs, dout)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    # deterministic=False changes only how Triton sums dQ; dK and dV come from the same arithmetic.
    # The other backends have no atomics to choose: they run the same code either way.
    for name, a, b in zip(("dq", "dk", "dv"), first, atomic):
        assert torch.equal(a, b) or (backend == "triton" and name == "dq"), name


def test_torch_forward_skips_the_lse_and_any_backward_still_works():
    """Training on the torch backend saves no LSE (its backward reruns SDPA); a backward on the Triton
    backend after such a forward recomputes the LSE and gives the all-Triton gradients."""
    inputs = make_qkv(2, 37, 45, 4, 2, 40, torch.float32)
    dout = random_tensor(2, 37, 4, 40, dtype=torch.float64)
    saved = []

    def run(forward_backend, backward_backend):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with fastlm.use_backend(forward_backend):
                out = attention(*leaves, causal=True)
        with fastlm.use_backend(backward_backend):
            (out.double() * dout).sum().backward()
        return [t.grad for t in leaves]

    torch_grads = run("torch", "torch")
    assert any(t.dtype == torch.float32 and t.numel() == 0 for t in saved), "the torch forward saved an LSE"
    _, ref_grads = forward_backward(lambda *a: attention_ref(*a, causal=True), [t.double() for t in inputs], dout)
    for g, r in zip(torch_grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    if not interpreter_enabled():
        return
    mixed, triton = run("torch", "triton"), run("triton", "triton")
    for a, b in zip(mixed, triton):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the C++ kernel


# Shapes for the C++ kernel only (it is cheap to run; the interpreter is not): lengths across its
# 32-row/32-key tiles and 8-row strips, head dims 8 to 128 (every column-block mix of its GEMM:
# 8, 16, 16 + 8, 32, 32 + 8, 64 + 16, 128), GQA 4:1 and MQA, rows that see no key.
# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, kwargs)
CPP_DENSE_CASES = {
    "len7-d8-gqa4-causal": (3, 7, 7, 8, 2, 8, {"causal": True}),
    "len300-d64-mqa-causal": (1, 300, 300, 4, 1, 64, {"causal": True}),
    "q123-k300-d80-causal": (2, 123, 300, 2, 1, 80, {"causal": True}),
    # diag = -177: queries 0..171 see no key in the window [i - 197, i - 172].
    "q300-k123-d40-window-empty-rows": (1, 300, 123, 2, 2, 40, {"window": (20, 5)}),
    "len123-d128-gqa4-full": (1, 123, 123, 8, 2, 128, {}),
    "len1-d128": (2, 1, 1, 2, 1, 128, {}),
    "q7-k123-d64-window-left": (2, 7, 123, 2, 2, 64, {"window": (30, -1)}),
    # A band a few keys wide: every 8-row strip and 8-key dK/dV strip sees only part of its tile,
    # some strips none of it. Head dim 16: one 16-lane column block, nothing else.
    "len45-d16-window-narrow": (2, 45, 45, 2, 1, 16, {"window": (2, 1)}),
    # Head dim 24: a 16-lane block then an 8-lane one; 25 queries see no key (whole empty strips).
    "q70-k45-d24-causal": (1, 70, 45, 4, 2, 24, {"causal": True}),
}


@pytest.mark.parametrize("case", list(CPP_DENSE_CASES), ids=str)
def test_cpp_kernel_matches_float64_reference(case):
    batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, kwargs = CPP_DENSE_CASES[case]
    inputs = make_qkv(batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, torch.float32)
    dout = random_tensor(batch, seqlen_q, n_heads, head_dim, dtype=torch.float64)
    out, lse = check_against_reference("cpp", torch.float32, inputs, dout, **kwargs)
    if case.endswith("empty-rows"):
        assert torch.equal(out[:, :172], torch.zeros_like(out[:, :172]))
        assert torch.isinf(lse[..., :172]).all() and torch.isfinite(lse[..., 172:]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cpp_kernel_varlen_with_empty_and_length1_sequences(causal):
    # An empty query sequence, one with no keys (its queries output zeros), lengths 1 and > 64.
    lengths_q, lengths_k = [0, 1, 123, 7, 5], [5, 1, 123, 0, 70]
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    inputs = make_qkv(1, sum(lengths_q), sum(lengths_k), 4, 1, 40, torch.float32, packed=True)
    dout = random_tensor(sum(lengths_q), 4, 40, dtype=torch.float64)
    out, lse = check_against_reference("cpp", torch.float32, inputs, dout, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                       causal=causal)
    no_keys = slice(124, 131)  # the sequence with 7 queries and no key
    assert torch.equal(out[no_keys], torch.zeros_like(out[no_keys]))
    assert torch.isinf(lse[:, no_keys]).all()


def test_cpp_backward_reads_the_forward_lse():
    """The cpp forward saves the LSE and its backward uses it (no forward recompute); a forward on
    the torch backend saves none, and the cpp backward then recomputes it: the same gradients."""
    inputs = make_qkv(2, 37, 45, 4, 2, 40, torch.float32)
    dout = random_tensor(2, 37, 4, 40, dtype=torch.float64)

    def run(forward_backend):
        saved = []
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with fastlm.use_backend(forward_backend):
                out = attention(*leaves, causal=True)
        with fastlm.use_backend("cpp"):
            (out.double() * dout).sum().backward()
        has_lse = any(t.dtype == torch.float32 and t.shape == (2, 4, 37) for t in saved)
        return has_lse, [t.grad for t in leaves]

    (cpp_lse, cpp_grads), (torch_lse, mixed_grads) = run("cpp"), run("torch")
    assert cpp_lse and not torch_lse
    # Not bit-equal: the backward's rowsum(dO * O) reads each forward's own output.
    for a, b in zip(cpp_grads, mixed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cpp_hands_what_it_does_not_take_to_torch_without_an_lse(dtype):
    """fp16/bf16 on the cpp backend run SDPA, whose backward needs no LSE: none is computed for training."""
    leaves = [t.requires_grad_() for t in make_qkv(1, 9, 9, 2, 2, 16, dtype)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with fastlm.use_backend("cpp"):
            attention(*leaves, causal=True)
    assert any(t.dtype == torch.float32 and t.numel() == 0 for t in saved)


def test_cpp_runs_every_fp32_forward_without_dropout(monkeypatch):
    """On the cpp backend the C++ forward runs fp32 attention full or causal, with or without the LSE
    (it measured faster than SDPA in each case), and matches the reference."""
    attn_module = sys.modules[attention.__module__]
    inputs = make_qkv(2, 37, 37, 4, 2, 40, torch.float32)
    calls = []
    real = attn_module.cpu_extension

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real(), name)

    monkeypatch.setattr(attn_module, "cpu_extension", Spy)
    with torch.no_grad(), fastlm.use_backend("cpp"):
        full = attention(*inputs)
        full_lse, _ = attention(*inputs, return_lse=True)
        causal = attention(*inputs, causal=True)
    assert calls == ["attention_fwd"] * 3
    double = [t.double() for t in inputs]
    for out, ref in ((full, attention_ref(*double)), (full_lse, attention_ref(*double)),
                     (causal, attention_ref(*double, causal=True))):
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_cpp_dropout_runs_the_torch_launchers():
    inputs = make_qkv(1, 20, 20, 2, 1, 16, torch.float32)
    dout = random_tensor(1, 20, 2, 16, dtype=torch.float64)
    results = []
    for name in ("torch", "cpp"):
        torch.manual_seed(7)
        with fastlm.use_backend(name), poison_outputs():
            results.append(forward_backward(lambda *a: attention(*a, causal=True, dropout_p=0.2), inputs, dout))
    (torch_outs, torch_grads), (cpp_outs, cpp_grads) = results
    for a, b in zip((*torch_outs, *torch_grads), (*cpp_outs, *cpp_grads)):
        assert torch.equal(a, b)


def test_cpp_kernel_checks_its_inputs():
    """The C++ entry points reject what the public function would never pass (a second line of defence)."""
    from fastlm.extension import cpu_extension

    q, k, v = make_qkv(1, 8, 8, 2, 2, 16, torch.float32)
    out = torch.empty_like(q)
    ext = cpu_extension()
    with pytest.raises(RuntimeError, match="k must be float32"):
        ext.attention_fwd(q, k.double(), v, out, None, None, None, 8, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        ext.attention_fwd(q.transpose(1, 2), k, v, out, None, None, None, 8, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be a contiguous CPU int32"):
        cu = torch.tensor([0, 8])
        ext.attention_fwd(q[0], k[0], v[0], out[0], None, cu, cu.int(), 8, 0.25, -1, -1)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ext.attention_fwd(q, k, v, out, torch.empty(1, 2, 7), None, None, 8, 0.25, -1, -1)


# ----------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend,dtype", FP32_BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic-dq"])
def test_dropout_matches_reference_given_its_mask(backend, dtype, causal, deterministic):
    p = 0.3
    inputs = make_qkv(1, 45, 64, 4, 2, 32, dtype)
    dout = random_tensor(1, 45, 4, 32, dtype=torch.float64)
    with fastlm.use_backend(backend):
        torch.manual_seed(1234)
        keep = attention_dropout_mask(inputs[0], inputs[1], p)
        torch.manual_seed(1234)
        with poison_outputs():
            (out,), grads = forward_backward(
                lambda *a: attention(*a, causal=causal, dropout_p=p, deterministic=deterministic), inputs, dout
            )
        torch.manual_seed(1234)
        again = attention(*inputs, causal=causal, dropout_p=p)
        other_seed = attention(*inputs, causal=causal, dropout_p=p)
    assert torch.equal(out, again), "the same torch seed must give the same output"
    assert not torch.equal(out, other_seed), "the next call must draw a new mask"
    # Kept fraction: 4*45*64 = 11520 Bernoulli(0.7) draws, std ~0.0043; 6 sigma is 0.026.
    assert abs(keep.float().mean().item() - (1 - p)) < 0.026
    kwargs = dict(causal=causal, dropout_p=p, dropout_mask=keep)
    (ref,), ref_grads = forward_backward(lambda *a: attention_ref(*a, **kwargs), [t.double() for t in inputs], dout)
    (base,), base_grads = forward_backward(lambda *a: attention_ref(*a, **kwargs), inputs, dout)
    assert_matches_reference("out", out, ref, base, dtype)
    for name, g, r, b in zip(("dq", "dk", "dv"), grads, ref_grads, base_grads):
        assert_matches_reference(name, g, r, b, dtype, grad=True)


# ----------------------------------------------------------------------------- KV-cache decoding


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("n_new", [0, 1, 3], ids=lambda n: f"new{n}")
def test_kvcache_matches_full_attention(backend, dtype, n_new):
    batch, cache_len, n_heads, n_kv_heads, head_dim = 3, 100, 4, 2, 64
    cache_seqlens = torch.tensor([37, 0, 97 - n_new], dtype=torch.int32)
    if n_new == 0:
        cache_seqlens[1] = 5  # no new token: every sequence needs a key to attend to
    k_cache = random_tensor(batch, cache_len, n_kv_heads, head_dim, dtype=dtype)
    v_cache = random_tensor(batch, cache_len, n_kv_heads, head_dim, dtype=dtype)
    k_new = random_tensor(batch, n_new, n_kv_heads, head_dim, dtype=dtype) if n_new else None
    v_new = random_tensor(batch, n_new, n_kv_heads, head_dim, dtype=dtype) if n_new else None
    q = random_tensor(batch, max(n_new, 1), n_heads, head_dim, dtype=dtype)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    with fastlm.use_backend(backend), poison_outputs():
        out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    for b, length in enumerate(cache_seqlens.tolist()):
        total = length + n_new
        # The new keys/values were written at the sequence's end; nothing else changed.
        if n_new:
            assert torch.equal(k_cache[b, length:total], k_new[b])
            assert torch.equal(v_cache[b, length:total], v_new[b])
        assert torch.equal(k_cache[b, :length], k_before[b, :length])
        assert torch.equal(k_cache[b, total:], k_before[b, total:])
        assert torch.equal(v_cache[b, :length], v_before[b, :length])
        assert torch.equal(v_cache[b, total:], v_before[b, total:])
        args = (q[b:b + 1], k_cache[b:b + 1, :total], v_cache[b:b + 1, :total])
        ref = attention_ref(*(t.double() for t in args), causal=True)
        base = attention_ref(*args, causal=True)
        assert_matches_reference(f"out[{b}]", out[b:b + 1], ref, base, dtype)


# ----------------------------------------------------------------------------- bad input


def _qkv():
    return make_qkv(2, 8, 8, 4, 2, 16, torch.float32)


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda q, k, v: attention(q[0], k, v), ValueError, "q must have 4 dims"),
        (lambda q, k, v: attention(q, k[:, :, [0, 1, 1]], v[:, :, [0, 1, 1]]), ValueError,
         "multiple of k/v's head count 3"),
        (lambda q, k, v: attention(q, k[..., :8], v[..., :8]), ValueError, "k's head dim 8 must match"),
        (lambda q, k, v: attention(q, k, v[:, :4]), ValueError, "k and v must have the same shape"),
        (lambda q, k, v: attention(q[..., :12], k[..., :12], v[..., :12]), ValueError, "multiple of 8"),
        (lambda q, k, v: attention(*(torch.zeros(1, 2, 2, 264) for _ in range(3))), ValueError, r"\[8, 256\]"),
        (lambda q, k, v: attention(q, k.half(), v.half()), TypeError, "k must have q's dtype"),
        (lambda q, k, v: attention(q.double(), k.double(), v.double()), TypeError, "q must be float32"),
        (lambda q, k, v: attention(q, k.to("meta"), v.to("meta")), ValueError, "k is on meta"),
        (lambda q, k, v: attention(q, k[:1], v[:1]), ValueError, "same batch size"),
        (lambda q, k, v: attention(q, k, v, window=(-2, 0)), ValueError, "window sizes must be >= 0"),
        (lambda q, k, v: attention(q, k, v, window=5), TypeError, r"window must be a \(left, right\)"),
        (lambda q, k, v: attention(q, k, v, dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
        (lambda q, k, v: attention(q, k, v, softmax_scale=-1.0), ValueError, "softmax_scale must be a positive"),
        (lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens_q=_cu(0, 8)), ValueError, "both cu_seqlens"),
        (lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens_q=_cu(0, 8, dtype=torch.int64),
                                   cu_seqlens_k=_cu(0, 8)), TypeError, "cu_seqlens_q must be int32"),
        (lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens_q=_cu(0, 6, 3, 8), cu_seqlens_k=_cu(0, 2, 4, 8)),
         ValueError, "never decrease"),
        (lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens_q=_cu(0, 7), cu_seqlens_k=_cu(0, 8)),
         ValueError, r"cu_seqlens_q\[-1\] = 7 must equal the packed token count 8"),
        (lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens_q=_cu(0, 8), cu_seqlens_k=_cu(0, 4, 8)),
         ValueError, "same number of sequences"),
        (lambda q, k, v: attention(q[0], k[0], v[0], cu_seqlens_q=_cu(0, 8), cu_seqlens_k=_cu(0, 8), max_seqlen_q=4),
         ValueError, "max_seqlen_q=4 is smaller"),
        (lambda q, k, v: attention_with_kvcache(q, k, v, _cu(0, 0, dtype=torch.int64)), TypeError, "int32"),
        (lambda q, k, v: attention_with_kvcache(q, k, v, _cu(7, 0), k[:, :2], v[:, :2]), ValueError,
         r"must lie in \[0, 8\]"),
        (lambda q, k, v: attention_with_kvcache(q, k, v, _cu(0, 0), k[:, :2]), ValueError, "given together"),
    ],
    ids=[
        "rank", "head-divisibility", "head-dim-mismatch", "kv-shape", "head-dim-not-8", "head-dim-over-256",
        "dtype-mismatch", "float64", "device", "batch", "negative-window", "window-type", "dropout-1",
        "negative-scale", "cu-missing", "cu-int64", "cu-decreasing", "cu-total", "cu-count", "max-seqlen",
        "kvcache-seqlens-dtype", "kvcache-overflow", "kvcache-k-without-v",
    ],
)
def test_bad_input_raises_before_launch(call, error, match):
    with pytest.raises(error, match=match):
        call(*_qkv())


def test_bad_input_does_not_touch_the_cache():
    q, k, v = _qkv()
    before = k.clone()
    with pytest.raises(ValueError):
        attention_with_kvcache(q, k, v, _cu(7, 0), k[:, :2] + 1, v[:, :2])
    assert torch.equal(k, before)


# ----------------------------------------------------------------------------- torch.library, compile, module


# The registration is the same for every backend: packed input once, on the cheaper torch backend.
@pytest.mark.parametrize(
    "backend,dtype,varlen",
    [pytest.param(*p.values, False, id=f"{p.id}-dense", marks=p.marks) for p in TRAIN_FP32_BACKENDS]
    + [pytest.param(name, torch.float32, True, id=f"{name}-float32-varlen") for name in ("torch", "cpp")],
)
def test_opcheck(backend, dtype, varlen):
    if varlen:
        q, k, v = make_qkv(1, 21, 21, 4, 2, 16, dtype, packed=True)
        cu = torch.tensor([0, 1, 21], dtype=torch.int32)
        extra = (cu, cu, 20, 20)
    else:
        # (batch, heads, seqlen, headdim) transposed, as from an SDPA-style model: the outputs are
        # contiguous whatever the inputs' strides, and the fakes must say so.
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(2, 19, 23, 4, 2, 16, dtype))
        extra = (None, None, 19, 23)
    for t in (q, k, v):
        t.requires_grad_()
    deterministic = varlen  # both values of the backward's flag go through the registration
    with fastlm.use_backend(backend):
        torch.library.opcheck(
            torch.ops.fastlm.attention_fwd.default, (q, k, v, *extra, 0.25, 5, 0, 0.0, 0, True, deterministic)
        )


@pytest.mark.parametrize("backend,dtype", FP32_BACKENDS)
def test_opcheck_kvcache(backend, dtype):
    q = random_tensor(2, 1, 4, 16)
    k_cache, v_cache = random_tensor(2, 20, 2, 16), random_tensor(2, 20, 2, 16)
    k_new, v_new = random_tensor(2, 1, 2, 16), random_tensor(2, 1, 2, 16)
    seqlens = torch.tensor([3, 17], dtype=torch.int32)
    with fastlm.use_backend(backend):
        torch.library.opcheck(
            torch.ops.fastlm.attention_kvcache.default, (q, k_cache, v_cache, seqlens, k_new, v_new, 0.25, True)
        )


def _module(**kwargs):
    torch.manual_seed(0)
    return fastlm.nn.Attention(64, n_heads=4, n_kv_heads=2, **kwargs)


def test_module_matches_reference_and_packed_input():
    mod = _module()
    x = random_tensor(2, 19, 64)
    y = mod(x)
    qkv = mod.qkv(x).view(2, 19, 8, 16)
    y_ref = mod.out(attention_ref(qkv[..., :4, :], qkv[..., 4:6, :], qkv[..., 6:, :], causal=True).reshape(2, 19, 64))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    # The same two sequences packed give the same tokens.
    cu = torch.tensor([0, 19, 38], dtype=torch.int32)
    torch.testing.assert_close(mod(x.reshape(38, 64), cu_seqlens=cu, max_seqlen=19), y.reshape(38, 64))


def test_module_rope_hook_is_applied():
    calls = []

    def rope(q, k):
        calls.append((q.shape, k.shape))
        return q * 2, k

    mod = _module(rope=rope)
    x = random_tensor(1, 5, 64)
    mod(x)
    assert calls == [(torch.Size([1, 5, 4, 16]), torch.Size([1, 5, 2, 16]))]


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    mod = torch.nn.Sequential(_module(), torch.nn.Linear(64, 8))
    x = random_tensor(2, 11, 64)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), mod(x))
    compiled(x).sum().backward()
    assert mod[0].qkv.weight.grad is not None and torch.isfinite(mod[0].qkv.weight.grad).all()


@pytest.mark.parametrize("max_seqlen", [None, 16], ids=["max-read", "max-given"])
def test_torch_compile_fullgraph_varlen(max_seqlen):
    # The values of cu_seqlens are checked (and the maxima read, when not given) inside the op, where
    # they are real even under torch.compile: the compiled call matches eager bit for bit and checks too.
    torch._dynamo.reset()
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 20, 20, 4, 2, 16, torch.float32, packed=True))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)

    def step(q, k, v, cu):
        out = attention(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen,
                        max_seqlen_k=max_seqlen)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, cu)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected = step(q, k, v, cu)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip(grads, torch.autograd.grad(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] = 19 must equal the packed token count 20"):
        compiled(q, k, v, torch.tensor([0, 7, 19], dtype=torch.int32))


def test_torch_compile_fullgraph_kvcache():
    torch._dynamo.reset()
    q = random_tensor(2, 1, 4, 16)
    k_new, v_new = random_tensor(2, 1, 2, 16), random_tensor(2, 1, 2, 16)
    seqlens = torch.tensor([3, 17], dtype=torch.int32)
    caches = [(random_tensor(2, 20, 2, 16), random_tensor(2, 20, 2, 16)) for _ in range(2)]
    caches[1] = tuple(c.clone() for c in caches[0])
    compiled = torch.compile(attention_with_kvcache, fullgraph=True, backend="aot_eager")
    got = compiled(q, *caches[0], seqlens, k_new, v_new)
    expected = attention_with_kvcache(q, *caches[1], seqlens, k_new, v_new)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for a, b in zip(*caches):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 20\]"):
        compiled(q, *caches[0], torch.tensor([3, 20], dtype=torch.int32), k_new, v_new)


@pytest.mark.parametrize("backend,dtype", FP32_BACKENDS)
def test_kvcache_non_causal_sees_every_cached_key(backend, dtype):
    q = random_tensor(2, 3, 4, 32)
    k_cache, v_cache = random_tensor(2, 50, 2, 32), random_tensor(2, 50, 2, 32)
    k_new, v_new = random_tensor(2, 3, 2, 32), random_tensor(2, 3, 2, 32)
    cache_seqlens = torch.tensor([20, 41], dtype=torch.int32)
    with fastlm.use_backend(backend), poison_outputs():
        out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal=False)
    for b, length in enumerate((23, 44)):
        args = (q[b:b + 1], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length])
        ref = attention_ref(*(t.double() for t in args))
        assert_matches_reference(f"out[{b}]", out[b:b + 1], ref, attention_ref(*args), dtype)


@pytest.mark.parametrize("backend,dtype", FP32_BACKENDS)
def test_kvcache_query_that_sees_no_key_outputs_zeros(backend, dtype):
    """Ragged lengths in one call (the torch backend masks the batch at once): row 0 holds one key,
    so its first two of three bottom-right-aligned causal queries see none; row 1 sees its keys."""
    q = random_tensor(2, 3, 4, 16)
    k_cache, v_cache = random_tensor(2, 12, 2, 16), random_tensor(2, 12, 2, 16)
    cache_seqlens = torch.tensor([1, 9], dtype=torch.int32)
    with fastlm.use_backend(backend), poison_outputs():
        out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    for b, (rows, length) in enumerate(((slice(2, 3), 1), (slice(0, 3), 9))):
        args = (q[b:b + 1, rows], k_cache[b:b + 1, :length], v_cache[b:b + 1, :length])
        ref = attention_ref(*(t.double() for t in args), causal=True)
        assert_matches_reference(f"out[{b}]", out[b:b + 1, rows], ref, attention_ref(*args, causal=True), dtype)


@pytest.mark.parametrize("backend,dtype", FP32_BACKENDS)
def test_kvcache_ignores_whatever_lies_past_each_length(backend, dtype):
    """Slots past a sequence's length are unwritten memory in a preallocated cache: NaN there must
    not reach the output (ragged lengths: the torch backend attends over the batch at once)."""
    q = random_tensor(3, 1, 4, 16)
    k_cache, v_cache = random_tensor(3, 20, 2, 16), random_tensor(3, 20, 2, 16)
    k_new, v_new = random_tensor(3, 1, 2, 16), random_tensor(3, 1, 2, 16)
    cache_seqlens = torch.tensor([4, 17, 9], dtype=torch.int32)
    for b, length in enumerate(cache_seqlens.tolist()):
        k_cache[b, length:] = float("nan")
        v_cache[b, length:] = float("nan")
    with fastlm.use_backend(backend), poison_outputs():
        out = attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    for b, length in enumerate(cache_seqlens.tolist()):
        args = (q[b:b + 1], k_cache[b:b + 1, :length + 1], v_cache[b:b + 1, :length + 1])
        ref = attention_ref(*(t.double() for t in args), causal=True)
        assert_matches_reference(f"out[{b}]", out[b:b + 1], ref, attention_ref(*args, causal=True), dtype)
