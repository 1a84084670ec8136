"""Optimizer step time and state memory: fastlm AdamW8bit vs torch AdamW (fused, foreach) and
bitsandbytes AdamW8bit (when importable), on one flat fp32 parameter.

Bytes moved per step (the roofline's numerator), per parameter: fastlm 8-bit reads the
parameter, gradient and two uint8 codes and writes the parameter and both codes: 4+4+1+1 +
4+1+1 = 16 bytes (plus 8 bytes of absmax per 256). torch AdamW reads p, g, m, v and writes
p, m, v: 28 bytes.

    python benchmarks/bench_optim.py            # 8M params on CPU; 8M..1B on a GPU
    python benchmarks/bench_optim.py --quick    # 1M params, short runs
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Case, parser, run_cases  # noqa: E402
from fastlm.optim import AdamW8bit  # noqa: E402

BYTES_PER_PARAM = {"fastlm": 16 + 8 / 256, "bnb": 16 + 8 / 256, "torch": 28, "torch-foreach": 28}


def make_optimizers(device: torch.device) -> dict:
    factories = {
        "fastlm": lambda ps: AdamW8bit(ps, min_8bit_size=0),
        "torch": lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch-foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
    }
    try:
        import bitsandbytes as bnb

        factories["bnb"] = lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=0)
    except ImportError:
        pass
    return factories


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def cases(sizes: list[int], device: torch.device) -> list[Case]:
    out = []
    for n in sizes:
        for provider, factory in make_optimizers(device).items():
            param = torch.nn.Parameter(torch.randn(n, device=device))
            param.grad = torch.randn(n, device=device) * 1e-2
            opt = factory([param])
            try:
                opt.step()  # creates the states (and compiles on first use)
            except Exception as exc:  # noqa: BLE001 (a baseline unsupported here is skipped, with the reason)
                print(f"  skipping {provider} at {n}: {exc}", file=sys.stderr)
                continue
            out.append(Case(
                op="adamw_step", provider=provider, mode="step", shape=f"{n / 2**20:g}M",
                fn=opt.step, bytes_moved=int(BYTES_PER_PARAM[provider] * n),
                extra={"params": n, "state_bytes": state_bytes(opt), "state_bytes_per_param": state_bytes(opt) / n},
            ))
    return out


def main():
    args = parser(__doc__.splitlines()[0]).parse_args()
    device = torch.device(args.device)
    if args.quick:
        sizes = [1 << 20]
    elif device.type == "cuda":
        sizes = [8 << 20, 64 << 20, 256 << 20, 1 << 30]
    else:
        sizes = [8 << 20]
    run_cases(cases(sizes, device), device, args.out, min_run_time=0.2 if args.quick else 1.0)


if __name__ == "__main__":
    main()
