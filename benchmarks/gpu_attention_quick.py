"""Short H200 check of fastlm.attention against SDPA (bf16, causal, head dim 128), for a device
window too small for the full gpu suite: medians by triton.testing.do_bench, TFLOP/s counting
the causal half, written as JSON lines to the path given. ``fastlm-atomic-dq`` is the backward
with ``deterministic=False`` (dQ summed with float atomics), timed to decide the default."""

import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fastlm

out = open(sys.argv[1], "a")
for seqlen, batch in ((2048, 8), (8192, 2)):
    heads, dim = 16, 128
    q, k, v = (torch.randn(batch, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    flops_fwd = 4 * batch * heads * seqlen * seqlen * dim / 2  # causal: half the score matrix
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

    def ours_fwd():
        return fastlm.attention(q, k, v, causal=True)

    def ours_atomic_fwd():
        return fastlm.attention(q, k, v, causal=True, deterministic=False)

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    for name, fwd, grad_in, grad_out in (("fastlm", ours_fwd, (q, k, v), dout),
                                         ("fastlm-atomic-dq", ours_atomic_fwd, (q, k, v), dout),
                                         ("sdpa-flash", sdpa_fwd, (qt, kt, vt), dout.transpose(1, 2))):
        with torch.no_grad():
            t_fwd = do_bench(fwd, warmup=25, rep=200)
        t_fb = do_bench(lambda: torch.autograd.grad(fwd(), grad_in, grad_out), warmup=25, rep=200)
        rec = {"provider": name, "seqlen": seqlen, "batch": batch, "heads": heads, "head_dim": dim,
               "fwd_ms": t_fwd, "fwd_tflops": flops_fwd / t_fwd / 1e9,
               "fwd_bwd_ms": t_fb, "bwd_ms": t_fb - t_fwd, "bwd_tflops": 2.5 * flops_fwd / (t_fb - t_fwd) / 1e9}
        print(json.dumps(rec), flush=True)
        out.write(json.dumps(rec) + "\n")
