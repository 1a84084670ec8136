"""Rotary embeddings on q and k: fastlm vs torch eager (HF's rotate_half) vs torch.compile (vs Liger on CUDA).

    python benchmarks/bench_rope.py                      # batch 4 x 4096 tokens, 32 q / 8 kv heads, headdim 128
    python benchmarks/bench_rope.py --quick

Modes as in bench_ffn.py (fwd, bwd of one forward, fwd+bwd). GB/s counts reading q and k and
writing their rotated copies (the cos/sin rows are small and cached).
"""

import sys
from pathlib import Path

import torch
import torch._functorch.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastlm  # noqa: E402
from benchmarks.bench_ffn import DTYPES, timed_modes  # noqa: E402
from benchmarks.harness import Case, parser, run_cases  # noqa: E402


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rope(q, k, cos, sin, position_ids):
    """The Hugging Face Llama formulation: full-width cos/sin gathered per token, in q's dtype."""
    c = torch.cat((cos, cos), dim=-1)[position_ids].to(q.dtype)[:, :, None, :]
    s = torch.cat((sin, sin), dim=-1)[position_ids].to(q.dtype)[:, :, None, :]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def liger_rope():
    """Liger-Kernel's rope when importable (CUDA only; it takes (batch, heads, seqlen, headdim))."""
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except ImportError:
        return None

    def fn(q, k, cos, sin, position_ids):
        c = torch.cat((cos, cos), dim=-1)[position_ids]
        s = torch.cat((sin, sin), dim=-1)[position_ids]
        out_q, out_k = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), c, s)
        return out_q.transpose(1, 2), out_k.transpose(1, 2)

    return fn


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--providers", nargs="+", default=["fastlm", "torch", "torch.compile", "liger"])
    p.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "fwd+bwd"], default=["fwd", "bwd", "fwd+bwd"])
    args = p.parse_args()
    torch._functorch.config.donated_buffer = False  # the bwd mode replays one compiled backward
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.quick:
        args.batch, args.seqlen, args.heads, args.kv_heads, args.headdim = 2, 256, 8, 2, 64

    b, s, hq, hk, d = args.batch, args.seqlen, args.heads, args.kv_heads, args.headdim
    rotary = fastlm.nn.RotaryEmbedding(d, max_seq_len=s, device=device)
    q = torch.randn(b, s, hq, d, device=device).to(dtype).requires_grad_()
    k = torch.randn(b, s, hk, d, device=device).to(dtype).requires_grad_()
    grads = [torch.randn_like(q), torch.randn_like(k)]
    positions = torch.arange(s, device=device).expand(b, s)

    providers = {
        "fastlm": lambda q, k: rotary(q, k),
        "torch": lambda q, k: eager_rope(q, k, rotary.cos, rotary.sin, positions),
        "torch.compile": torch.compile(lambda q, k: eager_rope(q, k, rotary.cos, rotary.sin, positions)),
    }
    liger = liger_rope() if device.type == "cuda" else None
    if liger is not None:
        providers["liger"] = lambda q, k: liger(q, k, rotary.cos, rotary.sin, positions)
    moved_once = 2 * (q.numel() + k.numel()) * dtype.itemsize
    moved = {"fwd": moved_once, "bwd": moved_once, "fwd+bwd": 2 * moved_once}
    cases = []
    for provider, fn in providers.items():
        if provider not in args.providers:
            continue
        for mode, call in timed_modes(fn, [q, k], grads).items():
            if mode in args.modes:
                cases.append(Case("rope", provider, mode, f"{b}x{s}x{hq}/{hk}x{d}", call, bytes_moved=moved[mode],
                                  extra={"dtype": str(dtype)}))
    run_cases(cases, device, args.out, min_run_time=0.2 if args.quick else 1.0)


if __name__ == "__main__":
    main()
