"""Import Triton when it is installed; otherwise stand-ins that let kernel files import.

Triton ships for Linux only. Op files define their kernels with ``@triton.jit`` at module
level, so on a machine without Triton they get these stand-ins: decorating works, and
launching raises (the dispatcher never picks the Triton backend there).
"""

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only where Triton is absent
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _MissingKernel:
        def __init__(self, fn):
            self.fn = fn
            self.__name__ = fn.__name__

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton is not installed; kernel {self.__name__} cannot run")

    class _StandIn:
        """Answers any attribute so annotations like ``tl.constexpr`` evaluate."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    class _TritonStandIn(_StandIn):
        @staticmethod
        def jit(fn=None, **kwargs):
            return _MissingKernel(fn) if fn is not None else _MissingKernel

        @staticmethod
        def next_power_of_2(n):
            return 1 << (max(int(n), 1) - 1).bit_length()

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = _TritonStandIn()
    tl = _StandIn()


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


__all__ = ["triton", "tl", "HAS_TRITON", "TRITON_IMPORT_ERROR", "interpreter_enabled"]
