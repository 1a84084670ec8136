"""Training attention on the CPU, fp32 causal, alternating calls in one process: fastlm.attention (the
C++ kernel: a forward that writes the LSE, a backward that starts from it) against SDPA's autograd, at
the training shapes of fastlm/bench/attention.py (the first is one layer of the `tiny` preset's step).

    python benchmarks/attention_cpu_train_ab.py [CALLS]

Prints the median milliseconds of each over CALLS alternating calls (default 20; a quarter of that,
at least 5, for the two large shapes): "fwd" is the forward a training step runs (with the LSE),
"fwd+bwd" the forward and the backward of a random output gradient.
"""


import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.attention import CPU_TRAIN_SHAPES
from fastlm.bench.harness import ab_count, alternating_medians


def medians(runs: dict, calls: int) -> str:
    return "  ".join(f"{name} {ms:.3f} ms" for name, ms in alternating_medians(runs, calls).items())


def main(argv: list[str] | None = None) -> None:
    calls = ab_count(__doc__, argv, "CALLS", 20, "calls")
    torch.manual_seed(0)
    for batch, seqlen, heads, kv_heads, head_dim in CPU_TRAIN_SHAPES["full"]:
        q = torch.randn(batch, seqlen, heads, head_dim, requires_grad=True)
        k, v = (torch.randn(batch, seqlen, kv_heads, head_dim, requires_grad=True) for _ in range(2))
        dout = torch.randn(batch, seqlen, heads, head_dim)
        qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        dout_t = dout.transpose(1, 2)

        def fastlm_fwd():
            with torch.no_grad():
                fastlm.attention(q, k, v, causal=True, return_lse=True)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=kv_heads != heads)

        def fastlm_train():
            fastlm.attention(q, k, v, causal=True).backward(dout)

        def sdpa_train():
            F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=kv_heads != heads).backward(dout_t)

        n = calls if seqlen <= 128 else max(5, calls // 4)
        label = f"{batch}x{seqlen} h{heads} kv{kv_heads} d{head_dim} causal"
        print(f"{label} fwd:     {medians({'fastlm': fastlm_fwd, 'sdpa': sdpa_fwd}, n)}")
        print(f"{label} fwd+bwd: {medians({'fastlm': fastlm_train, 'sdpa': sdpa_train}, n)}")


if __name__ == "__main__":
    main()
