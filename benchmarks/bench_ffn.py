"""SwiGLU / GeGLU elementwise and the MLP modules: fastlm vs torch eager vs torch.compile (vs Liger on CUDA).

    python benchmarks/bench_ffn.py                       # 4096 x 11008 (Llama-7B FFN width), CUDA or CPU
    python benchmarks/bench_ffn.py --quick               # small sizes: proves the script works
    python benchmarks/bench_ffn.py --tokens 1024 --providers fastlm torch --parts elementwise

Modes: ``fwd`` (training forward: inputs require grad), ``bwd`` (the backward of one saved
forward, via torch.autograd.grad so gradients do not accumulate), ``fwd+bwd``. GB/s counts
the bytes the op must move at least: forward reads gate and up and writes y; backward reads
dy, gate and up and writes dgate and dup.
"""

import functools
import sys
from pathlib import Path

import torch
import torch._functorch.config
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastlm  # noqa: E402
from benchmarks.harness import Case, parser, run_cases  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_swiglu(g, u):
    return F.silu(g) * u


def eager_geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


def liger_functions():
    """Liger-Kernel's fused activations when importable (CUDA only), else {}."""
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return {}
    return {"swiglu": LigerSiLUMulFunction.apply, "geglu": LigerGELUMulFunction.apply}


def timed_modes(fn, inputs, grad_out):
    """{mode: zero-argument callable} for forward, backward of one forward, and both.

    ``fn`` returns a tensor or a tuple of them; ``grad_out`` matches it.
    """

    def fwd():
        return fn(*inputs)

    saved = fn(*inputs)

    def bwd():
        return torch.autograd.grad(saved, inputs, grad_out, retain_graph=True)

    def both():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def elementwise_cases(args, device, dtype):
    tokens, hidden = args.tokens, args.hidden
    g = (torch.randn(tokens, hidden, device=device) * 2).to(dtype).requires_grad_()
    u = torch.randn(tokens, hidden, device=device).to(dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, device=device).to(dtype)
    liger = liger_functions() if device.type == "cuda" else {}
    element = dtype.itemsize * tokens * hidden
    moved = {"fwd": 3 * element, "bwd": 5 * element, "fwd+bwd": 8 * element}
    cases = []
    for op, ours, eager in (
        ("swiglu", fastlm.swiglu, eager_swiglu),
        ("geglu", functools.partial(fastlm.geglu, approximate="tanh"), eager_geglu),
    ):
        providers = {"fastlm": ours, "torch": eager, "torch.compile": torch.compile(eager)}
        if op in liger:
            providers["liger"] = liger[op]
        for provider, fn in providers.items():
            if provider not in args.providers:
                continue
            for mode, call in timed_modes(fn, [g, u], dy).items():
                if mode in args.modes:
                    cases.append(Case(op, provider, mode, f"{tokens}x{hidden}", call, bytes_moved=moved[mode],
                                      extra={"dtype": str(dtype)}))
    return cases


class EagerSwiGLUMLP(torch.nn.Module):
    """The plain PyTorch Llama MLP with fastlm.nn.SwiGLUMLP's weights (shared, not copied)."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        gate, up = self.m.gate_up_proj(x).chunk(2, dim=-1)
        return self.m.down_proj(F.silu(gate) * up)


class EagerGELUMLP(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m.down_proj(F.gelu(self.m.up_proj(x), approximate=self.m.approximate))


def mlp_cases(args, device, dtype):
    tokens, dim, hidden = args.mlp_tokens, args.dim, args.mlp_hidden
    x = torch.randn(tokens, dim, device=device).to(dtype).requires_grad_()
    dy = torch.randn(tokens, dim, device=device).to(dtype)
    cases = []
    for op, module, eager_cls, widths in (
        ("SwiGLUMLP", fastlm.nn.SwiGLUMLP(dim, hidden, device=device, dtype=dtype), EagerSwiGLUMLP, 3),
        ("GELUMLP", fastlm.nn.GELUMLP(dim, hidden, device=device, dtype=dtype), EagerGELUMLP, 2),
    ):
        eager = eager_cls(module)
        params = [x] + list(module.parameters())
        flops_fwd = 2 * tokens * dim * hidden * widths
        flops = {"fwd": flops_fwd, "bwd": 2 * flops_fwd, "fwd+bwd": 3 * flops_fwd}
        for provider, fn in (("fastlm", module), ("torch", eager), ("torch.compile", torch.compile(eager))):
            if provider not in args.providers:
                continue
            # The module reads its parameters itself; they are listed only to get their gradients.
            modes = timed_modes(lambda x, *_, module_fn=fn: module_fn(x), params, dy)
            for mode, call in modes.items():
                if mode in args.modes:
                    cases.append(Case(op, provider, mode, f"{tokens}x{dim}x{hidden}", call, flops=flops[mode],
                                      extra={"dtype": str(dtype)}))
    return cases


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=11008)
    p.add_argument("--mlp-tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--mlp-hidden", type=int, default=11008)
    p.add_argument("--parts", nargs="+", choices=["elementwise", "mlp"], default=["elementwise", "mlp"])
    p.add_argument("--providers", nargs="+", default=["fastlm", "torch", "torch.compile", "liger"])
    p.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "fwd+bwd"], default=["fwd", "bwd", "fwd+bwd"])
    args = p.parse_args()
    # The bwd mode replays one compiled backward (retain_graph=True), which donated buffers forbid.
    torch._functorch.config.donated_buffer = False
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.quick:
        args.tokens, args.hidden, args.mlp_tokens, args.dim, args.mlp_hidden = 256, 1000, 128, 256, 688
    cases = []
    if "elementwise" in args.parts:
        cases += elementwise_cases(args, device, dtype)
    if "mlp" in args.parts:
        cases += mlp_cases(args, device, dtype)
    run_cases(cases, device, args.out, min_run_time=0.2 if args.quick else 1.0)


if __name__ == "__main__":
    main()
