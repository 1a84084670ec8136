"""Where oneDNN's route starts to pay: one linear, forward + backward and forward alone, through
``linear`` of fastlm/ops/gemm.py with oneDNN forced (from 2M multiply-adds) against ``F.linear``.

    python benchmarks/gemm_threshold.py [--calls 200] [--rounds 2] [--shapes 256x128x2048,...]
    python benchmarks/gemm_threshold.py --step train|hf-quick|hf-full [--rounds 25]

``--step``: one training step of plain_process_ab.py's fastlm model (``train``) or patched Llama, with
``ONEDNN_MIN_MACS`` switched between 2^21, 2^25, 2^26 and 2^27 from step to step in one process (the
threshold is read at every call), so the drift of the machine cancels; prints each one's median step
time and 2^27's median over it (above 1: faster than 2^27).

Prints, per (tokens, in, out) shape, the multiply-adds and F.linear's median time over the oneDNN
route's (above 1: oneDNN faster), one column per round. Only meaningful on an AMD CPU with AVX-512, where
fastlm routes matmuls to oneDNN at all (``fastlm.backend_info()["cpu_matmuls"]``); ``ONEDNN_MIN_MACS`` in
fastlm/ops/gemm.py is set from these figures.
"""

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

gemm = importlib.import_module("fastlm.ops.gemm")  # the module (fastlm.ops exports a function of that name)

SHAPES = [(256, 128, 128), (512, 128, 128), (256, 256, 256), (256, 128, 512), (512, 352, 128), (512, 256, 256),
          (1024, 128, 352), (256, 512, 512), (1024, 256, 256), (256, 128, 2048), (512, 512, 512), (2048, 256, 256),
          (1024, 256, 704), (1024, 512, 512), (2048, 512, 1408)]


def median_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def step_ab(workload: str, rounds: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import plain_process_ab

    if workload == "train":
        steps = plain_process_ab.train_steps("fastlm")
    else:
        steps = plain_process_ab.hf_steps(workload.removeprefix("hf-"), "fastlm-patched")
    step = next(iter(steps.values()))
    thresholds = {f"2^{e}": 1 << e for e in (21, 25, 26, 27)}
    times = {name: [] for name in thresholds}
    for _ in range(3):
        step()
    for _ in range(rounds):
        for name, value in thresholds.items():
            gemm.ONEDNN_MIN_MACS = value
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["2^27"])
    print(f"{workload}, {rounds} rounds: " + "  ".join(
        f"{name} {statistics.median(t) * 1e3:.1f} ms ({base / statistics.median(t):.3f}x)" for name, t in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, help="default: 2 for single linears, 25 for --step")
    parser.add_argument("--step", choices=["train", "hf-quick", "hf-full"], help="time whole steps instead")
    parser.add_argument("--shapes", help="comma-separated TOKENSxINxOUT (default: a sweep from 4M to 1.5G MACs)")
    args = parser.parse_args()
    if not gemm.onednn_available():
        raise SystemExit("torch here has no oneDNN op to compare")
    if args.step:
        return step_ab(args.step, args.rounds or 25)
    gemm.ONEDNN_FASTER, gemm.ONEDNN_MIN_MACS = True, gemm.FULL_WIDTH_MIN_MACS
    print(f"# {gemm.cpu_matmul_library()}; fastlm's own threshold here: {gemm._onednn_min_macs(gemm._FAMILY):,}")
    print("# tokens,in,out  MACs  fwd+bwd ratio per round (F.linear us / oneDNN us)  fwd ratio per round")
    torch.manual_seed(0)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for m, k, n in shapes:
        x, w = torch.randn(m, k, requires_grad=True), torch.randn(n, k, requires_grad=True)
        grad = torch.randn(m, n)
        cases = {"fwd+bwd": (lambda: F.linear(x, w).backward(grad), lambda: gemm.linear(x, w).backward(grad)),
                 "fwd": (lambda: F.linear(x, w), lambda: gemm.linear(x, w))}  # timed under no_grad
        columns = {mode: [] for mode in cases}
        for _ in range(args.rounds or 2):
            for mode, (ref, ours) in cases.items():
                grad_mode = torch.enable_grad() if mode == "fwd+bwd" else torch.no_grad()
                with grad_mode:
                    t_ref, t_ours = median_us(ref, args.calls), median_us(ours, args.calls)
                columns[mode].append(f"{t_ref / t_ours:.2f}x ({t_ref:.0f}/{t_ours:.0f})")
        print(f"{m},{k},{n}  {m * k * n / 1e6:7.1f}M  " + "  ".join(" ".join(c) for c in columns.values()), flush=True)


if __name__ == "__main__":
    main()
