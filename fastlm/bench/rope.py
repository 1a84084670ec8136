"""Rotary embeddings on q and k: fastlm vs torch eager (HF's rotate_half) vs torch.compile (vs Liger on CUDA).

GB/s counts reading q and k and writing their rotated copies (the cos/sin rows are small and
cached); the backward moves as much. fwd is the training forward; bwd the backward of one
saved forward.
"""

import importlib.util
from collections.abc import Iterator

import torch

import fastlm
from fastlm.bench.harness import Case, autograd_modes

# suite -> [(batch, seqlen, q heads, kv heads, head dim)]
SIZES = {
    "quick": [(2, 128, 8, 2, 64)],
    "full": [(4, 2048, 32, 8, 128)],
    "gpu": [(1, 4096, 32, 8, 128), (8, 8192, 32, 8, 128)],
}


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rope(q, k, cos, sin, position_ids):
    """The Hugging Face Llama formulation: full-width cos/sin gathered per token, in q's dtype."""
    c = torch.cat((cos, cos), dim=-1)[position_ids].to(q.dtype)[:, :, None, :]
    s = torch.cat((sin, sin), dim=-1)[position_ids].to(q.dtype)[:, :, None, :]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def _liger(device: torch.device):
    """Liger-Kernel's rope (CUDA only; it takes (batch, heads, seqlen, headdim)), or None."""
    if device.type != "cuda" or not importlib.util.find_spec("liger_kernel"):
        return None
    from liger_kernel.ops.rope import LigerRopeFunction

    def fn(q, k, cos, sin, position_ids):
        c = torch.cat((cos, cos), dim=-1)[position_ids]
        s = torch.cat((sin, sin), dim=-1)[position_ids]
        out_q, out_k = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), c, s)
        return out_q.transpose(1, 2), out_k.transpose(1, 2)

    return fn


def cases_for(b, s, hq, hk, d, dtype, device, compiled) -> Iterator[Case]:
    rotary = fastlm.nn.RotaryEmbedding(d, max_seq_len=s, device=device)
    q = torch.randn(b, s, hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, s, hk, d, device=device).to(dtype).requires_grad_()
    grads = [torch.randn_like(q), torch.randn_like(k)]
    positions = torch.arange(s, device=device).expand(b, s)

    def eager(q, k):
        return eager_rope(q, k, rotary.cos, rotary.sin, positions)

    found = {"fastlm": lambda q, k: rotary(q, k), "torch": eager}
    if compiled:
        found["torch.compile"] = torch.compile(eager, dynamic=False)
    liger = _liger(device)
    if liger is not None:
        found["liger"] = lambda q, k: liger(q, k, rotary.cos, rotary.sin, positions)
    once = 2 * (q.numel() + k.numel()) * dtype.itemsize
    moved = {"fwd": once, "bwd": once, "fwd+bwd": 2 * once}
    label = f"{b}x{s}x{hq}/{hk}x{d} {str(dtype).removeprefix('torch.')}"
    for provider, fn in found.items():
        for mode, call in autograd_modes(fn, [q, k], grads).items():
            yield Case("rope", provider, mode, label, call, size=b * s, bytes_moved=moved[mode])


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    """Built lazily, one size at a time."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compiled = suite != "quick"  # compiling costs more than the quick suite's budget
    for b, s, hq, hk, d in SIZES[suite]:
        yield from cases_for(b, s, hq, hk, d, dtype, device, compiled)
