"""Per-call time of fastlm ops in eager mode: the eager fast path (fastlm.eager), the same calls through the
registered torch.library ops (``fastlm.eager.use_custom_ops()``), and plain PyTorch, alternating in one
process. Small shapes show the fixed per-call cost; (2048, 128) shows where the kernel starts to count.

    OMP_NUM_THREADS=1 python benchmarks/eager_overhead_ab.py [ROUNDS]

Prints, per case and mode, the median over ROUNDS (default 15) of each provider's mean time per call.
"""

import contextlib
import time

import torch
import torch.nn.functional as F

import fastlm
from fastlm import eager
from fastlm.bench.harness import ab_count


def _rms_norm_case(rows: int, n: int):
    x = torch.randn(rows, n, requires_grad=True)
    w = torch.randn(n, requires_grad=True)
    return (x, w), {"fastlm": lambda x, w: fastlm.rms_norm(x, w), "torch": lambda x, w: F.rms_norm(x, (n,), w, 1e-6)}


def _swiglu_case(rows: int, n: int):
    gate, up = torch.randn(rows, n, requires_grad=True), torch.randn(rows, n, requires_grad=True)
    return (gate, up), {"fastlm": fastlm.swiglu, "torch": lambda g, u: F.silu(g) * u}


def _rope_case(batch: int, seqlen: int, heads: int, head_dim: int):
    q = torch.randn(batch, seqlen, heads, head_dim, requires_grad=True)
    k = torch.randn(batch, seqlen, heads, head_dim, requires_grad=True)
    angles = torch.arange(seqlen)[:, None] * torch.rand(head_dim // 2)[None, :]
    cos, sin = angles.cos(), angles.sin()

    def torch_rope(q, k):
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = []
        for t in (q, k):
            a, b = t.chunk(2, dim=-1)
            out.append(torch.cat((a * c - b * s, b * c + a * s), dim=-1))
        return tuple(out)

    return (q, k), {"fastlm": lambda q, k: fastlm.rope(q, k, cos, sin), "torch": torch_rope}


CASES = {
    "rms_norm 1x128": lambda: _rms_norm_case(1, 128),
    "rms_norm 256x128": lambda: _rms_norm_case(256, 128),
    "rms_norm 2048x128": lambda: _rms_norm_case(2048, 128),
    "swiglu 256x352": lambda: _swiglu_case(256, 352),
    "rope 2x128x4x32": lambda: _rope_case(2, 128, 4, 32),
}


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _modes(fn, inputs):
    grads = [torch.randn_like(o) for o in _outputs(fn(*inputs))]

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        torch.autograd.grad(_outputs(fn(*inputs)), inputs, grads)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _per_call_us(step, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    rounds = ab_count(__doc__, argv, "ROUNDS", 15, "rounds")
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}; median over {rounds} alternating rounds, us per call")
    # provider -> the context its calls run in: the custom-op route is the same call inside use_custom_ops().
    routes = {"fastlm eager": contextlib.nullcontext, "fastlm custom-op": eager.use_custom_ops,
              "torch": contextlib.nullcontext}
    for case_name, make in CASES.items():
        inputs, fns = make()
        steps = {name: _modes(fns["torch" if name == "torch" else "fastlm"], inputs) for name in routes}
        for mode in ("fwd", "fwd+bwd"):
            with eager.use_custom_ops():  # enough calls per round for ~20 ms of the slowest fastlm route
                calls = max(5, int(20e3 / _per_call_us(steps["fastlm custom-op"][mode], 5)))
            times = {name: [] for name in routes}
            for _ in range(rounds):
                for name, route in routes.items():
                    with route():
                        times[name].append(_per_call_us(steps[name][mode], calls))
            median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
            row = "  ".join(f"{name} {us:8.1f}" for name, us in median.items())
            print(f"{case_name:18s} {mode:8s} {row}")

if __name__ == "__main__":
    main()
