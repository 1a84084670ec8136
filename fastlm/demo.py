"""fastlm-demo: run the norms on every backend available here and time them against torch.

    fastlm-demo [--rows 4096] [--cols 4096]

For each of LayerNorm and RMSNorm: the largest error against a float64 reference, then
forward and forward+backward medians for each fastlm backend that runs natively on this
device (C++ on CPU, Triton on CUDA; the PyTorch fallback everywhere) and for
torch.nn.functional, with the speed-up over torch.
"""

import argparse

import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend
from fastlm.bench.harness import time_fn
from fastlm.ops.norm import layer_norm_ref, rms_norm_ref


def native_backends(device: torch.device) -> list[str]:
    """The fused backend for ``device`` (C++ on CPU, Triton on CUDA) when it runs here, and torch."""
    preferred = {"cpu": "cpp", "cuda": "triton"}[device.type]
    available = backend._unavailable_reason(preferred, device.type) is None
    return ([preferred] if available else []) + ["torch"]


def demo(rows: int, cols: int, device: torch.device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(cols, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, cols, device=device, dtype=dtype)
    kinds = {
        "rms_norm": (fastlm.rms_norm, lambda x, w: F.rms_norm(x, (cols,), w, 1e-6), rms_norm_ref),
        "layer_norm": (fastlm.layer_norm, lambda x, w: F.layer_norm(x, (cols,), w, None, 1e-5), layer_norm_ref),
    }
    print(f"{rows}x{cols} {str(dtype).removeprefix('torch.')} on {device}, median ms (speed-up over torch)")
    for kind, (ours, theirs, ref) in kinds.items():
        exact = ref(x.detach().double(), w.detach().double())
        providers = {f"fastlm[{name}]": name for name in native_backends(device)}
        providers["torch"] = None
        timings = {}
        for label, name in providers.items():
            def fwd(name=name):
                with torch.no_grad():
                    if name is None:
                        return theirs(x, w)
                    with fastlm.use_backend(name):
                        return ours(x, w)

            def fwd_bwd(name=name):
                if name is None:
                    return torch.autograd.grad(theirs(x, w), (x, w), dy)
                with fastlm.use_backend(name):
                    return torch.autograd.grad(ours(x, w), (x, w), dy)

            error = (fwd().double() - exact).abs().max().item()
            timings[label] = (time_fn(fwd, device, 0.3).median_ms, time_fn(fwd_bwd, device, 0.3).median_ms, error)
        base_fwd, base_both, _ = timings["torch"]
        for label, (t_fwd, t_both, error) in timings.items():
            print(
                f"  {kind:10s} {label:15s} fwd {t_fwd:8.2f} ({base_fwd / t_fwd:4.2f}x)   "
                f"fwd+bwd {t_both:8.2f} ({base_both / t_both:4.2f}x)   max error vs fp64 {error:.1e}"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    args = p.parse_args(argv)
    info = fastlm.backend_info()  # builds the C++ extension on first use (about a minute, then cached)
    print(f"fastlm {fastlm.__version__}, torch {info['torch']}, triton {info['triton']['version']}, "
          f"C++ extension: {'ok' if info['cpp']['available'] else info['cpp']['error'].splitlines()[0]}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if info["cuda"]["available"] else [])
    for device in devices:
        demo(args.rows, args.cols, device)


if __name__ == "__main__":
    main()
