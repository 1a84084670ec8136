"""The machine's own ceilings, measured in the same run as the benchmarks.

Bandwidth: a large device-to-device copy (bytes read + written / time). Compute: a large
matmul in the dtype the GPU benchmarks use (bf16 on CUDA, fp32 on CPU; there the faster of torch's
and fastlm's gemm). Percentages of these, not of a datasheet, are what the reports give.
"""

import torch

from fastlm.bench.harness import time_fns
from fastlm.ops.gemm import gemm


def measure_roofline(device: torch.device, quick: bool = False) -> dict:
    if device.type == "cuda":
        copy_elems, mm, dtype = 1 << 30, 8192, torch.bfloat16  # 2 GiB bf16 copy, 8192^3 matmul
    else:
        copy_elems, mm, dtype = (1 << 24, 512, torch.float32) if quick else (1 << 26, 2048, torch.float32)
    src = torch.empty(copy_elems, dtype=dtype, device=device).uniform_()
    dst = torch.empty_like(src)
    (copy,) = time_fns([lambda: dst.copy_(src)], device, 0.3)
    a = torch.randn(mm, mm, dtype=dtype, device=device)
    b = torch.randn(mm, mm, dtype=dtype, device=device)
    matmuls = [lambda: a @ b]
    if device.type == "cpu":
        # torch's float32 matmul (MKL) is not the machine's ceiling where fastlm's gemm (oneDNN) runs
        # faster (AMD AVX-512 processors, see fastlm.ops.gemm): the faster of the two is.
        matmuls.append(lambda: gemm(a, b))
    matmul = min(time_fns(matmuls, device, 0.3), key=lambda t: t.median_ms)
    return {
        "copy_gbps": 2 * src.numel() * src.element_size() / copy.median_ms / 1e6,
        "copy_bytes": 2 * src.numel() * src.element_size(),
        "matmul_tflops": 2 * mm**3 / matmul.median_ms / 1e9,
        "matmul_shape": f"{mm}x{mm}x{mm} {str(dtype).removeprefix('torch.')}",
    }
