"""Forward-only attention on the CPU (inference, evaluation: no gradient), alternating calls in one process:
fastlm.attention as it runs there (the C++ forward, which then writes no LSE), the same with
``return_lse=True``, and SDPA called directly. The evidence for the cpp backend's rule that every fp32
forward without dropout runs the C++ kernel (fastlm/ops/attention.py).

    python benchmarks/attention_cpu_forward_ab.py [CALLS]

Prints the median milliseconds of each over CALLS alternating calls (default 60), fp32, per shape.
"""


import torch
import torch.nn.functional as F

import fastlm
from fastlm.bench.harness import ab_count, alternating_medians

# (batch, seqlen, heads, head dim): small training shapes, and the suite's full-size one.
SHAPES = [(2, 128, 2, 64), (4, 256, 4, 64), (16, 128, 4, 32), (8, 512, 32, 64)]


def main(argv: list[str] | None = None) -> None:
    calls = ab_count(__doc__, argv, "CALLS", 60, "calls")
    torch.manual_seed(0)
    for batch, seqlen, heads, head_dim in SHAPES:
        for causal in (False, True):
            q, k, v = (torch.randn(batch, seqlen, heads, head_dim) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            runs = {
                "fastlm": lambda: fastlm.attention(q, k, v, causal=causal),
                "fastlm + lse": lambda: fastlm.attention(q, k, v, causal=causal, return_lse=True),
                "sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal),
            }
            with torch.no_grad():
                ms = alternating_medians(runs, calls)
            medians = "  ".join(f"{name} {m:.3f} ms" for name, m in ms.items())
            print(f"{batch}x{seqlen} h{heads} d{head_dim} {'causal' if causal else 'full'}: {medians}")


if __name__ == "__main__":
    main()
