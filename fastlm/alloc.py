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
    return _poisoned(torch.empty(*shape, dtype=dtype, device=device))


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return _poisoned(torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device))
