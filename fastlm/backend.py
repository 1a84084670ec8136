"""Choose, per call, which implementation of an op runs: Triton, C++ or PyTorch.

Every op declares the backends it implements (``register``); each call asks ``select``
which one to run for its tensors' device. The choice:

* ``FASTLM_BACKEND`` (``auto`` by default, or ``triton``, ``cpp``, ``cuda``, ``torch``), overridden
  inside a ``use_backend(...)`` block, forces one backend; forcing one that cannot run
  on the tensors' device is an error, never a silent substitute.
* ``auto``: CUDA tensors run Triton (or, for ops written in CUDA C++ rather than Triton, the
  CUDA extension); CPU tensors run the C++ extension. When that is not
  possible (Triton missing, the extension failed to build), the PyTorch implementation
  runs and a one-time warning says why; ``backend_info()`` reports the same.
* Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1`` when forced: that is
  how the test suite runs them without a GPU.
"""

import contextlib
import contextvars
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastlm._triton import HAS_TRITON, INTERPRETER_MENDED, TRITON_IMPORT_ERROR, interpreter_enabled
from fastlm.extension import cpu_extension_error, cuda_extension_error

BACKENDS = ("triton", "cpp", "cuda", "torch")
_REQUESTS = ("auto",) + BACKENDS
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastlm_backend", default=None)
_registry: dict[str, dict[str, Callable]] = {}
_warned: set[tuple[str, str]] = set()
# select()'s answer per (op, device type) under "auto": it depends only on what is installed and built,
# which cannot change within a process (the extensions' build results are cached), and select runs on
# every op call, where _choose costs ~4 us. Forced backends are not cached (tests switch them freely).
_auto_choices: dict[tuple[str, str], Callable] = {}


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


def register(op: str, **implementations: Callable) -> None:
    """Declare the backends that implement ``op``: ``register("norm_fwd", triton=f, cpp=g, torch=h)``."""
    unknown = set(implementations) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)} for op {op!r}; expected some of {BACKENDS}")
    if "torch" not in implementations:
        raise ValueError(f"op {op!r} must have a torch implementation (the portable fallback)")
    _registry[op] = dict(implementations)
    _auto_choices.clear()


def requested_backend() -> str:
    """The backend asked for: a ``use_backend`` block, else ``FASTLM_BACKEND``, else ``auto``."""
    name = _forced.get() or os.environ.get("FASTLM_BACKEND", "auto").strip().lower() or "auto"
    if name not in _REQUESTS:
        raise ValueError(f"FASTLM_BACKEND must be one of {_REQUESTS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (takes precedence over ``FASTLM_BACKEND``)."""
    if name not in _REQUESTS:
        raise ValueError(f"backend must be one of {_REQUESTS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def _unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on ``device_type`` here, else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not HAS_TRITON:
            return f"Triton is not importable ({TRITON_IMPORT_ERROR})"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and interpreter_enabled():
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device_type}"
    if backend == "cpp":
        if device_type != "cpu":
            return f"the C++ extension runs on CPU tensors; got {device_type}"
        return cpu_extension_error()
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA extension runs on CUDA tensors; got {device_type}"
        return cuda_extension_error()
    raise ValueError(f"unknown backend {backend!r}")


def _choose(op: str, device_type: str) -> Choice:
    implementations = _registry[op]
    requested = requested_backend()
    if requested != "auto":
        if requested not in implementations:
            raise ValueError(f"FASTLM_BACKEND={requested}: op {op!r} has no {requested} implementation")
        reason = _unavailable_reason(requested, device_type)
        if reason is not None:
            raise RuntimeError(f"FASTLM_BACKEND={requested} cannot run op {op!r} on {device_type}: {reason}")
        return Choice(requested, "forced")
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device_type)
    if device_type == "cuda" and "triton" not in implementations:
        preferred = "cuda"
    if preferred is None or preferred not in implementations:
        return Choice("torch", f"no fused kernel for {device_type}")
    reason = _unavailable_reason(preferred, device_type)
    if reason is None:
        return Choice(preferred, "default")
    return Choice("torch", f"fallback: {reason}")


def chosen(op: str, device: torch.device) -> str:
    """The name of the backend that ``select(op, device)`` would run, for ops whose inputs depend on it."""
    return _choose(op, device.type).backend


def select(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to run for tensors on ``device``."""
    auto = _forced.get() is None and os.environ.get("FASTLM_BACKEND", "auto") in ("auto", "")
    if auto:
        implementation = _auto_choices.get((op, device.type))
        if implementation is not None:
            return implementation
    choice = _choose(op, device.type)
    if choice.reason.startswith("fallback") and (op, device.type) not in _warned:
        _warned.add((op, device.type))
        first_line = choice.reason.splitlines()[0]
        warnings.warn(f"fastlm: {op} on {device.type} runs the PyTorch implementation ({first_line})", stacklevel=3)
    implementation = _registry[op][choice.backend]
    if auto:
        _auto_choices[(op, device.type)] = implementation
    return implementation


def backend_info() -> dict:
    """What is available here, what each op runs on each device, and why.

    Building the C++ extension is attempted (once, cached) to report on it.
    """
    cuda = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda else [])
    import fastlm.ops  # noqa: F401  (registers every op)

    info = {
        "torch": torch.__version__,
        "requested": requested_backend(),
        "cuda": {"available": cuda, "device": torch.cuda.get_device_name() if cuda else None},
        "triton": {
            "available": HAS_TRITON,
            "version": getattr(__import__("triton"), "__version__", None) if HAS_TRITON else None,
            "interpreter": interpreter_enabled(),
            "interpreter_mended": INTERPRETER_MENDED,
            "error": TRITON_IMPORT_ERROR,
        },
        "cpp": {"available": cpu_extension_error() is None, "error": cpu_extension_error()},
        "cuda_extension": {"available": cuda_extension_error() is None, "error": cuda_extension_error()},
        "ops": {},
    }
    info["cpu_matmuls"] = importlib.import_module("fastlm.ops.gemm").cpu_matmul_library()
    info["cpu_optim8bit"] = importlib.import_module("fastlm.optim.optim8bit").cpu_kernel_info()
    for op in sorted(_registry):
        info["ops"][op] = {}
        for device_type in devices:
            try:
                choice = _choose(op, device_type)
                info["ops"][op][device_type] = {"backend": choice.backend, "reason": choice.reason}
            except (RuntimeError, ValueError) as exc:
                info["ops"][op][device_type] = {"backend": None, "reason": str(exc)}
    return info
