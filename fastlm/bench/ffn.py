"""SwiGLU / GeGLU and the MLP modules: fastlm vs torch eager vs torch.compile (vs Liger on CUDA).

Elementwise (swiglu, geglu): GB/s counts the bytes the op must move at least: forward reads
gate and up and writes y; backward reads dy, gate and up and writes dgate and dup. The MLP
modules (SwiGLUMLP, GELUMLP): TFLOP/s of their matmuls (backward twice the forward). fwd is
the training forward (inputs require grad); bwd the backward of one saved forward.
"""

import functools
import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.harness import Case, autograd_modes

# suite -> (elementwise [(tokens, hidden)], MLP [(tokens, dim, hidden)])
SIZES = {
    "quick": ([(256, 1000)], [(128, 256, 688)]),
    "full": ([(4096, 4096), (4096, 11008)], [(1024, 2048, 5632)]),
    "gpu": ([(4096, 11008), (8192, 14336)], [(8192, 4096, 11008)]),
}


def eager_swiglu(g, u):
    return F.silu(g) * u


def eager_geglu(g, u):
    return F.gelu(g, approximate="tanh") * u


class EagerSwiGLUMLP(torch.nn.Module):
    """The plain PyTorch Llama MLP on fastlm.nn.SwiGLUMLP's weights (shared, not copied)."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        gate, up = self.m.gate_up_proj(x).chunk(2, dim=-1)
        return self.m.down_proj(F.silu(gate) * up)


class EagerGELUMLP(torch.nn.Module):
    """The plain PyTorch GPT-2 MLP on fastlm.nn.GELUMLP's weights."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x):
        return self.m.down_proj(F.gelu(self.m.up_proj(x), approximate=self.m.approximate))


def _liger(device: torch.device) -> dict:
    """Liger-Kernel's fused activations (CUDA only), or {} when not importable."""
    if device.type != "cuda" or not importlib.util.find_spec("liger_kernel"):
        return {}
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return {"swiglu": LigerSiLUMulFunction.apply, "geglu": LigerGELUMulFunction.apply}


def elementwise_cases(tokens, hidden, dtype, device, compiled) -> Iterator[Case]:
    g = (torch.randn(tokens, hidden, device=device) * 2).to(dtype).requires_grad_()
    u = torch.randn(tokens, hidden, device=device).to(dtype).requires_grad_()
    dy = torch.randn(tokens, hidden, device=device).to(dtype)
    element = dtype.itemsize * tokens * hidden
    moved = {"fwd": 3 * element, "bwd": 5 * element, "fwd+bwd": 8 * element}
    liger = _liger(device)
    label = f"{tokens}x{hidden} {str(dtype).removeprefix('torch.')}"
    for op, ours, eager in (
        ("swiglu", fastlm.swiglu, eager_swiglu),
        ("geglu", functools.partial(fastlm.geglu, approximate="tanh"), eager_geglu),
    ):
        found = {"fastlm": ours, "torch": eager}
        if compiled:
            found["torch.compile"] = torch.compile(eager, dynamic=False)
        if op in liger:
            found["liger"] = liger[op]
        for provider, fn in found.items():
            for mode, call in autograd_modes(fn, [g, u], dy).items():
                yield Case(op, provider, mode, label, call, size=hidden, bytes_moved=moved[mode])


def mlp_cases(tokens, dim, hidden, dtype, device, compiled) -> Iterator[Case]:
    x = torch.randn(tokens, dim, device=device).to(dtype).requires_grad_()
    dy = torch.randn(tokens, dim, device=device).to(dtype)
    label = f"{tokens}x{dim}x{hidden} {str(dtype).removeprefix('torch.')}"
    for op, module, eager_cls, matmuls in (
        ("SwiGLUMLP", fastlm.nn.SwiGLUMLP(dim, hidden, device=device, dtype=dtype), EagerSwiGLUMLP, 3),
        ("GELUMLP", fastlm.nn.GELUMLP(dim, hidden, device=device, dtype=dtype), EagerGELUMLP, 2),
    ):
        eager = eager_cls(module)
        found = {"fastlm": module, "torch": eager}
        if compiled:
            found["torch.compile"] = torch.compile(eager, dynamic=False)
        flops_fwd = 2 * tokens * dim * hidden * matmuls
        flops = {"fwd": flops_fwd, "bwd": 2 * flops_fwd, "fwd+bwd": 3 * flops_fwd}
        # The module reads its parameters itself; they are inputs only to get their gradients.
        inputs = [x, *module.parameters()]
        for provider, fn in found.items():
            modes = autograd_modes(lambda x, *_, fn=fn: fn(x), inputs, dy)
            for mode, call in modes.items():
                yield Case(op, provider, mode, label, call, size=hidden, flops=flops[mode])


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    """Built lazily, one size at a time."""
    elementwise, mlps = SIZES[suite]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = suite != "quick"  # compiling costs more than the quick suite's budget
    for tokens, hidden in elementwise:
        yield from elementwise_cases(tokens, hidden, dtype, device, compiled)
    for tokens, dim, hidden in mlps:
        yield from mlp_cases(tokens, dim, hidden, dtype, device, compiled)
