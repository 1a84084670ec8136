"""Scaled dot-product attention, flash style: dense, causal, GQA/MQA, packed sequences,
sliding windows, dropout, and KV-cache decoding.

    out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, h // group]) * v[b, j, h // group]

over the keys j that query i may see. Layout ``(batch, seqlen, nheads, headdim)`` as
FlashAttention's ``flash_attn_func``; with ``cu_seqlens_q/k`` the sequences are packed
``(total_tokens, nheads, headdim)`` and never attend across a boundary.

Visibility: ``diag = seqlen_k - seqlen_q`` aligns the last query with the last key (the
bottom-right corner, as FlashAttention >= 2.1). Query i sees key j when
``i + diag - left <= j <= i + diag + right``; ``causal`` is ``right = 0``, and -1 means
unbounded. A query that sees no key outputs zeros and its log-sum-exp is ``+inf`` (as in
FlashAttention: the backward's ``exp(s - lse)`` is then 0, never NaN).

Triton: the forward keeps a running max and sum per query row (online softmax, fp32
accumulators) and visits only the key blocks a query block can see, masking only the
blocks on the edges of the visible band. The backward recomputes the probabilities from
the saved log-sum-exp, after a small kernel forms ``delta = rowsum(dO * O)`` per query row. By
default (``deterministic=True``) in two passes with no atomics: one over query blocks for dQ,
then one over key blocks for dK/dV, each program looping over every query head of its key/value
head. ``deterministic=False`` runs FlashAttention-2's scheme instead: the dK/dV kernel also adds
each step's dQ share into an fp32 buffer with float atomics, so the scores and dP are formed
once (5 matmuls per score tile instead of 7) at the price of an order of summation that varies
from run to run. It is opt-in until a GPU run measures it faster
(``benchmarks/gpu_attention_quick.py`` and the tile sweep time both). Dropout draws
Philox numbers in the kernel from a seed taken from the torch RNG; the backward regenerates them.

CPU (``cpp`` backend, the default there): a C++ flash kernel (csrc/cpu/attention.cpp) for fp32
without dropout, forward (online softmax over key tiles, writing the LSE) and backward from the
saved LSE (no forward recompute; dK/dV summed over each GQA group without atomics, so
deterministic). Other calls on the cpp backend (fp16/bf16, dropout) run the torch launchers,
decided per call by ``_cpp_takes``; the kernel also needs no LSE from the forward then. An fp32
forward that keeps no LSE (inference) runs the C++ kernel too, full or masked: it measured 1.26-1.63x
faster than SDPA on full attention and 1.95-2.9x on causal (``benchmarks/attention_cpu_forward_ab.py``,
``benchmarks/results/cpu-2026-12-02-ops/``).

CPU (``torch`` backend): ``torch.nn.functional.scaled_dot_product_attention`` (a fused
flash kernel on CPU) with a boolean mask and ``enable_gqa``; packed sequences run one
sequence per call (no block-diagonal mask to build). Its backward recomputes the forward
and runs SDPA's own fused backward. The log-sum-exp (needed only by the Triton and C++ backwards
and ``return_lse``, so skipped otherwise) is computed separately, a query chunk at a time.

Decoding (``attention_with_kvcache``): the new keys/values are written into the cache at
each sequence's length, then the forward kernel runs split along the key axis (flash
decoding) so that one query token still fills the GPU, and a combine kernel merges the
splits by their log-sum-exp.
"""

import inspect
import math

import torch
import torch.nn.functional as F

from fastlm import alloc, backend, eager
from fastlm._triton import tl, triton
from fastlm.extension import cpu_extension
from fastlm.kernel_registry import Variant, register_kernel

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634
# Query rows per chunk when the torch backend forms the log-sum-exp (bounds its memory).
_LSE_CHUNK = 1024


# ----------------------------------------------------------------------------- Triton kernels

# Kernel variants the compile gate builds (see fastlm.kernel_registry), taken from the launchers'
# own choices: every dtype and the common head dims, causal and not, plus one each of the
# optional paths (window, packed sequences, dropout, decoding).
_VARIANT_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_VARIANT_HEAD_DIMS = (64, 128, 256)


def _variant(kernel, kind, dtype, head_dim, pointers, floats=(), nones=(), label="", **constexprs):
    """One Variant: ``pointers`` maps pointer args to element types (None: the input dtype); other ints are i32."""
    dt = _VARIANT_DTYPES[dtype]
    cfg = _config(kind, head_dim, dtype, "cuda")
    signature, fixed = {}, {}
    for name, param in inspect.signature(getattr(kernel, "fn", kernel)).parameters.items():
        if param.annotation is tl.constexpr:
            continue
        if name in nones:
            fixed[name] = None
        elif name in pointers:
            signature[name] = "*" + (pointers[name] or dt)
        else:
            signature[name] = "fp32" if name in floats else "i32"
    fixed.update(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), DOT_PRECISION=_precision(dtype),
                 BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **constexprs)
    # Triton's launcher specializes every integer argument that is a multiple of 16. The strides of the
    # contiguous (..., heads, head_dim) tensors are multiples of the head dim, so of 16 at every variant's
    # head dim: built without that, the gate would measure a kernel that never runs (row starts of unknown
    # alignment, so scalar loads with a 64-bit pointer per element: hundreds of bytes of spill that the
    # launched kernel does not have). LSE strides follow seqlen_q and stay unspecialized.
    aligned = tuple(name for name in signature if name.startswith(("stride_q", "stride_k", "stride_v", "stride_o")))
    # fp32 dots are exact IEEE (no tensor cores); fp16/bf16 must issue HGMMA.
    return Variant(signature, fixed, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                   label=f"{dt} d={head_dim} {label}".strip(), divisible_by_16=aligned,
                   tensor_cores=None if dtype != torch.float32 else False)


def _train_variants(kernel, kind, pointers, floats, nones=(), tag="", **constexprs):
    """Dense full/causal over dtypes and head dims, then a window, a packed and a dropout variant.
    ``nones`` are pointer args passed as None; ``tag`` ends every label; ``constexprs`` are fixed."""
    def flags(causal=False, left=False, varlen=False, dropout=False):
        return dict(MASK_LEFT=left, MASK_RIGHT=causal, HAS_DROPOUT=dropout, IS_VARLEN=varlen, **constexprs)

    def label(text):
        return f"{text} {tag}".strip()

    dense = dict(nones=("CU_Q", "CU_K", "K_LENS", *nones))
    extra = {"HAS_K_LENS": False} if kind == "fwd" else {}
    for dtype in _VARIANT_DTYPES:
        for head_dim in _VARIANT_HEAD_DIMS:
            for causal in (False, True):
                yield _variant(kernel, kind, dtype, head_dim, pointers, floats,
                               label=label("causal" if causal else "full"), **dense, **flags(causal), **extra)
    for head_dim in (64, 128):
        yield _variant(kernel, kind, torch.bfloat16, head_dim, pointers, floats, label=label("window"),
                       **dense, **flags(True, left=True), **extra)
        yield _variant(kernel, kind, torch.bfloat16, head_dim, {**pointers, "CU_Q": "i32", "CU_K": "i32"}, floats,
                       nones=("K_LENS", *nones), label=label("varlen causal"), **flags(True, varlen=True), **extra)
    yield _variant(kernel, kind, torch.bfloat16, 128, pointers, floats, label=label("dropout causal"),
                   **dense, **flags(True, dropout=True), **extra)


_FLOAT_ARGS = ("qk_scale", "sm_scale", "dropout_p")



@triton.jit
def _dropout_keep(seed, rng_rows, cols, dropout_p):
    """Keep-mask of one tile: one Philox draw per (row, key), the row being the LSE's index."""
    return tl.rand(seed, rng_rows[:, None] + cols[None, :].to(tl.int64)) >= dropout_p


@triton.jit
def _sequence_bounds(CU_Q, CU_K, b, seqlen_q_dense, seqlen_k_dense, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence ``b``: its rows in the packed tensors, or the dense sizes."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        seqlen_q = seqlen_q_dense
        seqlen_k = seqlen_k_dense
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _visible(rows, cols, seqlen_k, diag, win_left, win_right, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr):
    """(rows x cols) mask: the key exists and lies in the row's window (causal is win_right = 0)."""
    # rows >= 0 always holds: it only broadcasts the mask to the full tile.
    ok = (cols[None, :] < seqlen_k) & (rows[:, None] >= 0)
    if MASK_RIGHT:
        ok &= cols[None, :] <= rows[:, None] + diag + win_right
    if MASK_LEFT:
        ok &= cols[None, :] >= rows[:, None] + diag - win_left
    return ok


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
    lo, hi, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
    MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(K_ptr + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_visible(rows, cols, seqlen_k, diag, win_left, win_right, MASK_LEFT, MASK_RIGHT),
                          qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_rows, cols, dropout_p), p, 0.0)
        v = tl.load(V_ptr + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K, K_LENS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_o_split, stride_lb, stride_lh, stride_l_split,
    seqlen_q_dense, seqlen_k_dense, n_heads, group, qk_scale, win_left, win_right, split_size,
    dropout_p, seed, rng_cols,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_K_LENS: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # grid: (query blocks, batch * heads, key splits). One split covers every key unless decoding.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // group
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, seqlen_q_dense, seqlen_k_dense, IS_VARLEN)
    if HAS_K_LENS:  # decoding (dense layout only): each sequence's cache length
        seqlen_k = tl.load(K_LENS + b)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    offs_m = tl.arange(0, BLOCK_M)
    rows = m0 + offs_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < seqlen_q
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + (q_start + rows)[:, None].to(tl.int64) * stride_qs
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    K_ptr = K + b.to(tl.int64) * stride_kb + kvh * stride_kh + k_start.to(tl.int64) * stride_ks
    V_ptr = V + b.to(tl.int64) * stride_vb + kvh * stride_vh + k_start.to(tl.int64) * stride_vs
    lse_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
    rng_rows = lse_off * rng_cols

    # Keys this query block can see: [lo, hi); of those, [full_lo, full_hi) need no mask.
    lo = split * split_size
    hi = tl.minimum(seqlen_k, lo + split_size)
    full_hi = hi // BLOCK_N * BLOCK_N
    if MASK_RIGHT:
        hi = tl.minimum(hi, m0 + BLOCK_M + diag + win_right)
        full_hi = tl.minimum(full_hi, (m0 + diag + win_right + 1) // BLOCK_N * BLOCK_N)
    if MASK_LEFT:
        lo = tl.maximum(lo, (m0 + diag - win_left) // BLOCK_N * BLOCK_N)
        full_lo = (m0 + BLOCK_M - 1 + diag - win_left + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        full_lo = lo
    lo = tl.maximum(lo, 0)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
        lo, full_lo, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
        True, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, BLOCK_N, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
        full_lo, full_hi, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
        False, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, BLOCK_N, DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
        full_hi, hi, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
        True, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, BLOCK_N, DOT_PRECISION,
    )
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    # Base-2 LSE of the scaled scores (qk * scale * log2(e)), the units the backward recomputes in,
    # so that no conversion rounds between them; +inf for rows that see no key (see the module docstring).
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_ptrs = (O + split.to(tl.int64) * stride_o_split + b.to(tl.int64) * stride_ob + h * stride_oh
              + (q_start + rows)[:, None].to(tl.int64) * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + split.to(tl.int64) * stride_l_split + lse_off, lse, mask=row_ok)


def _fwd_variants():
    pointers = {"Q": None, "K": None, "V": None, "O": None, "LSE": "fp32"}
    yield from _train_variants(_attn_fwd_kernel, "fwd", pointers, _FLOAT_ARGS)
    # Decoding: per-sequence key lengths, fp32 partial outputs, one variant per causal-ness pair.
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            yield _variant(
                _attn_fwd_kernel, "decode", dtype, head_dim, {**pointers, "O": "fp32", "K_LENS": "i32"}, _FLOAT_ARGS,
                nones=("CU_Q", "CU_K"), label="decode", IS_VARLEN=False, HAS_K_LENS=True, MASK_LEFT=False,
                MASK_RIGHT=True, HAS_DROPOUT=False,
            )


# No variant spills once built with the strides' 16-divisibility the launcher gives them (see _variant).
register_kernel(_attn_fwd_kernel, variants=_fwd_variants, tensor_cores=True)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
    lo, hi, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
    MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols[:, None] < seqlen_k) & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(K_ptr + cols[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V_ptr + cols[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            qk = tl.where(_visible(rows, cols, seqlen_k, diag, win_left, win_right, MASK_LEFT, MASK_RIGHT),
                          qk, float("-inf"))
        p = tl.exp2(qk - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp = tl.where(_dropout_keep(seed, rng_rows, cols, dropout_p), dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_lb, stride_lh,
    seqlen_q_dense, seqlen_k_dense, n_heads, group, sm_scale, qk_scale, win_left, win_right,
    dropout_p, seed, rng_cols,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # DO and DQ share q's strides (the op makes them contiguous alike).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // group
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, seqlen_q_dense, seqlen_k_dense, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = rows < seqlen_q
    mask = row_ok[:, None] & d_ok[None, :]
    row_off = b.to(tl.int64) * stride_qb + h * stride_qh + (q_start + rows)[:, None].to(tl.int64) * stride_qs
    q = tl.load(Q + row_off + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + row_off + offs_d[None, :], mask=mask, other=0.0)
    lse_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    # Rows past the end load lse = +inf: their probabilities are 0.
    lse2 = tl.load(LSE + lse_off, mask=row_ok, other=float("inf"))
    rng_rows = lse_off * rng_cols
    K_ptr = K + b.to(tl.int64) * stride_kb + kvh * stride_kh + k_start.to(tl.int64) * stride_ks
    V_ptr = V + b.to(tl.int64) * stride_vb + kvh * stride_vh + k_start.to(tl.int64) * stride_vs

    lo = 0
    hi = seqlen_k
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if MASK_RIGHT:
        hi = tl.minimum(hi, m0 + BLOCK_M + diag + win_right)
        full_hi = tl.minimum(full_hi, (m0 + diag + win_right + 1) // BLOCK_N * BLOCK_N)
    if MASK_LEFT:
        lo = tl.maximum(0, (m0 + diag - win_left) // BLOCK_N * BLOCK_N)
        full_lo = (m0 + BLOCK_M - 1 + diag - win_left + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        full_lo = lo
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
        lo, full_lo, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
        True, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, BLOCK_N, DOT_PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
        full_lo, full_hi, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
        False, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, BLOCK_N, DOT_PRECISION,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, K_ptr, V_ptr, stride_ks, stride_vs, rows, offs_n, offs_d, d_ok,
        full_hi, hi, seqlen_k, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_rows,
        True, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, BLOCK_N, DOT_PRECISION,
    )
    tl.store(DQ + row_off + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


def _bwd_dq_variants():
    pointers = {"Q": None, "K": None, "V": None, "DO": None, "DQ": None, "LSE": "fp32", "DELTA": "fp32"}
    yield from _train_variants(_attn_bwd_dq_kernel, "bwd_dq", pointers, _FLOAT_ARGS)


register_kernel(
    _attn_bwd_dq_kernel, variants=_bwd_dq_variants, tensor_cores=True,
    spills_allowed="head dim 256 spills 56-64 bytes in fp16/bf16, and fp32's IEEE dots at head dim 128 up to 16; "
    "fp16/bf16 at head dims 64 and 128 do not spill",
)


_DELTA_ROWS = 64  # query rows per program of the delta kernel, a row reduction bound by reading O and dO


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, CU_Q, stride_ob, stride_os, stride_oh, stride_lb, stride_lh, seqlen_q_dense, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta = rowsum(dO * O) per query row, which the dQ and dK/dV kernels read.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, seqlen_q, _, _ = _sequence_bounds(CU_Q, CU_Q, b, seqlen_q_dense, seqlen_q_dense, IS_VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    off = b.to(tl.int64) * stride_ob + h * stride_oh + (q_start + rows)[:, None].to(tl.int64) * stride_os
    o = tl.load(O + off + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + off + offs_d[None, :], mask=mask, other=0.0)
    lse_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
    tl.store(DELTA + lse_off, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=row_ok)


def _delta_variants():
    for dtype, dt in _VARIANT_DTYPES.items():
        for head_dim in _VARIANT_HEAD_DIMS:
            for varlen in (False, True):
                signature = {"O": f"*{dt}", "DO": f"*{dt}", "DELTA": "*fp32", "CU_Q": "*i32"}
                signature.update((name, "i32") for name in (
                    "stride_ob", "stride_os", "stride_oh", "stride_lb", "stride_lh", "seqlen_q_dense", "n_heads"))
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), IS_VARLEN=varlen, BLOCK_M=_DELTA_ROWS)
                if not varlen:
                    del signature["CU_Q"]
                    constexprs["CU_Q"] = None
                yield Variant(signature, constexprs, num_warps=4, num_stages=1,
                              label=f"{dt} d={head_dim}{' varlen' if varlen else ''}",
                              divisible_by_16=("stride_ob", "stride_os", "stride_oh"))


register_kernel(_attn_bwd_delta_kernel, variants=_delta_variants)


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows x BLOCK_D) tile: masks only what may lie outside (rows past ``n_rows``, the head dim's padding),
    so that a full tile of an unpadded head dim is a plain vectorized load."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _load_row_vector(ptr, rows, n_rows, other, CHECK_ROWS: tl.constexpr):
    """One value per query row (LSE, delta); ``other`` past ``n_rows``."""
    if CHECK_ROWS:
        x = tl.load(ptr + rows, mask=rows < n_rows, other=other)
    else:
        x = tl.load(ptr + rows)
    return x


@triton.jit
def _add_rows_transposed(ptrs, tile_t, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Atomically adds a (BLOCK_D x rows) tile into rows of an fp32 buffer, masking as ``_load_rows`` does."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tl.atomic_add(ptrs, tile_t, mask=(rows < n_rows)[None, :], sem="relaxed")
        else:
            tl.atomic_add(ptrs, tile_t, mask=(rows < n_rows)[None, :] & (offs_d < HEAD_DIM)[:, None], sem="relaxed")
    elif HEAD_DIM == BLOCK_D:
        tl.atomic_add(ptrs, tile_t, sem="relaxed")
    else:
        tl.atomic_add(ptrs, tile_t, mask=(offs_d < HEAD_DIM)[:, None], sem="relaxed")


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, stride_qs, cols, offs_m, offs_d,
    lo, hi, seqlen_q, diag, win_left, win_right, qk_scale, dropout_p, seed, rng_base, rng_cols,
    MASKED: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACCUM_DQ: tl.constexpr,
):
    # Scores are formed transposed (keys x queries), so that dK and dV accumulate as keys x headdim.
    # q and dO are loaded as stored (queries x headdim, contiguous rows) and transposed inside the dots,
    # which read either operand major from shared memory. Only the block's base pointer advances (a
    # scalar): a loop-carried tensor of pointers would hold 64 bits per element in registers.
    tile_off = offs_m[:, None] * stride_qs + offs_d[None, :]
    step = BLOCK_M * stride_qs
    Q_ptr += tl.cast(lo, tl.int64) * stride_qs  # tl.cast: lo may be the literal 0
    DO_ptr += tl.cast(lo, tl.int64) * stride_qs
    if ACCUM_DQ:
        # dQ's fp32 buffer shares q's strides; its tile is added transposed (head dim x queries).
        dq_off = offs_m[None, :] * stride_qs + offs_d[:, None]
        DQ_ptr += tl.cast(lo, tl.int64) * stride_qs
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q_ptr + tile_off, rows, seqlen_q, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        lse2 = _load_row_vector(LSE_ptr, rows, seqlen_q, float("inf"), MASKED)
        # Where each load sits changes ptxas's register allocation: loaded up front, the fp32 (FMA-dot)
        # build spills at most 32 bytes instead of up to 2824; the tensor-core builds spill least loading dO and
        # delta next to their first use.
        if DOT_PRECISION == "ieee":
            do = _load_rows(DO_ptr + tile_off, rows, seqlen_q, offs_d, MASKED, HEAD_DIM, BLOCK_D)
            delta = _load_row_vector(DELTA_ptr, rows, seqlen_q, 0.0, MASKED)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        # Only the window hides scores here. Query rows past the end load lse2 = +inf, as rows that see
        # no key have it, so their p (and ds) is 0; keys past the end (zero rows of k and v) fill rows
        # of dK and dV that are never stored.
        if MASKED:
            if MASK_RIGHT:
                qk_t = tl.where(cols[:, None] <= rows[None, :] + diag + win_right, qk_t, float("-inf"))
            if MASK_LEFT:
                qk_t = tl.where(cols[:, None] >= rows[None, :] + diag - win_left, qk_t, float("-inf"))
        p_t = tl.exp2(qk_t - lse2[None, :])
        if DOT_PRECISION != "ieee":
            do = _load_rows(DO_ptr + tile_off, rows, seqlen_q, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            rng_t = rng_base + rows[None, :].to(tl.int64) * rng_cols + cols[:, None].to(tl.int64)
            keep_t = tl.rand(seed, rng_t) >= dropout_p
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep_t, p_t * inv_keep, 0.0).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * inv_keep, 0.0)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        if DOT_PRECISION != "ieee":
            delta = _load_row_vector(DELTA_ptr, rows, seqlen_q, 0.0, MASKED)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ACCUM_DQ:
            # dQ^T = K^T dS^T: the head dim (not the short query step) is the dot's M side, as HGMMA needs.
            dq_t = tl.dot(tl.trans(k), ds_t.to(k.dtype), input_precision=DOT_PRECISION)
            _add_rows_transposed(DQ_ptr + dq_off, dq_t, rows, seqlen_q, offs_d, MASKED, HEAD_DIM, BLOCK_D)
            DQ_ptr += step
        Q_ptr += step
        DO_ptr += step
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_lb, stride_lh,
    seqlen_q_dense, seqlen_k_dense, n_kv_heads, group, sm_scale, qk_scale, win_left, win_right,
    dropout_p, seed, rng_cols,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr,
    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ACCUM_DQ: tl.constexpr,
):
    # One program per (key block, key/value head): it sums over every query head of its
    # group itself, so no two programs write the same dK/dV rows (no atomics).
    # DO (and DQ, an fp32 buffer) share q's strides; DK and DV share k's and v's. With ACCUM_DQ the
    # program also adds its share of dQ = dS K into DQ with float atomics (deterministic=False):
    # the scores are formed once instead of again in the dQ kernel.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(CU_Q, CU_K, b, seqlen_q_dense, seqlen_k_dense, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (cols[:, None] < seqlen_k) & d_ok[None, :]
    k_off = b.to(tl.int64) * stride_kb + kvh * stride_kh + (k_start + cols)[:, None].to(tl.int64) * stride_ks
    v_off = b.to(tl.int64) * stride_vb + kvh * stride_vh + (k_start + cols)[:, None].to(tl.int64) * stride_vs
    k = tl.load(K + k_off + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + v_off + offs_d[None, :], mask=kv_mask, other=0.0)

    # Query rows that see some key of this block: [lo, hi); all of it: [full_lo, full_hi).
    lo = 0
    hi = seqlen_q
    if n0 + BLOCK_N <= seqlen_k:
        full_hi = seqlen_q // BLOCK_M * BLOCK_M
    else:
        full_hi = 0
    if MASK_RIGHT:
        lo = tl.maximum(0, (n0 - diag - win_right) // BLOCK_M * BLOCK_M)
        full_lo = (n0 + BLOCK_N - 1 - diag - win_right + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        full_lo = lo
    if MASK_LEFT:
        hi = tl.minimum(hi, n0 + BLOCK_N - diag + win_left)
        full_hi = tl.minimum(full_hi, (n0 - diag + win_left + 1) // BLOCK_M * BLOCK_M)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for hq in range(group):
        h = kvh * group + hq
        q_base = b.to(tl.int64) * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qs
        lse_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        rng_base = lse_base * rng_cols
        dq_h = DQ + q_base if ACCUM_DQ else DQ
        q_h, do_h, lse_h, delta_h = Q + q_base, DO + q_base, LSE + lse_base, DELTA + lse_base
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, stride_qs, cols, offs_m, offs_d, lo, full_lo, seqlen_q,
            diag, win_left, win_right, qk_scale, dropout_p, seed, rng_base, rng_cols,
            True, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, ACCUM_DQ,
        )
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, stride_qs, cols, offs_m, offs_d, full_lo, full_hi, seqlen_q,
            diag, win_left, win_right, qk_scale, dropout_p, seed, rng_base, rng_cols,
            False, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, ACCUM_DQ,
        )
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_h, do_h, lse_h, delta_h, dq_h, stride_qs, cols, offs_m, offs_d, full_hi, hi, seqlen_q,
            diag, win_left, win_right, qk_scale, dropout_p, seed, rng_base, rng_cols,
            True, MASK_LEFT, MASK_RIGHT, HAS_DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, ACCUM_DQ,
        )
    tl.store(DK + k_off + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + v_off + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


def _bwd_dkdv_variants():
    pointers = {"Q": None, "K": None, "V": None, "DO": None, "DK": None, "DV": None, "LSE": "fp32", "DELTA": "fp32"}
    yield from _train_variants(_attn_bwd_dkdv_kernel, "bwd_dkdv", pointers, _FLOAT_ARGS, nones=("DQ",),
                               ACCUM_DQ=False)
    yield from _train_variants(_attn_bwd_dkdv_kernel, "bwd_dkdv_dq", {**pointers, "DQ": "fp32"}, _FLOAT_ARGS,
                               tag="atomic dQ", ACCUM_DQ=True)


register_kernel(
    _attn_bwd_dkdv_kernel, variants=_bwd_dkdv_variants, tensor_cores=True,
    spills_allowed="the fp32 dK and dV accumulators take 128 registers a thread at head dims 128 (128 keys) and "
    "256 (64 keys): head dim 256 spills 288-376 bytes, and at head dim 128 the window (8), packed-sequence (64) "
    "and dropout (176) variants' index and mask math does; fp32's IEEE dots spill up to 32 bytes. Dense "
    "fp16/bf16 at head dims 64 and 128 do not spill. The atomic-dQ build (deterministic=False) holds a dQ^T "
    "tile more: at head dim 128 it spills 96 bytes dense (104-296 windowed, packed or with dropout), 440-504 "
    "at 256; which tile is fastest for it is for the GPU sweep to say (benchmarks/attention_tile_sweep.py)",
)


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, OUT, n_splits, stride_o_split, stride_l_split, n_heads, seqlen_q, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (batch, query, head) row: out = sum_s exp(lse_s - lse) * out_s.
    # O_PART is (splits, batch, seqlen_q, heads, head_dim) and LSE_PART (splits, batch, heads, seqlen_q).
    row = tl.program_id(0).to(tl.int64)
    h = row % n_heads
    bi = row // n_heads
    lse_row = (bi // seqlen_q * n_heads + h) * seqlen_q + bi % seqlen_q
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = splits < n_splits
    d_ok = offs_d < head_dim
    lse = tl.load(LSE_PART + splits * stride_l_split + lse_row, mask=s_ok, other=float("inf"))
    # +inf marks a split that saw no key: it carries no weight.
    lse = tl.where(lse == float("inf"), float("-inf"), lse)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    w = w / tl.where(m == float("-inf"), 1.0, tl.sum(w, 0))
    o = tl.load(O_PART + splits[:, None] * stride_o_split + row * head_dim + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0)
    tl.store(OUT + row * head_dim + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def _combine_variants():
    for dtype, dt in _VARIANT_DTYPES.items():
        for head_dim in (64, 128):
            yield Variant(
                {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": f"*{dt}", "n_splits": "i32", "stride_o_split": "i32",
                 "stride_l_split": "i32", "n_heads": "i32", "seqlen_q": "i32", "head_dim": "i32"},
                {"BLOCK_S": 64, "BLOCK_D": _block_d(head_dim)}, num_warps=4, num_stages=1, label=f"{dt} d={head_dim}",
            )


register_kernel(_decode_combine_kernel, variants=_combine_variants)


@triton.jit
def _dropout_mask_kernel(MASK, seed, dropout_p, seqlen_q, seqlen_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Debug path: writes the keep-mask (batch*heads, seqlen_q, seqlen_k) the dense kernels draw.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lse_off = bh * seqlen_q + rows
    for start_n in range(0, seqlen_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, lse_off * seqlen_k, cols, dropout_p)
        ptrs = MASK + lse_off[:, None] * seqlen_k + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k))


register_kernel(_dropout_mask_kernel, variants=lambda: [Variant(
    {"MASK": "*i8", "seed": "i32", "dropout_p": "fp32", "seqlen_q": "i32", "seqlen_k": "i32"},
    {"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1, label="debug mask",
)])


# ----------------------------------------------------------------------------- launchers


def _config(kind: str, head_dim: int, dtype: torch.dtype, device_type: str) -> dict:
    """Tiles for one kernel launch: the one place that decides them (the registry derives its variants here).

    ``kind`` is ``fwd``, ``decode``, ``bwd_dq``, ``bwd_dkdv`` or ``bwd_dkdv_dq`` (the dK/dV kernel that also adds
    dQ atomically, ``deterministic=False``; for both dK/dV kinds ``BLOCK_N`` is the key block a program owns and
    ``BLOCK_M`` the query block it loops over).
    """
    if device_type != "cuda":
        # The interpreter: small tiles so that tests with seqlen <= 130 cross several block edges,
        # and different M and N so that the bounds arithmetic of each axis is exercised on its own.
        block_m, block_n = {"fwd": (32, 16), "decode": (16, 16), "bwd_dq": (32, 16), "bwd_dkdv": (16, 32),
                            "bwd_dkdv_dq": (16, 32)}[kind]
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    # Chosen by compiling for sm_90a without a GPU (none to time them yet): HGMMA needs 64 rows per
    # warpgroup on the M side of every dot (queries forward and for dQ, keys for dK/dV), and under 8
    # warps a 64-row tile is computed by both warpgroups (its TTGIR layout spans 128 rows), so M is
    # 16 rows per warp where registers allow; within that, the tiles that spill least. dK/dV at head
    # dim 128 then holds two 128x128 fp32 accumulators (128 registers a thread): 16-query steps are
    # the largest that do not spill (32-query steps spill 150-230 bytes; with 64 keys and 8 warps
    # the score dots run twice). fp32 runs IEEE dots on the FMA units: small tiles keep them in registers.
    fp32 = dtype == torch.float32
    if fp32:
        tiles = (32, 16, 4, 1) if head_dim <= 128 and kind in ("fwd", "decode") else (16, 16, 4, 1)
    elif kind == "fwd":
        if head_dim <= 64:
            tiles = (128, 64, 8, 3)
        elif head_dim <= 128:
            tiles = (128, 32, 8, 3)
        else:
            tiles = (64, 16, 8, 2)
    elif kind == "decode":
        # 64 query rows even for one token: decoding is bound by reading the cache, not by the dots.
        tiles = (64, 64, 4, 3) if head_dim <= 64 else (64, 64, 8, 3) if head_dim <= 128 else (64, 32, 8, 2)
    elif kind == "bwd_dq":
        tiles = (64, 32, 4, 2) if head_dim <= 64 else (128, 32, 8, 2) if head_dim <= 128 else (64, 16, 8, 1)
    else:
        tiles = (32, 128, 8, 2) if head_dim <= 64 else (16, 128, 8, 2) if head_dim <= 128 else (16, 64, 8, 2)
    block_m, block_n, num_warps, num_stages = tiles
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def _block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (tl.arange and tl.dot need one, >= 16); loads mask the rest."""
    return max(16, triton.next_power_of_2(head_dim))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get IEEE dots: TF32 would break the fp32 tolerance of the tests.
    return "ieee" if dtype == torch.float32 else "tf32"


def _lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """(batch, heads, seqlen_q) dense, (heads, total_q) packed: FlashAttention's layouts."""
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _qkv_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, seq, head) strides; packed sequences have no batch axis."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the (batch, heads, seqlen_q) or packed (heads, total_q) LSE."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _flags(q, left, right, dropout_p) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1], BLOCK_D=_block_d(q.shape[-1]), MASK_LEFT=left >= 0, MASK_RIGHT=right >= 0,
        HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=_precision(q.dtype),
    )


def _fwd_triton(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed):
    varlen = cu_q is not None
    if lse is None:  # not asked for, but the kernel writes it anyway (it costs nothing there)
        lse = torch.empty(_lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    n_heads = q.shape[-2]
    cfg = _config("fwd", q.shape[-1], q.dtype, q.device.type)
    # One split spanning every key: a multiple of BLOCK_N so that block edges stay aligned.
    split_size = max(triton.cdiv(max_k, cfg["BLOCK_N"]), 1) * cfg["BLOCK_N"]
    grid = (triton.cdiv(max_q, cfg["BLOCK_M"]), batch * n_heads, 1)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_q, cu_k, None,
        *_qkv_strides(q, varlen), *_qkv_strides(k, varlen), *_qkv_strides(v, varlen), *_qkv_strides(out, varlen), 0,
        *_lse_strides(lse, varlen), 0,
        max_q, max_k, n_heads, n_heads // k.shape[-2], scale * LOG2E, left, right, split_size,
        dropout_p, seed, max_k,
        IS_VARLEN=varlen, HAS_K_LENS=False, **_flags(q, left, right, dropout_p), **cfg,
    )


def _bwd_triton(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed,
                deterministic):
    varlen = cu_q is not None
    batch = cu_q.numel() - 1 if varlen else q.shape[0]
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    flags = _flags(q, left, right, dropout_p)
    common = (max_q, max_k)
    delta = torch.empty_like(lse)
    _attn_bwd_delta_kernel[(triton.cdiv(max_q, _DELTA_ROWS), batch * n_heads)](
        out, dout, delta, cu_q, *_qkv_strides(out, varlen), *_lse_strides(lse, varlen), max_q, n_heads,
        HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"], IS_VARLEN=varlen, BLOCK_M=_DELTA_ROWS,
        num_warps=4, num_stages=1,
    )
    if deterministic:
        cfg = _config("bwd_dq", q.shape[-1], q.dtype, q.device.type)
        _attn_bwd_dq_kernel[(triton.cdiv(max_q, cfg["BLOCK_M"]), batch * n_heads)](
            q, k, v, dout, lse, delta, dq, cu_q, cu_k,
            *_qkv_strides(q, varlen), *_qkv_strides(k, varlen), *_qkv_strides(v, varlen), *_lse_strides(lse, varlen),
            *common, n_heads, n_heads // n_kv_heads, scale, scale * LOG2E, left, right, dropout_p, seed, max_k,
            IS_VARLEN=varlen, **flags, **cfg,
        )
        dq_sum = None
    else:
        dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # q's strides: q is contiguous
    cfg = _config("bwd_dkdv" if deterministic else "bwd_dkdv_dq", q.shape[-1], q.dtype, q.device.type)
    _attn_bwd_dkdv_kernel[(triton.cdiv(max_k, cfg["BLOCK_N"]), batch * n_kv_heads)](
        q, k, v, dout, lse, delta, dk, dv, dq_sum, cu_q, cu_k,
        *_qkv_strides(q, varlen), *_qkv_strides(k, varlen), *_qkv_strides(v, varlen),
        *_lse_strides(lse, varlen),
        *common, n_kv_heads, n_heads // n_kv_heads, scale, scale * LOG2E, left, right, dropout_p, seed, max_k,
        IS_VARLEN=varlen, ACCUM_DQ=not deterministic, **flags, **cfg,
    )
    if dq_sum is not None:
        torch.mul(dq_sum, scale, out=dq)


def _decode_splits(max_len: int, programs: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(number of key splits, keys per split) so that one query token still fills the device."""
    if device.type == "cuda":
        target, min_keys = 2 * torch.cuda.get_device_properties(device).multi_processor_count, 256
    else:
        target, min_keys = 64, 32  # the interpreter: several splits, so tests exercise the combine
    splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(max_len, min_keys), 64))
    split_size = triton.cdiv(triton.cdiv(max(max_len, 1), splits), block_n) * block_n
    return triton.cdiv(max(max_len, 1), split_size), split_size


def _kvcache_triton(q, k_cache, v_cache, seqlens_k, out, scale, causal):
    batch, seqlen_q, n_heads, head_dim = q.shape
    cfg = _config("decode", head_dim, q.dtype, q.device.type)
    programs = triton.cdiv(seqlen_q, cfg["BLOCK_M"]) * batch * n_heads
    n_splits, split_size = _decode_splits(k_cache.shape[1], programs, cfg["BLOCK_N"], q.device)
    # Scratch for the partial results (every element is written), not an op output.
    o_part = torch.empty((n_splits, batch, seqlen_q, n_heads, head_dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((n_splits, batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
    right = 0 if causal else -1
    _attn_fwd_kernel[(triton.cdiv(seqlen_q, cfg["BLOCK_M"]), batch * n_heads, n_splits)](
        q, k_cache, v_cache, o_part, lse_part, None, None, seqlens_k,
        *_qkv_strides(q, False), *_qkv_strides(k_cache, False), *_qkv_strides(v_cache, False),
        o_part.stride(1), o_part.stride(2), o_part.stride(3), o_part.stride(0),
        lse_part.stride(1), lse_part.stride(2), lse_part.stride(0),
        seqlen_q, k_cache.shape[1], n_heads, n_heads // k_cache.shape[2], scale * LOG2E, -1, right, split_size,
        0.0, 0, 0,
        IS_VARLEN=False, HAS_K_LENS=True, **_flags(q, -1, right, 0.0), **cfg,
    )
    _decode_combine_kernel[(batch * seqlen_q * n_heads,)](
        o_part, lse_part, out, n_splits, o_part.stride(0), lse_part.stride(0), n_heads, seqlen_q, head_dim,
        BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_D=_block_d(head_dim),
    )


def _dropout_mask_triton(batch, n_heads, seqlen_q, seqlen_k, dropout_p, seed, device):
    mask = torch.empty((batch, n_heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    _dropout_mask_kernel[(triton.cdiv(seqlen_q, 16), batch * n_heads)](
        mask, seed, dropout_p, seqlen_q, seqlen_k, BLOCK_M=16, BLOCK_N=64,
    )
    return mask.bool()


# -- the torch backend


def _visibility(seqlen_q: int, seqlen_k: int, left: int, right: int, device) -> torch.Tensor | None:
    """Boolean (seqlen_q, seqlen_k) mask of the keys each query sees; None when it sees them all."""
    if left < 0 and right < 0:
        return None
    aligned = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    ok = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= j <= aligned + right
    if left >= 0:
        ok &= j >= aligned - left
    return ok


def _torch_keep(seed: int, index: int, shape, dropout_p: float, device) -> torch.Tensor:
    """The torch backend's dropout keep-mask of sequence ``index``: regenerated from the seed, never stored."""
    gen = torch.Generator(device=device).manual_seed(seed + index)
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _sequences(q, k, cu_q, cu_k):
    """(query slice, key slice, sequence index) per sequence; one whole-batch entry when dense."""
    if cu_q is None:
        return [(slice(None), slice(None), 0)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1]), i) for i in range(len(cq) - 1)]


def _torch_lse(q, k, scale, mask) -> torch.Tensor:
    """(batch, heads, seqlen_q) fp32 log-sum-exp, +inf where a row sees no key; a query chunk at a time."""
    group = q.shape[2] // k.shape[2]
    kt = k.float().transpose(1, 2).repeat_interleave(group, dim=1).transpose(-1, -2)
    chunks = []
    for start in range(0, q.shape[1], _LSE_CHUNK):
        s = q[:, start:start + _LSE_CHUNK].float().transpose(1, 2) @ kt * scale
        if mask is not None:
            s = s.masked_fill(~mask[start:start + _LSE_CHUNK], float("-inf"))
        chunks.append(torch.logsumexp(s, dim=-1))
    lse = torch.cat(chunks, dim=-1)
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _torch_attention(q, k, v, scale, left, right, dropout_p, keep, need_lse):
    """(out, lse or None) of (batch, seqlen, heads, headdim) tensors, differentiable."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    mask = _visibility(seqlen_q, seqlen_k, left, right, q.device)
    if keep is not None:
        out = _ref_core(q, k, v, scale, mask, keep, dropout_p)[0]
    else:
        # Square causal is SDPA's own is_causal (top-left = bottom-right there), faster than a mask.
        square_causal = seqlen_q == seqlen_k and left < 0 and right == 0
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=None if square_causal else mask,
            is_causal=square_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        ).transpose(1, 2)
    return out, _torch_lse(q, k, scale, mask) if need_lse else None


def _fwd_torch(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed):
    varlen = cu_q is not None
    for qs, ks, index in _sequences(q, k, cu_q, cu_k):
        qi, ki, vi = (q[qs][None], k[ks][None], v[ks][None]) if varlen else (q, k, v)
        oi = out[qs][None] if varlen else out
        li = None if lse is None else lse[:, qs][None] if varlen else lse
        if ki.shape[1] == 0:
            oi.zero_()
            if li is not None:
                li.fill_(float("inf"))
            continue
        if qi.shape[1] == 0:
            continue
        keep = None
        if dropout_p > 0:
            keep = _torch_keep(seed, index, (qi.shape[0], qi.shape[2], qi.shape[1], ki.shape[1]), dropout_p, q.device)
        o, l = _torch_attention(qi, ki, vi, scale, left, right, dropout_p, keep, need_lse=li is not None)
        oi.copy_(o)
        if li is not None:
            li.copy_(l * LOG2E)  # the ops' LSE is in base 2, as the Triton kernels keep it


def _bwd_torch(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed,
               deterministic):
    varlen = cu_q is not None
    for qs, ks, index in _sequences(q, k, cu_q, cu_k):
        qi, ki, vi = (q[qs][None], k[ks][None], v[ks][None]) if varlen else (q, k, v)
        doi = dout[qs][None] if varlen else dout
        grads = (dq[qs][None], dk[ks][None], dv[ks][None]) if varlen else (dq, dk, dv)
        if qi.shape[1] == 0 or ki.shape[1] == 0:
            for g in grads:
                g.zero_()
            continue
        keep = None
        if dropout_p > 0:
            keep = _torch_keep(seed, index, (qi.shape[0], qi.shape[2], qi.shape[1], ki.shape[1]), dropout_p, q.device)
        # torch.func.vjp reaches SDPA's fused backward from here, below the autograd dispatch
        # key that the op's implementation runs under (torch.autograd.grad cannot).
        _, vjp = torch.func.vjp(
            lambda a, b, c: _torch_attention(a, b, c, scale, left, right, dropout_p, keep, need_lse=False)[0],
            qi, ki, vi,
        )
        for g, computed in zip(grads, vjp(doi)):
            g.copy_(computed)


def _kvcache_torch(q, k_cache, v_cache, seqlens_k, out, scale, causal):
    """The whole batch in one SDPA call over the first max(seqlens_k) slots (decoding is call-overhead
    bound on CPU: one call per sequence cost more than the attention). A (batch, 1, seqlen_q, slots)
    mask hides each sequence's slots past its length and, causal, the keys after each query's
    bottom-right-aligned position; without ragged lengths or a causal block there is no mask."""
    seqlen_q = q.shape[1]
    lengths = seqlens_k.tolist()
    longest = max(lengths)
    if longest == 0:
        out.zero_()
        return
    ragged = min(lengths) != longest
    square_causal = causal and not ragged and seqlen_q == longest  # SDPA's own is_causal, no mask
    k, v = k_cache[:, :longest], v_cache[:, :longest]  # (B, S, K, D)
    mask = None
    if ragged or (causal and seqlen_q > 1 and not square_causal):
        slot = torch.arange(longest, device=q.device)  # (S,)
        length = seqlens_k.long()[:, None, None]  # (B, 1, 1)
        mask = slot < length  # (B, 1, S)
        if ragged:
            # Slots past a sequence's length may hold anything (unwritten memory, NaN): a masked
            # score is still computed and 0 * NaN is NaN, so they are zeroed, not just masked.
            k = k.masked_fill(~mask[:, 0, :, None, None], 0.0)
            v = v.masked_fill(~mask[:, 0, :, None, None], 0.0)
        if causal:
            query = torch.arange(seqlen_q, device=q.device)[None, :, None]  # (1, Tq, 1)
            mask = mask & (slot <= query + length - seqlen_q)  # (B, Tq, S)
        mask = mask[:, None]  # (B, 1, Tq or 1, S): broadcast over heads
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=square_causal,
        scale=scale, enable_gqa=q.shape[2] != k_cache.shape[2],
    ).transpose(1, 2)  # (B, Tq, H, D)
    if mask is not None:
        # A query that sees no key (an empty sequence, or a causal query before its first key) outputs zeros.
        o = o.masked_fill(~mask.any(-1)[:, 0, :, None, None], 0.0)
    out.copy_(o)


def _dropout_mask_torch(batch, n_heads, seqlen_q, seqlen_k, dropout_p, seed, device):
    return _torch_keep(seed, 0, (batch, n_heads, seqlen_q, seqlen_k), dropout_p, device)


# -- the cpp backend


def _cpp_takes(dtype: torch.dtype, dropout_p: float) -> bool:
    """Whether the C++ kernel runs a call: fp32 without dropout (the CPU training case). The cpp
    launchers hand every other call to the torch ones (SDPA), which need no LSE for the backward."""
    return dtype == torch.float32 and dropout_p == 0


def _fwd_cpp(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed):
    if not _cpp_takes(q.dtype, dropout_p):
        _fwd_torch(q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed)
        return
    cpu_extension().attention_fwd(q, k, v, out, lse, cu_q, cu_k, max_q, scale, left, right)


def _bwd_cpp(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed,
             deterministic):
    if not _cpp_takes(q.dtype, dropout_p):
        _bwd_torch(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed,
                   deterministic)
        return
    cpu_extension().attention_bwd(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, scale, left, right)


backend.register("attention_fwd", triton=_fwd_triton, cpp=_fwd_cpp, torch=_fwd_torch)
backend.register("attention_bwd", triton=_bwd_triton, cpp=_bwd_cpp, torch=_bwd_torch)
backend.register("attention_kvcache", triton=_kvcache_triton, torch=_kvcache_torch)
backend.register("attention_dropout_mask", triton=_dropout_mask_triton, torch=_dropout_mask_torch)


# ----------------------------------------------------------------------------- torch.library ops


@eager.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, scale: float, left: int, right: int,
    dropout_p: float, seed: int, need_lse: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse2): lse2 is the fp32 base-2 log-sum-exp of the scores times log2(e), empty
    unless ``need_lse`` (the Triton backward and ``return_lse`` need it; the torch backend pays for it).
    ``deterministic`` is for the backward (the autograd context keeps it). Packed: ``max_seqlen_q/k``
    of -1 are read from ``cu_seqlens``, whose values are checked here (see ``_varlen_maxima``)."""
    if cu_seqlens_q is not None:
        max_seqlen_q, max_seqlen_k = _varlen_maxima(
            cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k
        )
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = alloc.empty_like(q)
    lse = None
    if need_lse:
        lse = alloc.empty(*_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    if q.numel() > 0:
        backend.select("attention_fwd", q.device)(
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
            dropout_p, seed,
        )
    return out, lse if lse is not None else q.new_empty(0, dtype=torch.float32)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, dropout_p, seed,
      need_lse, deterministic):
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None) if need_lse else (0,), dtype=torch.float32)
    return torch.empty_like(q, memory_format=torch.contiguous_format), lse


@eager.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int,
    scale: float, left: int, right: int, dropout_p: float, seed: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv). ``lse`` may be empty when the forward ran on the torch backend (whose
    backward needs none); a backward on another backend then recomputes it with its own forward.
    Maxima of -1 are read from ``cu_seqlens`` as in the forward."""
    if cu_seqlens_q is not None and min(max_seqlen_q, max_seqlen_k) < 0:
        max_seqlen_q, max_seqlen_k = _varlen_maxima(
            cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k
        )
    dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
    dq, dk, dv = alloc.empty_like(q), alloc.empty_like(k), alloc.empty_like(v)
    if q.numel() > 0 and k.numel() > 0:
        if lse.numel() == 0 and not runs_torch_backend(q.device, q.dtype, dropout_p):
            lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
            backend.select("attention_fwd", q.device)(
                q, k, v, torch.empty_like(q), lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                left, right, dropout_p, seed,
            )
        backend.select("attention_bwd", q.device)(
            dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
            left, right, dropout_p, seed, deterministic,
        )
    else:
        for g in (dq, dk, dv):
            g.zero_()
    return dq, dk, dv


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
      dropout_p, seed, deterministic):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, dropout_p, seed, _need_lse, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (max_q, max_k, scale, left, right, dropout_p, seed, deterministic)
    # The LSE is an output for inspection (as in FlashAttention); no gradient flows through it.
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # the LSE never gets a gradient: no zeros tensor for it


def _backward(ctx, dout, _dlse):
    if dout is None:  # only the LSE was used, and it carries no gradient
        return (None,) * 14
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.params)
    return (dq, dk, dv) + (None,) * 11


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


@eager.custom_op("fastlm::attention_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kvcache_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float, causal: bool,
) -> torch.Tensor:
    """Writes k_new/v_new into the caches at cache_seqlens, then attends q over each sequence's keys."""
    n_new = k_new.shape[1] if k_new is not None else 0
    # Checked here, before the caches are written, rather than in attention_with_kvcache: under
    # torch.compile only the op sees the lengths' values. One device sync.
    lengths = cache_seqlens.tolist()
    if lengths and (min(lengths) < 0 or max(lengths) + n_new > k_cache.shape[1]):
        raise ValueError(
            f"attention_with_kvcache: cache_seqlens + seqlen_new must lie in [0, {k_cache.shape[1]}] (the cache "
            f"length), got cache_seqlens={lengths} and seqlen_new={n_new}"
        )
    seqlens_k = cache_seqlens
    if n_new > 0:
        positions = cache_seqlens.long()[:, None] + torch.arange(n_new, device=q.device)[None, :]
        rows = torch.arange(q.shape[0], device=q.device)[:, None]
        k_cache[rows, positions] = k_new
        v_cache[rows, positions] = v_new
        seqlens_k = cache_seqlens + n_new
    out = alloc.empty_like(q.contiguous())
    if q.numel() > 0:
        backend.select("attention_kvcache", q.device)(
            q.contiguous(), k_cache, v_cache, seqlens_k.to(torch.int32).contiguous(), out, scale, causal
        )
    return out


@_attention_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, causal):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------- public functions


def _check_tensor(fn, name, t, dim, dtype=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{fn}: {name} must have {dim} dims, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have q's dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device} but q is on {device}")


def _check_qkv(fn, q, k, v, dim):
    """Shapes, dtypes and devices of q, k, v with ``dim`` dims; returns the head dim."""
    _check_tensor(fn, "q", q, dim)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        _check_tensor(fn, name, t, dim, q.dtype, q.device)
    if k.shape != v.shape:
        raise ValueError(f"{fn}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"{fn}: k's head dim {k.shape[-1]} must match q's head dim {head_dim}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: the head dim must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {head_dim}")
    n_heads, n_kv_heads = q.shape[-2], k.shape[-2]
    if n_kv_heads == 0 or n_heads % n_kv_heads != 0:
        raise ValueError(
            f"{fn}: q's head count {n_heads} must be a multiple of k/v's head count {n_kv_heads} (GQA/MQA)"
        )
    return head_dim


def _check_cu_seqlens(name, cu, device):
    """cu_seqlens: an int32 (batch + 1,) tensor on q's device. Its values are checked by the op."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"attention: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"attention: {name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"attention: {name} is on {cu.device} but q is on {device}")


def _max_seqlen_arg(given) -> int:
    """A given maximum as the op takes it: an int as it is; None, or a tensor (transformers passes
    ``cu_seqlens.diff().max()``), as -1, which the op reads from cu_seqlens in the sync that checks them."""
    return -1 if given is None or isinstance(given, torch.Tensor) else given


def _varlen_maxima(cu_q, cu_k, total_q, total_k, max_q, max_k) -> tuple[int, int]:
    """(max_seqlen_q, max_seqlen_k) of packed sequences, each given (checked against the true maximum) or
    -1 (read from cu_seqlens), after checking that each cu_seqlens starts at 0, never decreases and ends
    at its token count (ValueError otherwise).

    The ops call it on real tensors, before any kernel launches: ``attention`` cannot, as under
    torch.compile it only sees fake ones. Both tensors are read back in one device sync.
    """
    values = torch.cat([cu_q, cu_k]).tolist()
    maxima = []
    for name, cu_values, total, given in (
        ("q", values[: cu_q.numel()], total_q, max_q), ("k", values[cu_q.numel():], total_k, max_k),
    ):
        lengths = [b - a for a, b in zip(cu_values, cu_values[1:])]
        if cu_values[0] != 0 or min(lengths) < 0:
            raise ValueError(f"attention: cu_seqlens_{name} must start at 0 and never decrease, got {cu_values}")
        if cu_values[-1] != total:
            raise ValueError(
                f"attention: cu_seqlens_{name}[-1] = {cu_values[-1]} must equal the packed token count {total}"
            )
        if 0 <= given < max(lengths):
            raise ValueError(
                f"attention: max_seqlen_{name}={given} is smaller than the longest sequence, {max(lengths)}"
            )
        maxima.append(given if given >= 0 else max(lengths))
    return maxima[0], maxima[1]


def _check_window(window) -> tuple[int, int]:
    if window is None:
        return -1, -1
    if not (isinstance(window, (tuple, list)) and len(window) == 2 and all(isinstance(w, int) for w in window)):
        raise TypeError(f"attention: window must be a (left, right) pair of ints, got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"attention: window sizes must be >= 0 (or -1 for unbounded), got {tuple(window)}")
    return left, right


def _check_scale(fn, softmax_scale, head_dim) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not softmax_scale > 0:
        raise ValueError(f"{fn}: softmax_scale must be a positive number or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _draw_seed(dropout_p: float) -> int:
    """Dropout seed from the torch RNG, so torch.manual_seed makes a call reproducible."""
    return int(torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64).item()) if dropout_p > 0 else 0


@torch.compiler.assume_constant_result
def runs_torch_backend(device: torch.device, dtype: torch.dtype, dropout_p: float) -> bool:
    """Whether a call on ``device`` runs the torch backend (SDPA, its backward rerunning the forward): the
    torch backend chosen, or the cpp one handing the call to it. A constant to torch.compile, which
    cannot trace the backend choice's context variable."""
    chosen = backend.chosen("attention_bwd", device)
    return chosen == "torch" or (chosen == "cpp" and not _cpp_takes(dtype, dropout_p))


def attention(
    q, k, v, causal=False, softmax_scale=None, window=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
    max_seqlen_q=None, max_seqlen_k=None, return_lse=False, deterministic=True,
):
    """Flash attention over ``(batch, seqlen, heads, headdim)`` tensors (packed ``(tokens, heads, headdim)``
    with ``cu_seqlens_q/k``). k/v may have fewer heads than q (GQA/MQA).

    ``causal`` and ``window=(left, right)`` (-1: unbounded) are aligned to the bottom-right corner;
    with both, causal wins on the right. ``dropout_p`` drops attention probabilities with a seed drawn
    from the torch RNG. ``return_lse`` also returns the fp32 log-sum-exp ((batch, heads, seqlen_q), or
    (heads, total_q) packed; +inf for rows that see no key), which carries no gradient.
    The values of ``cu_seqlens`` are checked when the op runs, before any kernel launches (one device
    sync; under torch.compile at run time, as the traced call cannot read them). ``max_seqlen_q/k``
    (ints) must not be below the true maxima; omitted (or tensors), they are read from ``cu_seqlens`` in
    that same sync, and again in the backward (a second sync: pass ints where that matters, on a GPU).
    ``deterministic=True`` (the default) keeps the backward free of float atomics, so it is bitwise
    reproducible. ``deterministic=False`` lets the Triton backward sum dQ with float atomics from the
    dK/dV kernel (no separate dQ pass; it holds an fp32 dQ buffer, q's size in fp32, during the
    backward); the C++ and torch backends have no such choice and run the same code either way.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    head_dim = _check_qkv("attention", q, k, v, 3 if varlen else 4)
    scale = _check_scale("attention", softmax_scale, head_dim)
    left, right = _check_window(window)
    if causal:
        right = 0
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"attention: deterministic must be a bool, got {type(deterministic).__name__}")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise ValueError("attention: packed sequences need both cu_seqlens_q and cu_seqlens_k")
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device)
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(
                f"attention: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
            )
        max_q, max_k = _max_seqlen_arg(max_seqlen_q), _max_seqlen_arg(max_seqlen_k)
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"attention: q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        max_q, max_k = q.shape[1], k.shape[1]
    # The Triton and C++ backwards recompute the probabilities from the forward's LSE; the torch backward
    # reruns SDPA's fused backward and needs none, so for it the LSE pass is skipped unless asked for.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    need_lse = return_lse or (needs_grad and not runs_torch_backend(q.device, q.dtype, float(dropout_p)))
    out, lse = _attention_fwd_op(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, scale, left, right, float(dropout_p),
        _draw_seed(dropout_p), need_lse, deterministic,
    )
    return (out, lse / LOG2E) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, softmax_scale=None,
                           causal=True):
    """Decode step: writes ``k_new``/``v_new`` (batch, seqlen_new, kv_heads, headdim) into the caches
    (batch, seqlen_cache, kv_heads, headdim) in place at position ``cache_seqlens[b]`` (int32, (batch,)),
    then attends ``q`` (batch, seqlen_q, heads, headdim) over the first ``cache_seqlens[b] + seqlen_new``
    keys of each sequence, causally aligned to its end. ``cache_seqlens`` itself is not updated.
    """
    fn = "attention_with_kvcache"
    head_dim = _check_qkv(fn, q, k_cache, v_cache, 4)
    scale = _check_scale(fn, softmax_scale, head_dim)
    batch = k_cache.shape[0]
    if q.shape[0] != batch:
        raise ValueError(f"{fn}: q and k_cache must have the same batch size, got {q.shape[0]} and {batch}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"{fn}: cache_seqlens must be an int32 tensor, got "
                        f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)}")
    if tuple(cache_seqlens.shape) != (batch,) or cache_seqlens.device != q.device:
        raise ValueError(f"{fn}: cache_seqlens must have shape ({batch},) on {q.device}, "
                         f"got {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{fn}: k_new and v_new must be given together")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            _check_tensor(fn, name, t, 4, q.dtype, q.device)
            if t.shape[0] != batch or t.shape[2:] != k_cache.shape[2:]:
                raise ValueError(f"{fn}: {name} must have shape ({batch}, seqlen_new, {k_cache.shape[2]}, "
                                 f"{head_dim}), got {tuple(t.shape)}")
        if k_new.shape != v_new.shape:
            raise ValueError(f"{fn}: k_new and v_new must have the same shape")
    # The lengths' values are checked in the op (before it writes the caches).
    return _attention_kvcache_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, bool(causal))


def attention_dropout_mask(q, k, dropout_p):
    """Debug path: the keep-mask (batch, heads, seqlen_q, seqlen_k) that the next dense ``attention``
    call with these shapes draws, given the same torch RNG state (restore it with ``torch.manual_seed``).
    """
    _check_qkv("attention_dropout_mask", q, k, k, 4)
    seed = _draw_seed(dropout_p)
    impl = backend.select("attention_dropout_mask", q.device)
    return impl(q.shape[0], q.shape[2], q.shape[1], k.shape[1], float(dropout_p), seed, q.device)


# ----------------------------------------------------------------------------- references


def _ref_core(q, k, v, scale, mask, keep, dropout_p):
    """Attention of (batch, seqlen, heads, headdim) tensors in their own dtype; returns (out, lse)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
        # Rows that see no key: softmax over zeros, then masked to exact zeros (finite gradients).
        s_safe = torch.where(mask.any(-1, keepdim=True), s, torch.zeros_like(s))
        p = torch.softmax(s_safe, dim=-1).masked_fill(~mask, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return torch.einsum("bhij,bjhd->bihd", p, v), lse


def attention_ref(q, k, v, causal=False, softmax_scale=None, window=None, cu_seqlens_q=None, cu_seqlens_k=None,
                  dropout_p=0.0, dropout_mask=None, return_lse=False, max_seqlen_q=None, max_seqlen_k=None):
    """Plain PyTorch attention with explicit masks, computed in the inputs' dtype (fp64 in, fp64 math).

    Takes ``attention``'s keywords, so either can be passed where the other is expected;
    ``max_seqlen_q/k`` are accepted and unused (the lengths come from ``cu_seqlens``).

    ``dropout_mask`` (batch, heads, seqlen_q, seqlen_k; dense only) is the keep-mask to apply, scaled
    by ``1 / (1 - dropout_p)``. Differentiable; tests, benchmarks and the torch backend's dropout use it.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    left, right = (-1, -1) if window is None else window
    if causal:
        right = 0
    if cu_seqlens_q is None:
        mask = _visibility(q.shape[1], k.shape[1], left, right, q.device)
        out, lse = _ref_core(q, k, v, scale, mask, dropout_mask, dropout_p)
    else:
        outs, lses = [], []
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            qi, ki, vi = q[cq[i]:cq[i + 1]][None], k[ck[i]:ck[i + 1]][None], v[ck[i]:ck[i + 1]][None]
            mask = _visibility(qi.shape[1], ki.shape[1], left, right, q.device)
            o, l = _ref_core(qi, ki, vi, scale, mask, None, dropout_p)
            outs.append(o[0])
            lses.append(l[0])
        out, lse = torch.cat(outs, dim=0), torch.cat(lses, dim=-1)
    return (out, lse) if return_lse else out
