"""Import Triton when it is installed; otherwise stand-ins that let kernel files import.

Triton ships for Linux only. Op files define their kernels with ``@triton.jit`` at module
level, so on a machine without Triton they get these stand-ins: decorating works, and
launching raises (the dispatcher never picks the Triton backend there).
"""

import inspect
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


def _mend_interpreter_loop_bounds() -> str | None:
    """Make Triton 3.6's interpreter run with NumPy >= 2.4; returns what was changed, or None.

    The interpreter holds a scalar as a 1-element array and turns it into a loop bound (``range(lo, hi)``
    over computed bounds, as every fastlm kernel has) with ``int(array)``, which NumPy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"). Triton fixed it upstream by squeezing the
    array first (triton-lang/triton#9171); Triton 3.6, which torch 2.11 pins, predates the fix. This
    applies the same fix where the installed interpreter lacks it. fastlm.backend_info() reports it.
    """
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return None
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    numpy_version = tuple(int(part) for part in np.__version__.split(".")[:2])
    if numpy_version < (2, 4) or patch is None:
        return None
    try:
        unfixed = "int(self.handle.data))" in inspect.getsource(patch)
    except (OSError, TypeError):  # no source to read: leave the interpreter as it is
        return None
    if not unfixed:
        return None

    def patch_with_squeezed_index(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_squeezed_index
    return (f"Triton {triton.__version__}'s interpreter converts loop bounds as NumPy {np.__version__} refuses; "
            "fastlm squeezes them first, as Triton does from triton-lang/triton#9171 on")


INTERPRETER_MENDED = _mend_interpreter_loop_bounds() if HAS_TRITON and interpreter_enabled() else None

__all__ = ["triton", "tl", "HAS_TRITON", "TRITON_IMPORT_ERROR", "INTERPRETER_MENDED", "interpreter_enabled"]
