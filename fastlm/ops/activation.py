"""Fused FFN activations: SwiGLU, GeGLU and GELU.

    swiglu(gate, up) = silu(gate) * up                    (Llama)
    geglu(gate, up)  = gelu(gate) * up                    (tanh or exact GELU)
    gelu(x)          = x * Phi(x)                         (tanh or exact; GPT-2 uses tanh)

Forward is one pass: read gate (and up), write y, fp32 math, y in the input dtype. Eager
PyTorch writes and re-reads silu(gate) in between, and its autograd keeps it for backward.
Backward saves only the inputs (gate and up) and recomputes the activation in the same pass
that forms both gradients:

    dgate = dy * up * act'(gate)        dup = dy * act(gate)

The backward op can also write the recomputed forward output, for a caller that needs it a
second time (fastlm.nn's MLPs use it for the down projection's weight gradient instead of
storing it). One file holds every piece, in the order of fastlm/ops/norm.py.

Inputs may be strided views whose last dim is contiguous, such as the two halves of a packed
gate/up projection (``gate, up = x.chunk(2, -1)``): the kernels take a row stride per
tensor, so no copy is made.
"""

import math

import torch
import torch.nn.functional as F

from fastlm import alloc, backend, eager
from fastlm._triton import tl, triton
from fastlm.checks import check_like
from fastlm.extension import cpu_extension
from fastlm.kernel_registry import Variant, register_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Activation codes shared by the Triton kernels and csrc/cpu/activation.cpp.
ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
APPROXIMATE = {"tanh": "gelu_tanh", "none": "gelu"}
_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)  # GELU tanh form: 0.5 * (1 + tanh(z)) = sigmoid(2z)
_TANH_CUBIC = 0.044715
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
# |g| past which sigmoid(z) is 0 or 1 to fp32 precision (|z| >= 87): the sigmoid activations set it so
# there (the Triton kernels, csrc/cpu/activation.cpp and the torch backward alike; see _act_and_grad).
SATURATION = {"silu": 88.0, "gelu_tanh": 10.0}
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32; the forward kernel uses the first only (the compiler drops the rest).

    silu and gelu_tanh are g * s with s = sigmoid(z) = 1 / (1 + e), e = exp(-z), and t = 1 - s = e * s
    (exact where s rounds to 1; 1 - s would cancel). The exp is clamped so that e stays finite (e * s is
    never inf * 0). Past |g| = lim (SATURATION: |z| >= 87) s and t are 0 or 1 to fp32 precision and are
    set so, exactly: a residue of the clamped exp, times a huge g, would not be negligible; and gelu's
    derivative squares g clamped there, as g * g overflows from |g| ~ 2e19 (0 * inf).
    """
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        if ACT == 0:  # SATURATION's values
            lim = 88.0
            z = g
        else:
            lim = 10.0
            z = 2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(tl.minimum(-z, 88.0))
        s = tl.where(g < -lim, 0.0, 1.0 / (1.0 + e))
        t = tl.where(g > lim, 0.0, e * s)
        a = g * s
        if ACT == 0:
            da = s * (1.0 + g * t)
        else:
            # tl.where, not tl.minimum/maximum: those may drop a NaN g.
            gc = tl.where(g < -lim, -lim, tl.where(g > lim, lim, g))
            da = s + gc * t * s * (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * gc * gc)
    return a, da


@triton.jit
def _act_fwd_kernel(
    G, U, Y, n_cols, n_col_blocks, stride_g, stride_u, stride_y,
    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per BLOCK columns of one row; contiguous inputs arrive as a single row.
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    if GATED:
        a = a * tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, a.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _act_bwd_kernel(
    DY, G, U, DG, DU, Y, n_cols, n_col_blocks, stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_y,
    ACT: tl.constexpr, GATED: tl.constexpr, RECOMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // n_col_blocks).to(tl.int64)
    cols = (pid % n_col_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)  # recomputed from g
    if GATED:
        u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DG + row * stride_dg + cols, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + row * stride_du + cols, (dy * a).to(DU.dtype.element_ty), mask=mask)
        y = a * u
    else:
        tl.store(DG + row * stride_dg + cols, (dy * da).to(DG.dtype.element_ty), mask=mask)
        y = a
    if RECOMPUTE:
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _config(n_cols: int) -> dict:
    """BLOCK columns per program (short rows get a smaller block, not masked-off lanes)."""
    block = min(1024, triton.next_power_of_2(n_cols))
    return dict(BLOCK=block, num_warps=max(1, min(4, block // 256)))


def _variants(backward: bool):
    """Each (dtype, activation, gated[, recompute]) with the blocks of rows 1, 7, 123 and >= 1024 wide.

    Contiguous inputs always run as one long row (BLOCK=1024); narrower blocks are for strided rows.
    """
    configs = {cfg["BLOCK"]: cfg for cfg in map(_config, (1, 7, 123, 1151))}
    pointers = ("DY", "G", "U", "DG", "DU", "Y") if backward else ("G", "U", "Y")
    for dtype, ty in _TL_DTYPES.items():
        for act, code in ACTS.items():
            for gated in (True, False):
                for recompute in (True, False) if backward else (False,):
                    used = [p for p in pointers if gated or p not in ("U", "DU")]
                    used = [p for p in used if p != "Y" or recompute or not backward]
                    signature = {p: f"*{ty}" for p in used}
                    signature.update({"n_cols": "i32", "n_col_blocks": "i32"})
                    signature.update({f"stride_{p.lower()}": "i32" for p in pointers})
                    for block, cfg in configs.items():
                        constexprs = {p: None for p in pointers if p not in used}
                        constexprs.update(ACT=code, GATED=gated, BLOCK=block)
                        if backward:
                            constexprs["RECOMPUTE"] = recompute
                        flags = (" gated" if gated else "") + (" recompute" if recompute else "")
                        label = f"{ty} {act}{flags} BLOCK={block}"
                        yield Variant(signature, constexprs, num_warps=cfg["num_warps"], label=label)


register_kernel(_act_fwd_kernel, variants=lambda: _variants(backward=False))
register_kernel(_act_bwd_kernel, variants=lambda: _variants(backward=True))


def _stride(t):
    return t.stride(0) if t is not None else 0


def _fwd_triton(gate, up, y, act):
    rows, n = gate.shape
    cfg = _config(n)
    n_col_blocks = triton.cdiv(n, cfg["BLOCK"])
    _act_fwd_kernel[(rows * n_col_blocks,)](
        gate, up, y, n, n_col_blocks, gate.stride(0), _stride(up), y.stride(0),
        ACT=ACTS[act], GATED=up is not None, **cfg,
    )


def _bwd_triton(dy, gate, up, dgate, dup, y, act):
    rows, n = gate.shape
    cfg = _config(n)
    n_col_blocks = triton.cdiv(n, cfg["BLOCK"])
    _act_bwd_kernel[(rows * n_col_blocks,)](
        dy, gate, up, dgate, dup, y, n, n_col_blocks,
        dy.stride(0), gate.stride(0), _stride(up), dgate.stride(0), _stride(dup), _stride(y),
        ACT=ACTS[act], GATED=up is not None, RECOMPUTE=y is not None, **cfg,
    )


def _fwd_cpp(gate, up, y, act):
    cpu_extension().act_fwd(gate, up, y, ACTS[act])


def _bwd_cpp(dy, gate, up, dgate, dup, y, act):
    cpu_extension().act_bwd(dy, gate, up, dgate, dup, y, ACTS[act])


def _fwd_torch(gate, up, y, act):
    y.copy_(_activate(gate, up, act))


def _bwd_torch(dy, gate, up, dgate, dup, y, act):
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(compute)
    a, da = _act_value_and_grad(g, act)
    dyf = dy.to(compute)
    if up is None:
        dgate.copy_(dyf * da)
    else:
        u = up.to(compute)
        dgate.copy_(dyf * u * da)
        dup.copy_(dyf * a)
        a = a * u
    if y is not None:
        y.copy_(a)


backend.register("act_fwd", triton=_fwd_triton, cpp=_fwd_cpp, torch=_fwd_torch)
backend.register("act_bwd", triton=_bwd_triton, cpp=_bwd_cpp, torch=_bwd_torch)


# ----------------------------------------------------------------------------- torch.library ops


def _as_rows(*tensors):
    """2-D (rows, n) views with contiguous columns, as the launchers take them (None stays None).

    All-contiguous tensors become one long row (no masked tail per row); strided ones keep
    their rows (a view when the leading dims collapse, else a copy).
    """
    present = [t for t in tensors if t is not None]
    if all(t.is_contiguous() for t in present):
        return [t.view(1, -1) if t is not None else None for t in tensors]
    rows = []
    for t in tensors:
        v = t.reshape(-1, t.shape[-1]) if t is not None else None
        rows.append(v.contiguous() if v is not None and v.stride(-1) != 1 and v.shape[-1] > 1 else v)
    return rows


@eager.custom_op("fastlm::act_fwd", mutates_args=())
def _act_fwd_op(gate: torch.Tensor, up: torch.Tensor | None, act: str) -> torch.Tensor:
    """y = act(gate) [* up], in gate's shape and dtype."""
    y = alloc.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() > 0:
        backend.select("act_fwd", gate.device)(*_as_rows(gate, up, y), act)
    return y


@_act_fwd_op.register_fake
def _(gate, up, act):
    return gate.new_empty(gate.shape)


@eager.custom_op("fastlm::act_bwd", mutates_args=())
def _act_bwd_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None, act: str, recompute: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dgate, dup, y): dup empty without up, y (the recomputed forward) empty unless asked."""
    dgate = alloc.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = alloc.empty(gate.shape, dtype=gate.dtype, device=gate.device) if up is not None else None
    y = alloc.empty(gate.shape, dtype=gate.dtype, device=gate.device) if recompute else None
    if gate.numel() > 0:
        backend.select("act_bwd", gate.device)(*_as_rows(dy, gate, up, dgate, dup, y), act)
    # Absent outputs are distinct empty tensors: outputs may not alias each other.
    return dgate, dup if dup is not None else gate.new_empty(0), y if y is not None else gate.new_empty(0)


@_act_bwd_op.register_fake
def _(dy, gate, up, act, recompute):
    return (
        gate.new_empty(gate.shape),
        gate.new_empty(gate.shape if up is not None else (0,)),
        gate.new_empty(gate.shape if recompute else (0,)),
    )


@eager.custom_op("fastlm::act_bwd_packed", mutates_args=())
def _act_bwd_packed_op(
    dy: torch.Tensor, pre: torch.Tensor, act: str, gated: bool, recompute: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_bwd`` on a (rows, 2F) ``pre = [gate | up]`` (gated) or a (rows, F) ``pre = gate``.

    Returns (dpre, y): dpre in pre's layout, ``[dgate | dup]`` written in place by the kernel, so an
    MLP's backward runs ONE matmul per gradient through its packed gate/up weight (two half-width
    ones ran ~15% slower on CPU) with no concatenation; y (rows, F) the recomputed forward, empty
    unless asked.
    """
    width = pre.shape[-1] // 2 if gated else pre.shape[-1]
    dpre = alloc.empty(pre.shape, dtype=pre.dtype, device=pre.device)
    y = alloc.empty((pre.shape[0], width), dtype=pre.dtype, device=pre.device) if recompute else None
    if pre.numel() > 0:
        gate, up = pre.split(width, dim=-1) if gated else (pre, None)
        dgate, dup = dpre.split(width, dim=-1) if gated else (dpre, None)
        backend.select("act_bwd", pre.device)(*_as_rows(dy, gate, up, dgate, dup, y), act)
    return dpre, y if y is not None else pre.new_empty(0)


@_act_bwd_packed_op.register_fake
def _(dy, pre, act, gated, recompute):
    width = pre.shape[-1] // 2 if gated else pre.shape[-1]
    return pre.new_empty(pre.shape), pre.new_empty((pre.shape[0], width) if recompute else (0,))


def _setup_context(ctx, inputs, output):
    gate, up, act = inputs
    # Only the inputs: the activation is recomputed in backward.
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup, _ = _act_bwd_op(dy, gate, up, ctx.act, False)
    return dgate, dup if up is not None else None, None


_act_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functions


def _check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_pair(fn: str, gate, up) -> None:
    """Raise TypeError/ValueError naming the argument, before any kernel launches."""
    _check_tensor(fn, "gate", gate)
    _check_tensor(fn, "up", up)
    check_like(fn, "up", up, "gate", gate)


def _gelu_act(fn: str, approximate) -> str:
    if approximate not in APPROXIMATE:
        raise ValueError(f"{fn}: approximate must be 'tanh' or 'none', got {approximate!r}")
    return APPROXIMATE[approximate]


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in one pass; backward saves gate and up only and recomputes silu."""
    _check_pair("swiglu", gate, up)
    return _act_fwd_op(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up`` in one pass; backward saves gate and up only.

    ``approximate="tanh"`` (the default, as in most GeGLU models) or ``"none"`` (exact, erf).
    """
    act = _gelu_act("geglu", approximate)
    _check_pair("geglu", gate, up)
    return _act_fwd_op(gate, up, act)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``torch.nn.functional.gelu`` in one pass; backward saves x only and recomputes.

    ``approximate`` defaults to ``"none"`` like ``F.gelu``; GPT-2 uses ``"tanh"``.
    """
    act = _gelu_act("gelu", approximate)
    _check_tensor("gelu", "x", x)
    return _act_fwd_op(x, None, act)


# ----------------------------------------------------------------------------- references


def _act_value_and_grad(g: torch.Tensor, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """act(g) and act'(g) by the closed forms the kernels use (the torch backend's backward); see
    ``_act_and_grad`` for the saturation at +-SATURATION[act]."""
    if act in ("silu", "gelu_tanh"):
        # sigmoid(z) = 1 / (1 + e), 1 - sigmoid(z) = e * sigmoid(z): no cancellation near 1.
        lim = SATURATION[act]
        z = g if act == "silu" else _TANH_SCALE * (g + _TANH_CUBIC * g**3)
        e = torch.exp((-z).clamp(max=88.0))
        s = torch.where(g < -lim, 0.0, 1 / (1 + e))
        t = torch.where(g > lim, 0.0, e * s)
        if act == "silu":
            return g * s, s * (1 + g * t)
        gc = g.clamp(-lim, lim)
        return g * s, s + gc * t * s * _TANH_SCALE * (1 + 3 * _TANH_CUBIC * gc * gc)
    cdf = 0.5 * (1 + torch.erf(g * _INV_SQRT2))
    return g * cdf, cdf + g * _INV_SQRT_2PI * torch.exp(-0.5 * g * g)


def _activate(gate, up, act):
    """act(gate) [* up] by torch.nn.functional, in fp32 (fp64 for fp64 input), cast back."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(compute)
    if act == "silu":
        a = F.silu(g)
    else:
        a = F.gelu(g, approximate="tanh" if act == "gelu_tanh" else "none")
    if up is not None:
        a = a * up.to(compute)
    return a.to(gate.dtype)


def swiglu_ref(gate, up):
    """PyTorch reference of ``swiglu`` (differentiable; fp64 in, fp64 math)."""
    return _activate(gate, up, "silu")


def geglu_ref(gate, up, approximate="tanh"):
    """PyTorch reference of ``geglu`` (differentiable; fp64 in, fp64 math)."""
    return _activate(gate, up, APPROXIMATE[approximate])


def gelu_ref(x, approximate="none"):
    """PyTorch reference of ``gelu`` (differentiable; fp64 in, fp64 math)."""
    return _activate(x, None, APPROXIMATE[approximate])
