"""LayerNorm / RMSNorm: fastlm vs F.layer_norm / F.rms_norm, eager and torch.compile.

    python benchmarks/bench_norms.py                 # CPU fp32 4096x4096, or GPU bf16 sweep
    python benchmarks/bench_norms.py --quick         # small, proves the script runs

Modes: fwd, bwd (the backward alone, from a retained graph) and fwd+bwd. GB/s counts the
bytes each op must move at least: forward reads x and writes y; backward reads x and dy
and writes dx (weights are negligible).
"""

import torch
import torch.nn.functional as F

import fastlm
from fastlm.benchmark import Case, parser, run_cases


def providers(kind: str, n: int) -> dict:
    if kind == "rms":
        eager = lambda x, w: F.rms_norm(x, (n,), w, 1e-6)  # noqa: E731
        ours = lambda x, w: fastlm.rms_norm(x, w, 1e-6)  # noqa: E731
    else:
        eager = lambda x, w: F.layer_norm(x, (n,), w, None, 1e-5)  # noqa: E731
        ours = lambda x, w: fastlm.layer_norm(x, w, None, 1e-5)  # noqa: E731
    return {"fastlm": ours, "torch": eager, "torch.compile": torch.compile(eager, dynamic=False)}


def cases_for(kind: str, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> list[Case]:
    x = torch.randn(rows, n, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(n, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(rows, n, dtype=dtype, device=device)
    size = x.numel() * x.element_size()
    shape = f"{rows}x{n} {str(dtype).removeprefix('torch.')}"
    cases = []
    for name, fn in providers(kind, n).items():
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
            Case(op, name, "fwd", shape, fwd, bytes_moved=2 * size),
            Case(op, name, "bwd", shape, bwd, bytes_moved=3 * size),
            Case(op, name, "fwd+bwd", shape, fwd_bwd, bytes_moved=5 * size),
        ]
    return cases


def main():
    args = parser(__doc__).parse_args()
    device = torch.device(args.device)
    if args.quick:
        sizes, dtype = [(256, 1024)], torch.float32
    elif device.type == "cuda":
        sizes, dtype = [(16384, 1024), (8192, 4096), (4096, 8192), (2048, 16384), (1024, 65536)], torch.bfloat16
    else:
        sizes, dtype = [(4096, 4096)], torch.float32
    cases = [c for kind in ("rms", "layer") for rows, n in sizes for c in cases_for(kind, rows, n, dtype, device)]
    run_cases(cases, device, args.out, min_run_time=0.2 if args.quick else 1.0)


if __name__ == "__main__":
    main()
