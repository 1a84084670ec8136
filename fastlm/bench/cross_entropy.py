"""Cross-entropy and the fused LM head + cross-entropy, forward + backward.

Providers: fastlm (the backend ``auto`` picks), torch eager (``F.cross_entropy``, after
``F.linear`` for the head), ``torch.compile`` of the same, and Liger-Kernel when importable
(CUDA only). Peak memory is what a call allocates above its inputs: for the head that
includes the logits and their gradient, which is what ``linear_cross_entropy`` avoids.
GB/s (cross-entropy) counts the least traffic: read the logits once, write their gradient
once. TFLOP/s (head) counts its three matmuls: logits, grad_hidden, grad_weight.
"""

import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.harness import Case

# suite -> ([(tokens, vocab, hidden)], dtype)
SIZES = {
    "quick": ([(256, 4096, 128)], torch.float32),
    "full": ([(1024, 32000, 512)], torch.float32),
    "gpu": ([(8192, 131072, 4096)], torch.bfloat16),
}


def _liger() -> dict:
    """Liger-Kernel's (cross_entropy, linear_cross_entropy) callables, or {} when not importable."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return {}
    ce, lce = LigerCrossEntropyLoss(), LigerFusedLinearCrossEntropyLoss()
    return {"ce": lambda x, t: ce(x, t), "lce": lambda h, w, t: lce(w, h, t)}


def _torch_ce(x, t):
    return F.cross_entropy(x.float(), t)


def _torch_lce(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def _fwd_bwd(loss_fn, leaves, target):
    def run():
        return torch.autograd.grad(loss_fn(*leaves, target), leaves)

    return run


def cases_for(tokens, vocab, hidden, dtype, device, compiled) -> list[Case]:
    logits = torch.randn(tokens, vocab, dtype=dtype, device=device, requires_grad=True)
    h = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device)
    target[::17] = -100
    ce = {"fastlm": fastlm.cross_entropy, "torch": _torch_ce}
    lce = {"fastlm": fastlm.linear_cross_entropy, "torch": _torch_lce}
    if compiled:
        ce["torch.compile"] = torch.compile(_torch_ce, dynamic=False)
        lce["torch.compile"] = torch.compile(_torch_lce, dynamic=False)
    peers = _liger() if device.type == "cuda" else {}
    if peers:
        ce["liger"], lce["liger"] = peers["ce"], peers["lce"]
    name = str(dtype).removeprefix("torch.")
    logits_bytes = tokens * vocab * logits.element_size()
    cases = [
        Case("cross_entropy", provider, "fwd+bwd", f"{tokens}x{vocab} {name}", _fwd_bwd(fn, [logits], target),
             size=vocab, bytes_moved=2 * logits_bytes)
        for provider, fn in ce.items()
    ]
    cases += [
        Case("linear_cross_entropy", provider, "fwd+bwd", f"{tokens}x{vocab}x{hidden} {name}",
             _fwd_bwd(fn, [h, w], target), size=vocab, flops=6 * tokens * vocab * hidden,
             extra={"logits_bytes": logits_bytes})
        for provider, fn in lce.items()
    ]
    return cases


def cases(suite: str, device: torch.device) -> list[Case]:
    sizes, dtype = SIZES[suite]
    compiled = suite != "quick"  # compiling costs more than the quick suite's budget
    return [c for tokens, vocab, hidden in sizes for c in cases_for(tokens, vocab, hidden, dtype, device, compiled)]
