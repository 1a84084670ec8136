"""The CPU 8-bit optimizer kernel alone (no Python optimizer around it), for A/B runs across commits.

Builds of different sources cannot share a process, so compare commits in alternating processes;
the extension's cache keeps each build, so switching back costs no rebuild:

    for i in 1 2 3; do for c in OLD NEW; do
        git checkout -q $c -- csrc/cpu/optim8bit.cpp && python benchmarks/optim8bit_kernel_ab.py
    done; done; git checkout -q HEAD -- csrc/cpu/optim8bit.cpp

Prints the median milliseconds of one step over --params parameters (random states and gradients,
the AdamW defaults at step 5). ``--path`` runs one of the kernel's code paths (default: the fastest this
CPU runs), so the paths of one build compare in one process:

    python benchmarks/optim8bit_kernel_ab.py --path avx2
"""

import argparse
import os
import time

import torch

from fastlm import backend
from fastlm.optim import _rule as rule
from fastlm.optim._code import tables
from fastlm.optim.optim8bit import PATH_ENV, cpu_kernel_path, cpu_kernel_paths

KINDS = {"adamw": rule.ADAMW, "adam": rule.ADAM, "lion": rule.LION}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_step_arguments(p: argparse.ArgumentParser, rounds: int) -> None:
    """The step's size, kind, dtype and block size, and the timed rounds (optim8bit_march_ab.py too)."""
    p.add_argument("--params", type=int, default=1 << 20)
    p.add_argument("--kind", choices=KINDS, default="adamw")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=rounds)


def step_inputs(args: argparse.Namespace) -> tuple:
    """The kernel's arguments before the last three (seed, step, stochastic rounding): random parameters,
    gradients and 8-bit states, the code tables, and the AdamW defaults' Hyper at step 5."""
    cpu = torch.device("cpu")
    kind, n = KINDS[args.kind], args.params
    gen = torch.Generator().manual_seed(0)
    param = torch.randn(n, generator=gen).to(DTYPES[args.dtype])
    grad = (0.1 * torch.randn(n, generator=gen)).to(DTYPES[args.dtype])
    blocks = -(-n // args.block_size)

    def state():
        return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen), torch.rand(blocks, generator=gen)]

    states = state() + (state() if kind != rule.LION else [None, None])
    second = tables(False, cpu) if kind != rule.LION else None
    hyper = rule.make_hyper(kind, 1e-3, 0.9, 0.999, 1e-8, 0.01, 5)
    return (kind, param, grad, *states, tables(True, cpu), second, args.block_size, hyper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p, rounds=100)
    p.add_argument("--path", choices=cpu_kernel_paths(), help="the kernel's code path (default: the fastest)")
    args = p.parse_args()
    if args.path:
        os.environ[PATH_ENV] = args.path

    inputs = step_inputs(args)
    step = backend.select("optim8bit_step", torch.device("cpu"))

    def run():
        step(*inputs, 7, 5, False)

    for _ in range(5):
        run()
    times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2] * 1e3
    print(f"{args.kind} {args.dtype} {args.params} params, {cpu_kernel_path()} path, {torch.get_num_threads()} threads: "
          f"{median:.3f} ms ({median * 1e6 / args.params:.2f} ns/param)")


if __name__ == "__main__":
    main()
