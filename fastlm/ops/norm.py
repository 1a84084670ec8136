"""LayerNorm and RMSNorm, with an optional fused residual add.

    r = x + residual            (when residual is given; rounded to x's dtype)
    y = (r - mean(r)) * rstd * weight + bias      LayerNorm
    y = r * rstd * weight                         RMSNorm (no centring, no bias)

over the last dim, statistics in fp32. One file holds every piece, in order: the Triton
kernels, their launchers, the C++ and PyTorch launchers, the torch.library ops with
autograd, the public functions, and the PyTorch references that tests, benchmarks and
the torch backend share.

Weight and bias gradients are reduced deterministically on every backend: each program
(or C++ row chunk) writes an fp32 partial sum for its own rows, then the partials are
summed in a fixed order. Two runs on the same machine give the same bits.
"""

import torch

from fastlm import alloc, backend, eager
from fastlm._triton import tl, triton
from fastlm.checks import check_like
from fastlm.extension import cpu_extension
from fastlm.kernel_registry import Variant, register_kernel

MAX_N = 65536
# Columns one Triton program holds in registers at once; longer rows loop over tiles.
MAX_TILE = 8192
# The backward keeps about twice as many values live per column as the forward, so it takes
# smaller tiles: on sm_90 a single tile spills registers beyond 4096 columns, and a long
# row's tiles beyond 2048 when N is not a multiple of 16 (its loads are then not vectorized).
# See benchmarks/results/compile-report.md.
MAX_BWD_TILE = 4096
BWD_LONG_ROW_TILE = 2048
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _norm_fwd_kernel(
    X, RES, W, B, Y, R_OUT, MEAN, RSTD,
    n_rows, N, eps,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_TILES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_off = rows.to(tl.int64)[:, None] * N
    cols = tl.arange(0, BLOCK_N)
    if NUM_TILES == 1:
        # The whole row block sits in registers: exact two-pass statistics, one read.
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = tl.load(X + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x += tl.load(RES + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            r = x.to(R_OUT.dtype.element_ty)
            tl.store(R_OUT + row_off + cols[None, :], r, mask=mask)
            x = r.to(tl.float32)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            tl.store(MEAN + rows, mean, mask=row_ok)
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        y = xc * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + row_off + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Long rows: pass 1 forms r and its mean, pass 2 the centred variance, pass 3 writes y.
        # The loops count tiles from N at run time: over a constexpr NUM_TILES they are fully
        # unrolled, and the unrolled tiles spill registers (benchmarks/results/compile-report.md).
        SRC = R_OUT if HAS_RES else X
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(tl.cdiv(N, BLOCK_N)):
            c = t * BLOCK_N + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(X + row_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                x += tl.load(RES + row_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
                r = x.to(R_OUT.dtype.element_ty)
                tl.store(R_OUT + row_off + c[None, :], r, mask=mask)
                x = r.to(tl.float32)
            acc += x
        # r is re-read below by other threads of this program: make its stores visible.
        tl.debug_barrier()
        if IS_RMS:
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            mean = tl.sum(acc, axis=1) / N
            tl.store(MEAN + rows, mean, mask=row_ok)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for t in range(tl.cdiv(N, BLOCK_N)):
            c = t * BLOCK_N + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(SRC + row_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        for t in range(tl.cdiv(N, BLOCK_N)):
            c = t * BLOCK_N + cols
            mask = row_ok[:, None] & (c[None, :] < N)
            x = tl.load(SRC + row_off + c[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y *= tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y += tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + row_off + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


# What the compile gate (fastlm.tools.gpu_compile_check) builds of each kernel. Widths that
# reach every tile config _fwd_config/_bwd_config can pick: each single-tile power of two,
# and the fewest and the most tiles of a long row.
_GATE_WIDTHS = tuple(2**k for k in range(MAX_TILE.bit_length())) + (2 * MAX_TILE, MAX_N)
_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _gate_cases():
    """(dtype, n, is_rms, has_residual, has_weight, has_bias) the gate compiles for each kernel.

    Every tile config in bf16 with every feature on (the most live values); fp32 and fp16 at
    odd widths, where Triton cannot vectorize (more registers); and the feature sets that
    drop code (RMSNorm, no residual, no affine), at an odd and an even long row.
    """
    full = (False, True, True, True)
    cases = [(torch.bfloat16, n, *full) for n in _GATE_WIDTHS]
    odd = (1, 255, 4095, MAX_TILE - 1, MAX_N - 1)
    cases += [(dtype, n, *full) for dtype in (torch.float32, torch.float16) for n in odd]
    reduced = ((True, True, True, False), (True, False, False, False), (False, False, False, False))
    cases += [(torch.bfloat16, n, *flags) for n in (MAX_TILE - 1, MAX_N) for flags in reduced]
    return cases


def _gate_variant(cfg, dtype, n, is_rms, flags, tensors, scalars, label_flags):
    """The Variant a launch with this config and these arguments compiles.

    ``tensors`` maps pointer args to (present, type); absent ones are None at launch, which
    Triton specializes as a constexpr.
    """
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    signature, constexprs = dict(scalars), dict(IS_RMS=is_rms, **flags, **cfg)
    for name, (present, ty) in tensors.items():
        if present:
            signature[name] = ty
        else:
            constexprs[name] = None
    tiles = f" ({cfg['NUM_TILES']} tiles)" if cfg["NUM_TILES"] > 1 else ""
    features = "".join(f"+{name}" for name, on in label_flags if on)
    label = f"{_TRITON_TYPE[dtype]} n={n}{tiles} {'rms' if is_rms else 'ln'}{features}"
    return Variant(
        signature, constexprs, num_warps=num_warps, label=label, divisible_by_16=("N",) if n % 16 == 0 else ()
    )


def _norm_fwd_variants():
    for dtype, n, is_rms, has_res, has_w, has_b in _gate_cases():
        t = f"*{_TRITON_TYPE[dtype]}"
        tensors = {
            "X": (True, t), "RES": (has_res, t), "W": (has_w, t), "B": (has_b, t), "Y": (True, t),
            "R_OUT": (has_res, t), "MEAN": (not is_rms, "*fp32"), "RSTD": (True, "*fp32"),
        }
        yield _gate_variant(
            _fwd_config(n), dtype, n, is_rms, dict(HAS_RES=has_res, HAS_W=has_w, HAS_B=has_b), tensors,
            dict(n_rows="i32", N="i32", eps="fp32"), (("res", has_res), ("w", has_w), ("b", has_b)),
        )


register_kernel(_norm_fwd_kernel, variants=_norm_fwd_variants)


@triton.jit
def _norm_bwd_kernel(
    DY, DR_OUT, R, W, MEAN, RSTD, DX, DW_PARTIAL, DB_PARTIAL,
    n_rows, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_TILES: tl.constexpr,
):
    # Each program owns rows [start, stop) and one row of the dw/db partial buffers.
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * rows_per_program
    stop = tl.minimum(start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_N)
    partial_off = pid.to(tl.int64) * N
    if NUM_TILES == 1:
        col_ok = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for first in range(start, stop, BLOCK_M):
            rows = first + tl.arange(0, BLOCK_M)
            row_ok = rows < stop
            mask = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * N + cols[None, :]
            r = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            if IS_RMS:
                xhat = r * rstd[:, None]
            else:
                mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
            g = dy * w[None, :] if HAS_W else dy
            c1 = tl.sum(g * xhat, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DRES:
                dx += tl.load(DR_OUT + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if HAS_W:
            tl.store(DW_PARTIAL + partial_off + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if HAS_B:
            tl.store(DB_PARTIAL + partial_off + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    else:
        # Long rows, one at a time: pass 1 the row sums, pass 2 dx and the partials, which
        # accumulate in this program's own row of the partial buffers (zeroed by the launcher).
        # Tiles counted from N at run time, as in the forward, so the loops are not unrolled.
        for row in range(start, stop):
            row_off = row * N
            rstd = tl.load(RSTD + row)
            mean = 0.0 if IS_RMS else tl.load(MEAN + row)
            sum_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            sum_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            for t in range(tl.cdiv(N, BLOCK_N)):
                c = t * BLOCK_N + cols
                ok = c < N
                xhat = tl.where(ok, (tl.load(R + row_off + c, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
                g = tl.load(DY + row_off + c, mask=ok, other=0.0).to(tl.float32)
                if HAS_W:
                    g = g * tl.load(W + c, mask=ok, other=0.0).to(tl.float32)
                sum_gx += g * xhat
                sum_g += g
            c1 = tl.sum(sum_gx, axis=0) / N
            c2 = 0.0 if IS_RMS else tl.sum(sum_g, axis=0) / N
            for t in range(tl.cdiv(N, BLOCK_N)):
                c = t * BLOCK_N + cols
                ok = c < N
                xhat = tl.where(ok, (tl.load(R + row_off + c, mask=ok, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
                dy = tl.load(DY + row_off + c, mask=ok, other=0.0).to(tl.float32)
                if HAS_W:
                    g = dy * tl.load(W + c, mask=ok, other=0.0).to(tl.float32)
                else:
                    g = dy
                dx = (g - xhat * c1 - c2) * rstd
                if HAS_DRES:
                    dx += tl.load(DR_OUT + row_off + c, mask=ok, other=0.0).to(tl.float32)
                tl.store(DX + row_off + c, dx.to(DX.dtype.element_ty), mask=ok)
                if HAS_W:
                    dw = tl.load(DW_PARTIAL + partial_off + c, mask=ok, other=0.0)
                    tl.store(DW_PARTIAL + partial_off + c, dw + dy * xhat, mask=ok)
                if HAS_B:
                    db = tl.load(DB_PARTIAL + partial_off + c, mask=ok, other=0.0)
                    tl.store(DB_PARTIAL + partial_off + c, db + dy, mask=ok)


def _norm_bwd_variants():
    for dtype, n, is_rms, has_dres, has_w, has_b in _gate_cases():
        t = f"*{_TRITON_TYPE[dtype]}"
        tensors = {
            "DY": (True, t), "DR_OUT": (has_dres, t), "R": (True, t), "W": (has_w, t),
            "MEAN": (not is_rms, "*fp32"), "RSTD": (True, "*fp32"), "DX": (True, t),
            "DW_PARTIAL": (has_w, "*fp32"), "DB_PARTIAL": (has_b, "*fp32"),
        }
        yield _gate_variant(
            _bwd_config(n), dtype, n, is_rms, dict(HAS_DRES=has_dres, HAS_W=has_w, HAS_B=has_b), tensors,
            dict(n_rows="i32", N="i32", rows_per_program="i32"), (("dres", has_dres), ("w", has_w), ("b", has_b)),
        )


register_kernel(_norm_bwd_kernel, variants=_norm_bwd_variants)


# ----------------------------------------------------------------------------- launchers


def _tiles(n: int, max_tile: int = MAX_TILE) -> tuple[int, int]:
    """(BLOCK_N, NUM_TILES) for a row of n columns."""
    block_n = min(triton.next_power_of_2(n), max_tile)
    return block_n, triton.cdiv(n, block_n)


def _fwd_config(n: int) -> dict:
    block_n, num_tiles = _tiles(n)
    # Short rows: several per program so each program still moves ~4k elements.
    block_m = max(1, 4096 // block_n) if num_tiles == 1 else 1
    num_warps = min(16, max(1, block_m * block_n // 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, NUM_TILES=num_tiles, num_warps=num_warps)


def _bwd_config(n: int) -> dict:
    block_n, num_tiles = _tiles(n, MAX_BWD_TILE)
    if num_tiles == 1:
        block_m = max(1, 2048 // block_n)
        num_warps = min(16, max(1, block_m * block_n // 256))
    else:
        block_m, num_warps = 1, 16
        block_n, num_tiles = _tiles(n, BWD_LONG_ROW_TILE)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, NUM_TILES=num_tiles, num_warps=num_warps)


def _bwd_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        # Enough programs to fill every SM a few times; the partial buffer grows with it.
        slots = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        slots = 8  # the interpreter runs programs one after another
    return max(1, min(rows, slots))


def _fwd_triton(x, weight, bias, residual, y, r_out, mean, rstd, eps, is_rms):
    rows, n = x.shape
    cfg = _fwd_config(n)
    _norm_fwd_kernel[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
        x, residual, weight, bias, y, r_out, mean, rstd, rows, n, eps,
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        **cfg,
    )


def _bwd_triton(dy, dr_out, r, weight, mean, rstd, dx, dweight, dbias, is_rms):
    rows, n = r.shape
    cfg = _bwd_config(n)
    programs = _bwd_programs(rows, r.device)
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program)
    # Multi-tile programs accumulate into their partial row, so it must start at zero.
    make = torch.zeros if cfg["NUM_TILES"] > 1 else torch.empty
    dw_partial = make(programs, n, dtype=torch.float32, device=r.device) if dweight is not None else None
    db_partial = make(programs, n, dtype=torch.float32, device=r.device) if dbias is not None else None
    _norm_bwd_kernel[(programs,)](
        dy, dr_out, r, weight, mean, rstd, dx, dw_partial, db_partial, rows, n, rows_per_program,
        IS_RMS=is_rms, HAS_DRES=dr_out is not None, HAS_W=weight is not None, HAS_B=dbias is not None,
        **cfg,
    )
    # Summing the partials in a fixed order keeps the result deterministic.
    if dweight is not None:
        torch.sum(dw_partial, dim=0, out=dweight)
    if dbias is not None:
        torch.sum(db_partial, dim=0, out=dbias)


def _fwd_cpp(x, weight, bias, residual, y, r_out, mean, rstd, eps, is_rms):
    cpu_extension().norm_fwd(x, weight, bias, residual, y, r_out, mean, rstd, eps, is_rms)


def _bwd_cpp(dy, dr_out, r, weight, mean, rstd, dx, dweight, dbias, is_rms):
    cpu_extension().norm_bwd(dy, dr_out, r, weight, mean, rstd, dx, dweight, dbias, is_rms)


def _fwd_torch(x, weight, bias, residual, y, r_out, mean, rstd, eps, is_rms):
    if residual is not None:
        torch.add(x, residual, out=r_out)
        x = r_out
    out, mu, inv = _norm_with_stats(x, weight, bias, eps, is_rms)
    y.copy_(out)
    rstd.copy_(inv)
    if mean is not None:
        mean.copy_(mu)


def _bwd_torch(dy, dr_out, r, weight, mean, rstd, dx, dweight, dbias, is_rms):
    xhat = (r.float() - (0.0 if mean is None else mean[:, None])) * rstd[:, None]
    g = dy.float() * weight.float() if weight is not None else dy.float()
    grad = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if mean is not None:
        grad -= g.mean(-1, keepdim=True)
    grad *= rstd[:, None]
    if dr_out is not None:
        grad += dr_out.float()
    dx.copy_(grad)
    if dweight is not None:
        torch.sum(dy.float() * xhat, dim=0, out=dweight)
    if dbias is not None:
        torch.sum(dy.float(), dim=0, out=dbias)


backend.register("norm_fwd", triton=_fwd_triton, cpp=_fwd_cpp, torch=_fwd_torch)
backend.register("norm_bwd", triton=_bwd_triton, cpp=_bwd_cpp, torch=_bwd_torch)


# ----------------------------------------------------------------------------- torch.library ops


def _empty(like):
    """An absent fp32 output (statistics, gradients): an empty tensor on ``like``'s device."""
    return like.new_empty(0, dtype=torch.float32)


@eager.custom_op("fastlm::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    eps: float, is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, r_out, mean, rstd); r_out and mean are empty when absent."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    res2 = residual.reshape(x2.shape).contiguous() if residual is not None else None
    rows = x2.shape[0]
    y = alloc.empty_like(x2)
    r_out = alloc.empty_like(x2) if residual is not None else None
    mean = None if is_rms else alloc.empty(rows, dtype=torch.float32, device=x.device)
    rstd = alloc.empty(rows, dtype=torch.float32, device=x.device)
    if rows > 0:
        w = weight.contiguous() if weight is not None else None
        b = bias.contiguous() if bias is not None else None
        backend.select("norm_fwd", x.device)(x2, w, b, res2, y, r_out, mean, rstd, eps, is_rms)
    return (
        # view(*shape): torch parses a torch.Size ~3 us slower than plain ints, on every call.
        y.view(*shape),
        r_out.view(*shape) if r_out is not None else x.new_empty(0),
        mean if mean is not None else _empty(x),
        rstd,
    )


@_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, is_rms):
    # new_empty, not empty_like: the op's outputs are contiguous whatever x's strides (empty_like
    # would keep a transposed x's, and inductor checks the real strides against these).
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    r_out = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0, dtype=torch.float32) if is_rms else x.new_empty(rows, dtype=torch.float32)
    return x.new_empty(x.shape), r_out, mean, stats


@eager.custom_op("fastlm::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: torch.Tensor, dr_out: torch.Tensor | None, r: torch.Tensor, weight: torch.Tensor | None, has_bias: bool,
    mean: torch.Tensor, rstd: torch.Tensor, is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight, dbias); the last two fp32, empty when absent."""
    shape = r.shape
    r2 = r.reshape(-1, shape[-1]).contiguous()
    dy2 = dy.reshape(r2.shape).contiguous()
    dr2 = dr_out.reshape(r2.shape).contiguous() if dr_out is not None else None
    n = shape[-1]
    dx = alloc.empty_like(r2)
    dweight = alloc.empty(n, dtype=torch.float32, device=r.device) if weight is not None else None
    dbias = alloc.empty(n, dtype=torch.float32, device=r.device) if has_bias else None
    if r2.shape[0] > 0:
        w = weight.contiguous() if weight is not None else None
        backend.select("norm_bwd", r.device)(
            dy2, dr2, r2, w, None if is_rms else mean, rstd, dx, dweight, dbias, is_rms
        )
    else:
        for grad in (dweight, dbias):
            if grad is not None:
                grad.zero_()
    return (
        dx.view(*shape),
        dweight if dweight is not None else _empty(r),
        dbias if dbias is not None else _empty(r),
    )


@_norm_bwd_op.register_fake
def _(dy, dr_out, r, weight, has_bias, mean, rstd, is_rms):
    n = r.shape[-1]
    dweight = r.new_empty(n if weight is not None else 0, dtype=torch.float32)
    dbias = r.new_empty(n if has_bias else 0, dtype=torch.float32)
    return r.new_empty(r.shape), dweight, dbias  # contiguous, as the op's dx (see norm_fwd's fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, is_rms = inputs
    _, r_out, mean, rstd = output
    ctx.save_for_backward(r_out if residual is not None else x, weight, mean, rstd)
    # Unused outputs (the statistics, a discarded residual or gradient) get None, not a zeros tensor
    # autograd would otherwise allocate at their size.
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.has_residual = residual is not None
    ctx.is_rms = is_rms


def _backward(ctx, dy, dr_out, _dmean, _drstd):
    r, weight, mean, rstd = ctx.saved_tensors
    dr = dr_out if ctx.has_residual else None
    if dy is None:  # only the residual sum was used
        dy = torch.zeros_like(r)
    dx, dweight, dbias = _norm_bwd_op(dy, dr, r, weight, ctx.has_bias, mean, rstd, ctx.is_rms)
    return (
        dx,
        dweight.to(weight.dtype) if weight is not None else None,
        dbias.to(ctx.bias_dtype) if ctx.has_bias else None,
        dx if ctx.has_residual else None,
        None,
        None,
    )


_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functions


def _check(fn: str, x, weight, bias, residual, eps) -> None:
    """Raise TypeError/ValueError naming the argument, before any kernel launches."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension, got a scalar")
    n = x.shape[-1]
    if not 1 <= n <= MAX_N:
        raise ValueError(f"{fn}: the last dim of x must be in [1, {MAX_N}], got {n} (x.shape={tuple(x.shape)})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (n,):
            raise ValueError(f"{fn}: {name} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{fn}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        check_like(fn, "residual", residual, "x", x)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{fn}: eps must be a non-negative number, got {eps!r}")


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm over the last dim; with ``residual``, returns ``(layer_norm(x + residual), x + residual)``."""
    _check("layer_norm", x, weight, bias, residual, eps)
    y, r, _, _ = _norm_fwd_op(x, weight, bias, residual, float(eps), False)
    return (y, r) if residual is not None else y


def rms_norm(x, weight=None, eps=1e-6, residual=None):
    """RMSNorm over the last dim; with ``residual``, returns ``(rms_norm(x + residual), x + residual)``."""
    _check("rms_norm", x, weight, None, residual, eps)
    y, r, _, _ = _norm_fwd_op(x, weight, None, residual, float(eps), True)
    return (y, r) if residual is not None else y


# ----------------------------------------------------------------------------- references


def _norm_with_stats(x, weight, bias, eps, is_rms):
    """(y, mean, rstd) in fp32 (fp64 for fp64 input); y cast back to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    mean = None if is_rms else xf.mean(-1, keepdim=True)
    xc = xf if is_rms else xf - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    y = xc * rstd
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), None if is_rms else mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_ref(x, weight=None, bias=None, eps=1e-5, residual=None):
    """PyTorch reference of ``layer_norm`` (differentiable; fp64 in, fp64 math)."""
    r = x + residual if residual is not None else x
    y = _norm_with_stats(r, weight, bias, eps, is_rms=False)[0]
    return (y, r) if residual is not None else y


def rms_norm_ref(x, weight=None, eps=1e-6, residual=None):
    """PyTorch reference of ``rms_norm`` (differentiable; fp64 in, fp64 math)."""
    r = x + residual if residual is not None else x
    y = _norm_with_stats(r, weight, None, eps, is_rms=True)[0]
    return (y, r) if residual is not None else y
