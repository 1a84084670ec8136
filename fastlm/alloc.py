"""Output allocation for op launchers, with a poison mode for tests.

Inside ``poison_outputs()`` every output an op allocates is filled with NaN (integers
with their max value) before the kernel runs, so an element the kernel fails to write
shows up in the comparison instead of passing by luck.
"""

import contextlib
import contextvars

import torch

_poison = contextvars.ContextVar("fastlm_poison", default=False)


@contextlib.contextmanager
def poison_outputs():
    token = _poison.set(True)
    try:
        yield
    finally:
        _poison.reset(token)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if _poison.get():
        t.fill_(torch.nan if t.dtype.is_floating_point else torch.iinfo(t.dtype).max)
    return t


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``empty(2, 3, ...)`` or ``empty(t.shape, ...)``: the sizes reach torch.empty unpacked, which
    parses them ~2 us faster than a torch.Size (op launchers allocate on every call)."""
    if len(shape) == 1 and not isinstance(shape[0], int):
        shape = tuple(shape[0])
    if not shape:  # a 0-dim tensor: torch.empty needs its () spelled out
        return _poisoned(torch.empty((), dtype=dtype, device=device))
    return _poisoned(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous tensor of ``t``'s shape and device (``empty_like`` is ~3 us cheaper per call than
    ``torch.empty(t.shape, ...)``, which parses a torch.Size)."""
    return _poisoned(torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format))
