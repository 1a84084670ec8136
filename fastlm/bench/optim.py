"""Optimizer step time and state memory: fastlm AdamW8bit vs torch AdamW (fused, foreach) and
bitsandbytes AdamW8bit (when importable), on one flat fp32 parameter (and a bf16 one: pure-bf16
training, where the parameter and gradient move 2 bytes each instead of 4).

Bytes moved per step (GB/s), per parameter: fastlm 8-bit reads the parameter, gradient and
two uint8 codes and writes the parameter and both codes: 4+4+1+1 + 4+1+1 = 16 bytes (plus 8
bytes of absmax per 256). torch AdamW reads p, g, m, v and writes p, m, v: 28 bytes. Each row
also carries the optimizer state's size (``state_bytes``, ``state_bytes_per_param``).
"""

import importlib.util
import sys
from collections.abc import Iterator

import torch

from fastlm.bench.harness import Case
from fastlm.optim import AdamW8bit

SIZES = {
    "quick": [1 << 20],
    "full": [8 << 20, 64 << 20],
    "gpu": [8 << 20, 64 << 20, 256 << 20, 1 << 30],
}
# bf16 parameters: the sizes above with 2 bytes per parameter or gradient read or written, and
# torch's fp32 states stored in bf16 as well (torch keeps states in the parameter's dtype).
BF16_SIZES = {"quick": [], "full": [8 << 20], "gpu": [64 << 20]}
BYTES_PER_PARAM = {"fastlm": 16 + 8 / 256, "bnb": 16 + 8 / 256, "torch": 28, "torch-foreach": 28}
BF16_BYTES_PER_PARAM = {"fastlm": 10 + 8 / 256, "bnb": 10 + 8 / 256, "torch": 14, "torch-foreach": 14}


def optimizers() -> dict:
    factories = {
        "fastlm": lambda ps: AdamW8bit(ps, min_8bit_size=0),
        "torch": lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch-foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    }
    if importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes as bnb

        factories["bnb"] = lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=0)
    return factories


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    """Built lazily: at 1B parameters one provider's parameter, gradient and state take 10-16 GB."""
    runs = [(n, torch.float32) for n in SIZES[suite]] + [(n, torch.bfloat16) for n in BF16_SIZES[suite]]
    for n, dtype in runs:
        per_param = BYTES_PER_PARAM if dtype == torch.float32 else BF16_BYTES_PER_PARAM
        for provider, factory in optimizers().items():
            param = torch.nn.Parameter(torch.randn(n, device=device, dtype=dtype))
            param.grad = (torch.randn(n, device=device) * 1e-2).to(dtype)
            opt = factory([param])
            try:
                opt.step()  # creates the states (and builds kernels on first use)
            except Exception as exc:  # noqa: BLE001 (a peer unsupported on this device is skipped, with the reason)
                print(f"  optim: skipping {provider} at {n} parameters: {exc}", file=sys.stderr)
                continue
            held = state_bytes(opt)
            shape = f"{n / 2**20:g}M {'fp32' if dtype == torch.float32 else 'bf16'}"
            yield Case("adamw_step", provider, "step", shape, opt.step, size=n,
                       bytes_moved=int(per_param[provider] * n),
                       extra={"params": n, "state_bytes": held, "state_bytes_per_param": held / n})
