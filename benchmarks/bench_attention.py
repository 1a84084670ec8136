"""Attention: fastlm vs every SDPA backend available (and flash-attn / xformers when importable).

TFLOP/s count the matmuls only: forward 4 * batch * heads * seqlen_q * seqlen_k * headdim, halved
for causal (the visible half, as FlashAttention counts it); backward 2.5x the forward (five
matmuls instead of two), forward+backward 3.5x. Batch * seqlen stays at --tokens, heads at
--hidden / headdim, as in FlashAttention's benchmarks.

    python -m benchmarks.bench_attention                 # seqlen 512..16k, head dim 64/128, causal and not
    python -m benchmarks.bench_attention --quick         # small sizes, short runs: proves the script works
"""

import contextlib

import torch
import torch.nn.functional as F

import fastlm
from benchmarks.harness import Case, parser, run_cases

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def sdpa_backends(device: torch.device) -> dict[str, object]:
    """Provider name -> SDPBackend for every backend that runs here (a dry run decides)."""
    from torch.nn.attention import SDPBackend

    candidates = {"sdpa-math": SDPBackend.MATH}
    if device.type == "cuda":
        candidates.update({
            "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        })
    else:
        candidates["sdpa-flash"] = SDPBackend.FLASH_ATTENTION  # the fused CPU kernel
    return candidates


def _sdpa_call(backend):
    from torch.nn.attention import sdpa_kernel

    def call(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return call


def providers(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[str, object]]:
    """Provider name -> (layout, fn(q, k, v, causal)); layout "bshd" (fastlm, flash-attn) or "bhsd" (SDPA)."""
    found = {"fastlm": ("bshd", lambda q, k, v, causal: fastlm.attention(q, k, v, causal=causal))}
    probe = torch.randn(1, 2, 128, 64, device=device, dtype=dtype)
    for name, backend in sdpa_backends(device).items():
        call = _sdpa_call(backend)
        try:
            call(probe, probe, probe, True)
        except RuntimeError:
            continue  # not built in, or not for this dtype/device
        found[name] = ("bhsd", call)
    with contextlib.suppress(ImportError):
        from flash_attn import flash_attn_func

        found["flash-attn"] = ("bshd", lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal))
    with contextlib.suppress(ImportError):
        import xformers.ops as xops

        def xformers_call(q, k, v, causal):
            bias = xops.LowerTriangularMask() if causal else None
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias)

        found["xformers"] = ("bshd", xformers_call)
    return found


def make_case(name, layout, fn, mode, batch, seqlen, heads, head_dim, causal, dtype, device) -> Case:
    shape = (batch, seqlen, heads, head_dim) if layout == "bshd" else (batch, heads, seqlen, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=mode != "fwd") for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=dtype)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v, causal)
    elif mode == "bwd":
        out = fn(q, k, v, causal)

        def run():
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dout)
    flops = 4 * batch * heads * seqlen * seqlen * head_dim * (0.5 if causal else 1.0) * FLOP_FACTOR[mode]
    return Case(
        op="attention", provider=name, mode=mode,
        shape=f"b{batch} s{seqlen} h{heads} d{head_dim}{' causal' if causal else ''}",
        fn=run, flops=int(flops), extra={"dtype": str(dtype).removeprefix("torch."), "causal": causal},
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    p.add_argument("--hidden", type=int, default=2048, help="heads * head dim")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    seqlens, head_dims, tokens, hidden, min_run_time = args.seqlens, args.head_dims, args.tokens, args.hidden, 0.5
    if args.quick:
        seqlens, head_dims, tokens, hidden, min_run_time = [256], [64], 512, 256, 0.1
    found = providers(device, dtype)
    cases = []
    for head_dim in head_dims:
        for seqlen in seqlens:
            for causal in (False, True):
                for mode in args.modes:
                    for name, (layout, fn) in found.items():
                        cases.append(make_case(name, layout, fn, mode, max(1, tokens // seqlen), seqlen,
                                               hidden // head_dim, head_dim, causal, dtype, device))
    rows = run_cases(cases, device, args.out, min_run_time=min_run_time)
    # The comparison that matters: fastlm against the best SDPA backend of each configuration.
    best = {}
    for r in rows:
        if r["provider"].startswith("sdpa"):
            key = (r["mode"], r["shape"])
            best[key] = min(best.get(key, float("inf")), r["median_ms"])
    for r in rows:
        if r["provider"] == "fastlm" and (r["mode"], r["shape"]) in best:
            print(f"fastlm {r['mode']:8s} {r['shape']:28s} {r['tflops']:8.3f} TFLOP/s, "
                  f"{best[(r['mode'], r['shape'])] / r['median_ms']:.2f}x the best SDPA backend")


if __name__ == "__main__":
    main()
