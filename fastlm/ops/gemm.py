"""Dense matmuls, ``a @ b (+ bias)``, and the differentiable ``linear`` built on them.

Why an op for a matmul: on CPU tensors torch runs float32 matmuls through MKL, and MKL takes its
AVX2 code path on AMD processors, whatever they support. oneDNN (bundled with torch, which uses it
for bf16) picks its kernels from the ISA the processor reports, so on an AVX-512 machine it runs
512-bit kernels: on the project's 2-core Zen machine it reaches ~400 GFLOP/s where MKL reaches
~180 (``python benchmarks/bench_gemm.py``). The math is the same IEEE float32 (no reduced-precision
mode); only the summation order differs.

Backends: ``cpp`` is oneDNN, reached through torch's own ``mkldnn::_linear_pointwise`` op (what
Inductor's CPU backend calls), registered only on x86-64 where torch was built with it; ``torch`` is
``torch.mm`` / ``torch.addmm``, and so are ``triton`` and ``cuda`` (the fused GPU ops' matmuls are
cuBLAS's through torch), so that forcing one of those for a fused op also covers its matmuls.

oneDNN runs only where that premise holds: an AMD processor with AVX-512 (``ONEDNN_FASTER``). On an
AVX2-only one (a Zen 3 host) both libraries run AVX2 kernels, and oneDNN measured 0.68-1.03x torch on
single linears forward + backward and the same speed on the tiny training step, so there every matmul
is torch's (as on Intel, where MKL runs AVX-512 itself and oneDNN was never compared).

The oneDNN path takes float32 products of at least ``ONEDNN_MIN_MACS`` multiply-adds with at least
``ONEDNN_MIN_ROWS`` rows and columns; smaller ones and other dtypes run ``torch.mm``, outside the custom
op. The threshold depends on the processor's AVX-512 datapath. Zen 5 (AMD family 26) executes 512-bit
instructions at full width: there oneDNN's ~13 us call overhead is the only cost, and 2M multiply-adds
repay it. Zen 4 (family 25) splits each into two 256-bit halves, so MKL's AVX2 kernels already reach its
FMA peak (190 against oneDNN's 215 GFLOP/s on 512-2048 square products, two cores): there a linear's
forward + backward through oneDNN measured 0.4-0.6x F.linear at 4M multiply-adds, 0.9x at 34M, 1.0x at 134M
and 1.03-1.05x above, and the Hugging Face quick step 0.91x unpatched transformers' with the 2M threshold
against 1.1-1.2x with 134M. Whole training steps, thresholds alternating in one process
(``benchmarks/gemm_threshold.py --step``), put the threshold at 67M: there fastlm's tiny step ran 1-7% faster
than with 134M, and the patched Llama's quick step 0-6% slower than with 134M but 16-21% faster than with
2M (``benchmarks/results/cpu-2026-12-03-zen4/``). Wide products (``WIDE_OUTPUT``)
are the exception: oneDNN runs them from the full-width threshold everywhere. CUDA tensors always run
``torch.mm`` (cuBLAS), outside any custom op, so autocast applies as it does to ``F.linear``.
"""

import platform
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlm import backend, eager
from fastlm.extension import cpu_extension

ONEDNN_MIN_ROWS = 32
# ONEDNN_MIN_MACS on a processor that runs AVX-512 at full width, and on one that splits it in halves.
FULL_WIDTH_MIN_MACS = 1 << 21
HALF_WIDTH_MIN_MACS = 1 << 26
# Products at least this wide (output columns) run oneDNN from FULL_WIDTH_MIN_MACS on everywhere: with a
# short reduction (k = 128) MKL ran them at ~90 GFLOP/s on Zen 4, and oneDNN's forward 1.1-1.7x faster
# from 64 x 128 -> 2048 up (an LM head's chunk of logits; benchmarks/gemm_threshold.py).
WIDE_OUTPUT = 1024
# Output width up to which a product whose left operand is a transposed view (a weight gradient,
# x.T @ dy) runs faster computed transposed, as (dy.T @ x).T, by oneDNN (measured on Zen; see
# _gemm_onednn).
_NARROW = 256


def onednn_available() -> bool:
    """An x86-64 machine whose torch was built with oneDNN and exposes the op the ``cpp`` backend calls
    (elsewhere, e.g. on ARM, oneDNN's float32 kernels were never compared with torch's here)."""
    return (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _amd_avx512_family(cpuinfo: str, capability: str) -> int | None:
    """The CPU family of an AMD processor (``cpuinfo``: /proc/cpuinfo's text) on which torch dispatches
    AVX-512 kernels (``capability``: torch's CPU capability), so oneDNN will too; 0 if ``cpuinfo`` names
    no family; None on any other processor."""
    if "AuthenticAMD" not in cpuinfo or capability != "AVX512":
        return None
    family = re.search(r"^cpu family\s*:\s*(\d+)", cpuinfo, re.MULTILINE)
    return int(family.group(1)) if family else 0


def _onednn_min_macs(family: int | None) -> int:
    """The full-width threshold from AMD family 26 (Zen 5) on; Zen 4, and an unknown family, get the
    half-width one (module docstring)."""
    return FULL_WIDTH_MIN_MACS if (family or 0) >= 26 else HALF_WIDTH_MIN_MACS


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


_FAMILY = _amd_avx512_family(_read_cpuinfo(), torch.backends.cpu.get_cpu_capability())
ONEDNN_FASTER = onednn_available() and _FAMILY is not None
"""Whether the ``cpp`` backend's float32 matmuls run oneDNN; elsewhere they are torch's (module docstring)."""
ONEDNN_MIN_MACS = _onednn_min_macs(_FAMILY)
"""The fewest multiply-adds of a product that oneDNN runs (of a wide one: FULL_WIDTH_MIN_MACS)."""


def cpu_matmul_library() -> dict:
    """Which library runs fastlm's float32 CPU matmuls here, and why (``fastlm.backend_info()["cpu_matmuls"]``)."""
    if ONEDNN_FASTER:
        return {"library": "oneDNN", "min_macs": ONEDNN_MIN_MACS,
                "reason": "AMD CPU with AVX-512: oneDNN runs 512-bit kernels, MKL its AVX2 path"}
    if not onednn_available():
        return {"library": "torch", "reason": "not x86-64, or torch was built without oneDNN"}
    return {"library": "torch", "reason": "no AVX-512 or not an AMD CPU: oneDNN measured no faster than torch here"}


# ----------------------------------------------------------------------------- implementations


def _linear_pointwise(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ w.T + bias`` (x (m, k), w (n, k)) into a new contiguous (m, n) tensor. oneDNN reads
    ``w`` row- or column-major as it lies; ``x`` must be row-major (the op would copy it otherwise), and
    ``bias`` contiguous (the op reads it as such whatever its strides)."""
    bias = None if bias is None else bias.contiguous()
    return torch.ops.mkldnn._linear_pointwise(_row_major(x), w, bias, "none", [], "")


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous tensor. A transposed view (a weight gradient's operand) goes through
    fastlm's C++ transpose, 5-7x faster than torch's strided copy at the model's sizes
    (csrc/cpu/transpose.cpp)."""
    if t.is_contiguous():
        return t
    if t.stride(0) == 1 and t.stride(1) >= t.shape[0]:  # the transpose of a matrix with contiguous rows
        out = torch.empty(t.shape, dtype=t.dtype)
        cpu_extension().transpose(t.t(), out)
        return out
    return t.contiguous()


def _gemm_torch(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _gemm_onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    (m, k), n = a.shape, b.shape[1]
    if (a.dtype != torch.float32 or min(m, n) < ONEDNN_MIN_ROWS or not _large_enough(m * k * n, n)
            or not torch._C._get_mkldnn_enabled()):
        return _gemm_torch(a, b, bias)
    # Operands oneDNN cannot describe as row- or column-major (a strided slice of both) are copied.
    a = a if 1 in a.stride() else a.contiguous()
    b = b if 1 in b.stride() else b.contiguous()
    if a.stride(1) != 1 and n <= _NARROW and n < m:
        # x.T @ dy with a narrow output (a weight gradient of a layer with few input features): oneDNN
        # runs (dy.T @ x) 1.3-1.7x faster; the transpose back copies only the (small) result.
        out = _row_major(_linear_pointwise(b.t(), a, None).t())
        return out if bias is None else out.add_(bias)
    return _linear_pointwise(a, b.t(), bias)


# The GPU backends' matmuls are cuBLAS's, through torch: so are gemm's when one of them is forced.
_GPU = {"triton": _gemm_torch, "cuda": _gemm_torch}
if onednn_available():
    backend.register("gemm", cpp=_gemm_onednn, torch=_gemm_torch, **_GPU)
else:
    backend.register("gemm", torch=_gemm_torch, **_GPU)


# ----------------------------------------------------------------------------- torch.library op


@eager.custom_op("fastlm::gemm", mutates_args=())
def _gemm_op(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a (m, k) @ b (k, n) + bias (n,) into a new contiguous (m, n) tensor, on a CPU backend."""
    return backend.select("gemm", a.device)(a, b, bias)


@_gemm_op.register_fake
def _(a, b, bias):
    return a.new_empty(a.shape[0], b.shape[1])


def _setup_context(ctx, inputs, output):
    a, b, bias = inputs
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    need_a, need_b, need_bias = ctx.needs_input_grad
    grad_a = _gemm_op(grad, b.t(), None) if need_a else None
    grad_b = _gemm_op(a.t(), grad, None) if need_b else None
    grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
    return grad_a, grad_b, grad_bias


_gemm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public functions


def _check(fn: str, a, b, bias, names: tuple[str, str] = ("a", "b")) -> None:
    for name, t in zip(names, (a, b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {tuple(t.shape)}")
    na, nb = names
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{fn}: {na}'s columns ({a.shape[1]}) must equal {nb}'s rows ({b.shape[0]}); "
                         f"got {na} {tuple(a.shape)}, {nb} {tuple(b.shape)}")
    if a.dtype != b.dtype or not a.dtype.is_floating_point:
        raise TypeError(f"{fn}: {na} and {nb} must share one floating dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: {na} is on {a.device} but {nb} is on {b.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (b.shape[1],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{fn}: bias must be a tensor of shape ({b.shape[1]},), got {got}")
        if bias.dtype != a.dtype or bias.device != a.device:
            raise TypeError(f"{fn}: bias must be {a.dtype} on {a.device}, got {bias.dtype} on {bias.device}")


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b + bias`` for a (m, k), b (k, n), bias (n,) or None: a new contiguous (m, n) tensor.

    Any strides (pass views: what a kernel needs copied, it copies). Differentiable. CPU: oneDNN for float32 (see
    the module doc); CUDA: ``torch.mm`` / ``torch.addmm``, autocast-aware.
    """
    _check("gemm", a, b, bias)
    return mm(a, b, bias)


def _runs_torch(a: torch.Tensor) -> bool:
    # CUDA tensors and CPU autocast run torch.mm / torch.addmm, which autocast casts as it casts F.linear;
    # so does every CPU matmul where oneDNN is not the faster library.
    return a.device.type != "cpu" or torch.is_autocast_enabled("cpu") or not ONEDNN_FASTER


def _large_enough(macs: int, n: int) -> bool:
    """Whether oneDNN takes a product of ``macs`` multiply-adds into ``n`` output columns: from
    ONEDNN_MIN_MACS on, and a wide one (WIDE_OUTPUT) from FULL_WIDTH_MIN_MACS on."""
    return macs >= ONEDNN_MIN_MACS or (n >= WIDE_OUTPUT and macs >= FULL_WIDTH_MIN_MACS)


def _onednn_takes(a: torch.Tensor, n: int) -> bool:
    """Whether oneDNN takes a @ b, b with n columns (a: (m, k), or x (..., k) of a linear with n outputs): a
    float32 product ``_large_enough``. Others run torch's matmul outside fastlm's op, whose call and autograd
    wrapper cost more than oneDNN gains on them (a linear's backward products, inside the op, are decided
    one by one in _gemm_onednn)."""
    return a.dtype == torch.float32 and _large_enough(a.numel() * n, n)


def _product_runs_torch(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _runs_torch(a) or not _onednn_takes(a, b.shape[1])


def mm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """``gemm`` without its argument checks, for fastlm's fused ops (whose inputs are checked already);
    ``out``: write the product there (e.g. rows of a larger buffer) and return it."""
    if _product_runs_torch(a, b):
        if out is None:
            return _gemm_torch(a, b, bias)
        return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)
    product = _gemm_op(a, b, bias)
    return product if out is None else out.copy_(product)


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``c += a @ b`` in place (an accumulated weight gradient), through ``mm``'s kernel choice."""
    # A contiguous product: adding oneDNN's transposed result as a strided view measured 2x slower than
    # copying it first.
    return c.addmm_(a, b) if _product_runs_torch(a, b) else c.add_(_gemm_op(a, b, None))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (x (..., in), weight (out, in)) whose CPU matmuls run ``gemm``.

    On CUDA, inside CPU autocast (which casts F.linear's inputs), on CPUs where oneDNN is not the faster
    library (``ONEDNN_FASTER``), and for products oneDNN does not take (``_large_enough``), it is
    ``F.linear`` itself.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"linear: x and weight must be torch.Tensors, got {type(x).__name__}, {type(weight).__name__}")
    if _runs_torch(x):
        return F.linear(x, weight, bias)
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x (..., in) and weight (out, in) must agree on in, got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    _check("linear", x2, weight.t(), bias, names=("x", "weight.T"))
    if not _onednn_takes(x2, weight.shape[0]):
        return F.linear(x, weight, bias)
    return _gemm_op(x2, weight.t(), bias).view(*x.shape[:-1], weight.shape[0])  # (..., out)


def gemm_ref(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference: ``a @ b + bias`` (differentiable, any dtype)."""
    return a @ b if bias is None else a @ b + bias
