"""Attention: fastlm vs every SDPA backend that runs here, flash-attn and xformers when importable.

TFLOP/s count the matmuls only: forward 4 * batch * heads * seqlen^2 * headdim, halved for
causal (the visible half, as FlashAttention counts it); backward 2.5x the forward (five
matmuls instead of two), forward+backward 3.5x. batch * seqlen stays at ``tokens`` and
heads * headdim at ``hidden``, as in FlashAttention's benchmarks, so every size does the
same work per token. fwd is the inference forward (no graph); bwd the backward of one
saved forward.
"""

import importlib.util
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.harness import Case, autograd_modes

# suite -> (seqlens, head dims, tokens = batch * seqlen, hidden = heads * head dim)
SIZES = {
    "quick": ([128], [64], 256, 128),
    "full": ([512, 1024, 2048], [64, 128], 4096, 2048),
    "gpu": ([1024, 2048, 4096, 8192, 16384], [64, 128], 16384, 2048),
}
# CPU training shapes, fp32 causal: (batch, seqlen, heads, kv heads, head dim). The first is one layer
# of fastlm's `tiny` preset step (issue #6's CPU target); quick runs it, full runs all three.
CPU_TRAIN_SHAPES = {
    "quick": [(16, 128, 4, 2, 32)],
    "full": [(16, 128, 4, 2, 32), (4, 512, 8, 8, 64), (2, 1024, 8, 8, 128)],
}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
MATH_MAX_SEQLEN_CUDA = 4096
"""The math backend materializes batch * heads * seqlen^2 scores (and their gradient): beyond
this it costs tens of GB and seconds per call on a GPU for a figure nobody compares against."""


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    return call


def _xformers():
    import xformers.ops as xops

    def call(q, k, v, causal):
        return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask() if causal else None)

    return call


def providers(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict[str, tuple[str, object]]:
    """Provider -> (layout, fn(q, k, v, causal)) for those that run this dtype and head dim here.

    layout is "bshd" (fastlm, flash-attn, xformers) or "bhsd" (SDPA). A dry run on a small
    input decides: a backend not built in, or not for this dtype/device/head dim, is left out.
    """
    from torch.nn.attention import SDPBackend

    candidates = {"fastlm": ("bshd", lambda q, k, v, causal: fastlm.attention(q, k, v, causal=causal))}
    if device.type == "cuda":
        # The Triton backward that sums dQ with float atomics (on the CPU backends the flag changes nothing).
        candidates["fastlm-atomic-dq"] = (
            "bshd", lambda q, k, v, causal: fastlm.attention(q, k, v, causal=causal, deterministic=False)
        )
    for name, backend in (("sdpa-math", SDPBackend.MATH), ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        candidates[name] = ("bhsd", _sdpa(backend))
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        from flash_attn import flash_attn_func

        candidates["flash-attn"] = ("bshd", lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal))
    if importlib.util.find_spec("xformers"):
        candidates["xformers"] = ("bshd", _xformers())
    found = {}
    probe = torch.randn(1, 128, 2, head_dim, device=device, dtype=dtype)
    for name, (layout, fn) in candidates.items():
        try:
            fn(probe, probe, probe, True)
        except (RuntimeError, NotImplementedError, ValueError):
            continue
        found[name] = (layout, fn)
    return found


def _case(name, layout, fn, batch, seqlen, heads, head_dim, causal, dtype, device, kv_heads=None) -> Iterator[Case]:
    kv_heads = kv_heads or heads

    def shape(h):
        return (batch, seqlen, h, head_dim) if layout == "bshd" else (batch, h, seqlen, head_dim)

    q = torch.randn(shape(heads), device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(shape(kv_heads), device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(shape(heads), device=device, dtype=dtype)
    kv = f" kv{kv_heads}" if kv_heads != heads else ""
    label = (f"b{batch} s{seqlen} h{heads}{kv} d{head_dim}{' causal' if causal else ''} "
             f"{str(dtype).removeprefix('torch.')}")
    fwd_flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0)
    calls = autograd_modes(lambda q, k, v: fn(q, k, v, causal), [q, k, v], dout, train_forward=False)
    for mode, call in calls.items():
        if name == "fastlm-atomic-dq" and mode == "fwd":
            continue  # the same forward as fastlm's
        yield Case("attention", name, mode, label, call, size=seqlen, flops=int(fwd_flops * FLOP_FACTOR[mode]),
                   extra={"causal": causal, "head_dim": head_dim,
                          "series": f"d{head_dim}{' causal' if causal else ''}"})


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    """Built lazily: each provider's tensors (and its saved forward) live only while measured."""
    seqlens, head_dims, tokens, hidden = SIZES[suite]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for head_dim in head_dims:
        found = providers(device, dtype, head_dim)
        for seqlen in seqlens:
            for causal in (False, True):
                for name, (layout, fn) in found.items():
                    if name == "sdpa-math" and device.type == "cuda" and seqlen > MATH_MAX_SEQLEN_CUDA:
                        continue
                    yield from _case(name, layout, fn, max(1, tokens // seqlen), seqlen, hidden // head_dim,
                                     head_dim, causal, dtype, device)
    if device.type == "cpu":
        # Training shapes against SDPA's CPU flash kernel (GQA through enable_gqa); its autograd keeps
        # the forward's outputs, so its fwd+bwd has no forward recompute either.
        for batch, seqlen, heads, kv_heads, head_dim in CPU_TRAIN_SHAPES.get(suite, []):
            found = providers(device, torch.float32, head_dim)
            for name in ("fastlm", "sdpa-flash"):
                if name in found:
                    yield from _case(name, *found[name], batch, seqlen, heads, head_dim, True, torch.float32, device,
                                     kv_heads)
