"""LayerNorm / RMSNorm: fastlm vs F.layer_norm / F.rms_norm, eager and torch.compile.

Modes: fwd, bwd (the backward alone, from a retained graph) and fwd+bwd. GB/s counts the
bytes each op must move at least: forward reads x and writes y; backward reads x and dy
and writes dx (the weight is negligible).
"""

import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.harness import Case

SIZES = {
    "quick": ([(256, 1024)], torch.float32),
    "full": ([(4096, 1024), (4096, 4096), (1024, 16384)], torch.float32),
    "gpu": ([(16384, 1024), (8192, 4096), (4096, 8192), (2048, 16384), (1024, 65536)], torch.bfloat16),
}


def providers(kind: str, n: int, compiled: bool) -> dict:
    if kind == "rms":
        eager = lambda x, w: F.rms_norm(x, (n,), w, 1e-6)  # noqa: E731
        ours = lambda x, w: fastlm.rms_norm(x, w, 1e-6)  # noqa: E731
    else:
        eager = lambda x, w: F.layer_norm(x, (n,), w, None, 1e-5)  # noqa: E731
        ours = lambda x, w: fastlm.layer_norm(x, w, None, 1e-5)  # noqa: E731
    found = {"fastlm": ours, "torch": eager}
    if compiled:
        found["torch.compile"] = torch.compile(eager, dynamic=False)
    return found


def cases_for(kind: str, rows: int, n: int, dtype: torch.dtype, device: torch.device, compiled: bool) -> list[Case]:
    x = torch.randn(rows, n, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(rows, n, dtype=dtype, device=device)
    size = x.numel() * x.element_size()
    shape = f"{rows}x{n} {str(dtype).removeprefix('torch.')}"
    cases = []
    for name, fn in providers(kind, n, compiled).items():
        y = fn(x, w)

        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, w)

        def bwd(y=y):
            return torch.autograd.grad(y, (x, w), dy, retain_graph=True)

        def fwd_bwd(fn=fn):
            return torch.autograd.grad(fn(x, w), (x, w), dy)

        op = f"{kind}_norm"
        cases += [
            Case(op, name, "fwd", shape, fwd, size=n, bytes_moved=2 * size),
            Case(op, name, "bwd", shape, bwd, size=n, bytes_moved=3 * size),
            Case(op, name, "fwd+bwd", shape, fwd_bwd, size=n, bytes_moved=5 * size),
        ]
    return cases


def cases(suite: str, device: torch.device) -> list[Case]:
    sizes, dtype = SIZES[suite]
    compiled = suite != "quick"  # compiling costs more than the quick suite's budget
    return [c for kind in ("rms", "layer") for rows, n in sizes for c in cases_for(kind, rows, n, dtype, device, compiled)]
