"""Rotary position embeddings (RoPE) applied to q and k in one kernel.

For a token at position p, feature pairs (x1, x2) of every head are rotated by p * theta_i:

    out1 = x1 * cos[p, i] - x2 * sin[p, i]
    out2 = x2 * cos[p, i] + x1 * sin[p, i]          i < rotary_dim / 2

with the pairs (i, i + rotary_dim / 2) in the GPT-NeoX / Llama convention (``interleaved=False``)
or (2i, 2i + 1) in the GPT-J convention (``interleaved=True``). Features past ``rotary_dim``
(partial rotary, as in GPT-NeoX and Phi) pass through. The backward is the transposed
rotation, i.e. the same kernel with sin negated, so nothing but the tables and positions is
saved. Math in fp32 whatever the input dtype; cos and sin are fp32 tables of shape
(positions, rotary_dim / 2), as ``fastlm.nn.RotaryEmbedding`` builds them.

q is (batch, seqlen, heads_q, headdim) and k (batch, seqlen, heads_k, headdim), the layout
of ``fastlm``'s attention; heads_k may differ (GQA / MQA). Both may be strided views (a packed
qkv projection). The results are new tensors: rotating in place would overwrite a tensor
autograd may have saved.
"""

import torch

from fastlm import alloc, backend, eager
from fastlm._triton import tl, triton
from fastlm.extension import cpu_extension
from fastlm.kernel_registry import Variant, register_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, POS, QO, KO,
    n_tokens, seqlen, heads_q, heads_k, headdim, half,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_pb, stride_ps,
    INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, HAS_POS: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Rows are (token, head) pairs. Program p rotates rows [p * BLOCK_M, (p + 1) * BLOCK_M)
    # of q, then the same rows of k (which has as many or fewer: the rest are masked).
    i = tl.arange(0, BLOCK_R)
    i_ok = i < half
    if INTERLEAVED:
        i1 = 2 * i
        i2 = 2 * i + 1
    else:
        i1 = i
        i2 = i + half
    for which in tl.static_range(2):
        # A compile-time choice, so each tensor keeps its own (possibly specialized) strides.
        if which == 0:
            X, XO, heads, stride_b, stride_s, stride_h = Q, QO, heads_q, stride_qb, stride_qs, stride_qh
        else:
            X, XO, heads, stride_b, stride_s, stride_h = K, KO, heads_k, stride_kb, stride_ks, stride_kh
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_tokens * heads
        token = rows // heads
        h = rows % heads
        b = token // seqlen
        t = token % seqlen
        if HAS_POS:
            pos = tl.load(POS + b * stride_pb + t * stride_ps, mask=row_ok, other=0).to(tl.int64)
        else:
            pos = t
        mask = row_ok[:, None] & i_ok[None, :]
        c = tl.load(COS + pos[:, None] * half + i[None, :], mask=mask, other=0.0)
        s = tl.load(SIN + pos[:, None] * half + i[None, :], mask=mask, other=0.0)
        if CONJ:
            s = -s
        x_row = (X + b * stride_b + t * stride_s + h * stride_h)[:, None]
        o_row = (XO + rows * headdim)[:, None]
        x1 = tl.load(x_row + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(o_row + i1[None, :], (x1 * c - x2 * s).to(XO.dtype.element_ty), mask=mask)
        tl.store(o_row + i2[None, :], (x2 * c + x1 * s).to(XO.dtype.element_ty), mask=mask)
        if HAS_PASS:
            j = 2 * half + tl.arange(0, BLOCK_P)
            pass_mask = row_ok[:, None] & (j < headdim)[None, :]
            tl.store(o_row + j[None, :], tl.load(x_row + j[None, :], mask=pass_mask), mask=pass_mask)


# ----------------------------------------------------------------------------- launchers


def _config(headdim: int, half: int) -> dict:
    block_r = triton.next_power_of_2(half)
    rest = headdim - 2 * half
    block_p = triton.next_power_of_2(rest) if rest else 1
    # About 2k rotated pairs per program, and at least 16 (token, head) rows. Partial rotary
    # also copies the pass-through features, whose pointers take registers too: a quarter of the
    # rows keeps it from spilling on sm_90 (see benchmarks/results/compile-report.md).
    block_m = max(16, 2048 // block_r // (4 if rest else 1))
    return dict(
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_P=block_p, HAS_PASS=rest > 0,
        num_warps=max(1, min(4, block_m * max(block_r, block_p) // 256)),
    )


def _variants():
    """The launcher's configs for head dims 64 and 128, full and half (GPT-NeoX) rotary."""
    configs = {}
    for headdim in (64, 128):
        for half in (headdim // 2, headdim // 4):
            cfg = _config(headdim, half)
            configs[tuple(sorted(cfg.items()))] = cfg
    for ty in _TL_DTYPES.values():
        signature = {p: f"*{ty}" for p in ("Q", "K", "QO", "KO")}
        signature.update(COS="*fp32", SIN="*fp32")
        for name in ("n_tokens", "seqlen", "heads_q", "heads_k", "headdim", "half", "stride_qb", "stride_qs",
                     "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_pb", "stride_ps"):
            signature[name] = "i32"
        for has_pos in (True, False):
            sig = dict(signature, POS="*i64") if has_pos else signature
            for interleaved in (False, True):
                for conj in (False, True):
                    for cfg in configs.values():
                        constexprs = {k: v for k, v in cfg.items() if k != "num_warps"}
                        constexprs.update(INTERLEAVED=interleaved, CONJ=conj, HAS_POS=has_pos)
                        if not has_pos:
                            constexprs["POS"] = None
                        flags = "gptj" if interleaved else "neox"
                        flags += (" bwd" if conj else "") + (" pos" if has_pos else "")
                        label = f"{ty} {flags} M={cfg['BLOCK_M']} R={cfg['BLOCK_R']} P={cfg['BLOCK_P']}"
                        yield Variant(sig, constexprs, num_warps=cfg["num_warps"], label=label)


register_kernel(_rope_kernel, variants=_variants)


def _rope_triton(q, k, cos, sin, pos, q_out, k_out, interleaved, conj):
    batch, seqlen, heads_q, headdim = q.shape
    heads_k = k.shape[2]
    cfg = _config(headdim, cos.shape[1])
    _rope_kernel[(triton.cdiv(batch * seqlen * max(heads_q, heads_k), cfg["BLOCK_M"]),)](
        q, k, cos, sin, pos, q_out, k_out, batch * seqlen, seqlen, heads_q, heads_k, headdim, cos.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        pos.stride(0) if pos is not None else 0, pos.stride(1) if pos is not None else 0,
        INTERLEAVED=interleaved, CONJ=conj, HAS_POS=pos is not None, **cfg,
    )


def _rope_cpp(q, k, cos, sin, pos, q_out, k_out, interleaved, conj):
    cpu_extension().rope(q, k, cos, sin, pos, q_out, k_out, interleaved, conj)


def _rope_torch(q, k, cos, sin, pos, q_out, k_out, interleaved, conj):
    sign = -1.0 if conj else 1.0
    q_out.copy_(_rotate(q, cos, sign * sin, pos, interleaved))
    k_out.copy_(_rotate(k, cos, sign * sin, pos, interleaved))


backend.register("rope", triton=_rope_triton, cpp=_rope_cpp, torch=_rope_torch)


# ----------------------------------------------------------------------------- torch.library ops


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@eager.custom_op("fastlm::rope", mutates_args=())
def _rope_op(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None,
    interleaved: bool, conj: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q, rotated k), contiguous; ``conj`` rotates by minus the angle (the backward)."""
    if position_ids is not None and not conj:  # the backward's positions are the forward's, checked
        _check_positions(position_ids, cos.shape[0])
    batch, seqlen = q.shape[:2]
    q_out = alloc.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = alloc.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() + k.numel() > 0:
        pos = position_ids.to(torch.int64).expand(batch, seqlen) if position_ids is not None else None
        backend.select("rope", q.device)(
            _last_dim_contiguous(q), _last_dim_contiguous(k), cos.float().contiguous(), sin.float().contiguous(),
            pos, q_out, k_out, interleaved, conj,
        )
    return q_out, k_out


@_rope_op.register_fake
def _(q, k, cos, sin, position_ids, interleaved, conj):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, position_ids, interleaved, conj = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.interleaved = interleaved
    ctx.conj = conj


def _backward(ctx, dq, dk):
    cos, sin, position_ids = ctx.saved_tensors
    dq_in, dk_in = _rope_op(dq, dk, cos, sin, position_ids, ctx.interleaved, not ctx.conj)
    return dq_in, dk_in, None, None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def _check(q, k, cos, sin, position_ids) -> None:
    """Raise TypeError/ValueError naming the argument, before any kernel launches."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rope: q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"rope: k must have q's dtype {q.dtype}, got {k.dtype}")
    if q.dim() != 4:
        raise ValueError(f"rope: q must be 4-D (batch, seqlen, heads, headdim), got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"rope: k must be 4-D (batch, seqlen, heads_k, headdim) with q's batch, seqlen and headdim "
            f"{(q.shape[0], q.shape[1], '*', q.shape[3])}, got {tuple(k.shape)}"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"rope: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"rope: {name} must be 2-D (positions, rotary_dim / 2), got shape {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"rope: {name} gets no gradient (a fixed table); pass it detached")
    if sin.shape != cos.shape:
        raise ValueError(f"rope: sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    headdim, half = q.shape[3], cos.shape[1]
    if not 1 <= 2 * half <= headdim:
        raise ValueError(
            f"rope: rotary_dim = 2 * cos.shape[1] = {2 * half} must be in [2, headdim={headdim}] "
            f"(cos.shape={tuple(cos.shape)})"
        )
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"rope: {name} is on {t.device} but q is on {q.device}")
    batch, seqlen, positions = q.shape[0], q.shape[1], cos.shape[0]
    if position_ids is None:
        if seqlen > positions:
            raise ValueError(f"rope: seqlen {seqlen} exceeds the {positions} positions of the cos/sin table")
        return
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"rope: position_ids must be a torch.Tensor or None, got {type(position_ids).__name__}")
    if position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rope: position_ids must be int32 or int64, got {position_ids.dtype}")
    if tuple(position_ids.shape) not in ((seqlen,), (batch, seqlen)):
        raise ValueError(
            f"rope: position_ids must have shape ({seqlen},) or ({batch}, {seqlen}), got {tuple(position_ids.shape)}"
        )
    if position_ids.device != q.device:
        raise ValueError(f"rope: position_ids is on {position_ids.device} but q is on {q.device}")


def _check_positions(position_ids, positions) -> None:
    """ValueError for a position outside the cos/sin table (one device sync). The op calls it, before any
    kernel launches: under torch.compile only the op sees the values."""
    if position_ids.numel() > 0:
        lo, hi = (v.item() for v in torch.aminmax(position_ids))
        if lo < 0 or hi >= positions:
            raise ValueError(
                f"rope: position_ids must be in [0, {positions}) (the cos/sin table's rows), got values in [{lo}, {hi}]"
            )


def rope(q, k, cos, sin, position_ids=None, interleaved=False):
    """Rotate q and k by their positions' angles; returns new ``(q, k)``.

    ``cos``/``sin``: (positions, rotary_dim / 2) tables (fp32 recommended; math is fp32).
    ``position_ids``: None (positions 0..seqlen-1), (seqlen,) shared by the batch (e.g.
    ``offset + arange(seqlen)`` for KV-cache decode) or (batch, seqlen) per token (packed
    sequences). ``interleaved``: GPT-J pairs (2i, 2i+1) instead of GPT-NeoX halves.
    Checking position_ids against the table reads them back (a device sync on CUDA), when the op
    runs (under torch.compile: at run time).
    """
    _check(q, k, cos, sin, position_ids)
    return _rope_op(q, k, cos, sin, position_ids, bool(interleaved), False)


# ----------------------------------------------------------------------------- reference


def _rotate(x, cos, sin, position_ids, interleaved):
    """x rotated in fp32 (fp64 for fp64 input), cast back; differentiable in x."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, seqlen, _, headdim = x.shape
    half = cos.shape[1]
    pos = torch.arange(seqlen, device=x.device) if position_ids is None else position_ids.long()
    c = cos.to(compute)[pos].expand(batch, seqlen, half)[:, :, None, :]
    s = sin.to(compute)[pos].expand(batch, seqlen, half)[:, :, None, :]
    xf = x.to(compute)
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def rope_ref(q, k, cos, sin, position_ids=None, interleaved=False):
    """PyTorch reference of ``rope`` (differentiable in q and k; fp64 in, fp64 math)."""
    return _rotate(q, cos, sin, position_ids, interleaved), _rotate(k, cos, sin, position_ids, interleaved)
