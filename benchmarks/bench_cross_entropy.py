"""Cross-entropy and linear (LM-head) cross-entropy, forward + backward: time and peak memory.

Providers: fastlm (the backend ``auto`` picks), torch eager (``F.cross_entropy``, with
``F.linear`` for the LM head), ``torch.compile`` of the same, and Liger-Kernel when it is
importable (CUDA only). Peak memory is what the call allocates above its inputs: for the
LM head, the logits and their gradient are part of it, which is what the fused op avoids.

    python -m benchmarks.bench_cross_entropy                      # GPU: 8192 x 128k x 4096 bf16
    python -m benchmarks.bench_cross_entropy --tokens 1024 --vocab 32000 --hidden 512   # CPU
"""

import torch
import torch.nn.functional as F

import fastlm
from benchmarks.harness import Case, parser, run_cases

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _liger():
    """(cross_entropy, linear_cross_entropy) callables from Liger-Kernel, or None."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    ce = LigerCrossEntropyLoss()
    lce = LigerFusedLinearCrossEntropyLoss()
    return (lambda x, t: ce(x, t)), (lambda h, w, t: lce(w, h, t))


def _fwd_bwd(loss_fn, leaves, *args):
    def run():
        loss_fn(*leaves, *args).backward()
        for t in leaves:
            t.grad = None

    return run


def build_cases(tokens, vocab, hidden, dtype, device):
    logits = torch.randn(tokens, vocab, dtype=dtype, device=device, requires_grad=True)
    h = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[::17] = -100

    def torch_lce(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t)

    providers_ce = {
        "fastlm": fastlm.cross_entropy,
        "torch": lambda x, t: F.cross_entropy(x.float(), t),
        "torch.compile": torch.compile(lambda x, t: F.cross_entropy(x.float(), t)),
    }
    providers_lce = {
        "fastlm": fastlm.linear_cross_entropy,
        "torch": torch_lce,
        "torch.compile": torch.compile(torch_lce),
    }
    liger = _liger() if device.type == "cuda" else None
    if liger is not None:
        providers_ce["liger"], providers_lce["liger"] = liger

    elt = logits.element_size()
    shape_ce = f"{tokens}x{vocab}"
    shape_lce = f"{tokens}x{vocab}x{hidden}"
    cases = [
        # Least traffic for fwd+bwd: read the logits once, write their gradient once.
        Case("cross_entropy", name, "fwd+bwd", shape_ce, _fwd_bwd(fn, [logits], target),
             bytes_moved=2 * tokens * vocab * elt)
        for name, fn in providers_ce.items()
    ]
    cases += [
        # Three matmuls: the logits, grad_hidden and grad_weight.
        Case("linear_ce", name, "fwd+bwd", shape_lce, _fwd_bwd(fn, [h, w], target),
             flops=6 * tokens * vocab * hidden, extra={"logits_bytes": tokens * vocab * elt})
        for name, fn in providers_lce.items()
    ]
    return cases


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        sizes = (256, 4096, 128)
    else:
        sizes = (8192, 131072, 4096) if gpu else (1024, 32000, 512)
    tokens, vocab, hidden = (given or default for given, default in zip((args.tokens, args.vocab, args.hidden), sizes))
    dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    cases = build_cases(tokens, vocab, hidden, dtype, device)
    run_cases(cases, device, args.out, min_run_time=0.2 if args.quick else 1.0)


if __name__ == "__main__":
    main()
