"""``fastlm.ops.linear`` (fastlm's gemm: oneDNN on CPU) vs ``F.linear`` (MKL on CPU), float32.

TFLOP/s of the layer's matmuls: 2 * tokens * in * out for the forward, twice that for the
backward (the input and the weight gradients). fwd is the training forward; bwd the backward of
one saved forward. On CUDA fastlm's gemm IS torch's (cuBLAS), so there is nothing to compare.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.harness import Case, autograd_modes

# suite -> [(tokens, in_features, out_features)]: the tiny preset's fused gate/up and down projections,
# and a GPT-2 124M MLP layer.
SIZES = {
    "quick": [(2048, 128, 768)],
    "full": [(2048, 128, 768), (2048, 384, 128), (4096, 768, 3072)],
    "gpu": [],
}


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    """Built lazily, one size at a time."""
    if device.type != "cpu":
        return
    for tokens, d_in, d_out in SIZES[suite]:
        torch.manual_seed(0)
        # The backward computes all three gradients, as in training (autograd_modes differentiates its inputs).
        x = torch.randn(tokens, d_in, requires_grad=True)
        weight = (torch.randn(d_out, d_in) / d_in**0.5).requires_grad_()
        bias = torch.randn(d_out).requires_grad_()
        grad = torch.randn(tokens, d_out)
        flops = 2 * tokens * d_in * d_out
        per_mode = {"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops}
        for provider, fn in (("fastlm", fastlm.ops.linear), ("torch", F.linear)):
            for mode, call in autograd_modes(fn, [x, weight, bias], grad).items():
                yield Case("linear", provider, mode, f"{tokens}x{d_in}->{d_out} float32", call, size=d_in * d_out,
                           flops=per_mode[mode])
