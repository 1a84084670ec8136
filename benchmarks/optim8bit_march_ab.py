"""Versions of the CPU 8-bit optimizer kernel, each built for a chosen ``-march``, timed in one process.

``optim8bit_kernel_ab.py`` times the kernel of the installed build (``-march=native``); this script
builds ``csrc/cpu/optim8bit.cpp`` alone (with a two-line binding) for another target, so an AVX-512
host can time the AVX2 path as a Zen 3 build compiles it (no AVX-512 encodings, Zen 3 tuning):

    python benchmarks/optim8bit_march_ab.py HEAD~1 WORKTREE              # two versions, -march=znver3
    python benchmarks/optim8bit_march_ab.py WORKTREE --march haswell --path avx2

A version is a git revision (the file at that commit) or ``WORKTREE`` (the file on disk). Every
version first runs one step on the same inputs, and the script stops unless all give the same bits
(parameters and states); then the versions alternate, step by step, on 1 and 2 threads, and the
median of each is printed. Builds are cached with fastlm's own (``~/.cache/fastlm/``).

``--mca`` also prints, per version, what llvm-mca (``-mcpu`` = the ``--march``) makes of the AVX2
quantizer's main loop (32 codes per iteration, signed and unsigned code): a model of a processor
that is not at hand, to read beside the timings of the one that is.
"""

import argparse
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from optim8bit_kernel_ab import add_step_arguments, step_inputs

ROOT = Path(__file__).resolve().parent.parent
BINDING = """#include <torch/extension.h>
#include "cpu/optim8bit.h"
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("optim8bit_step", &optim8bit_step_cpu);
    m.def("optim8bit_paths", &optim8bit_paths_cpu);
}
"""


def source(version: str) -> bytes:
    path = ROOT / "csrc" / "cpu" / "optim8bit.cpp"
    if version == "WORKTREE":
        return path.read_bytes()
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{version}:csrc/cpu/optim8bit.cpp"], check=True,
                          capture_output=True).stdout


def build(version: str, march: str):
    from fastlm.extension import CPU_CFLAGS, CPU_LDFLAGS, ExtensionUnavailable, build

    code = source(version)
    cflags = tuple(f"-march={march}" if flag == "-march=native" else flag for flag in CPU_CFLAGS)
    name = f"optim8bit_{hashlib.sha256(code).hexdigest()[:12]}"
    # The version's own file and the checkout's headers (cpu/optim8bit.h, common/optim8bit_rule.h);
    # fastlm's build() caches the result by sources, headers and flags.
    folder = Path(tempfile.gettempdir()) / "fastlm-march-ab" / name
    (folder / "cpu").mkdir(parents=True, exist_ok=True)
    (folder / "cpu" / "optim8bit.cpp").write_bytes(code)
    (folder / "binding.cpp").write_text(BINDING)
    module = build(name, [folder / "cpu" / "optim8bit.cpp", folder / "binding.cpp"], cflags, CPU_LDFLAGS)
    if isinstance(module, ExtensionUnavailable):
        raise module
    return module


def mca_cycles(module, march: str, function: str) -> str:
    """llvm-mca's cycles per iteration of ``function``'s first loop (up to its first backward branch)."""
    mca = shutil.which("llvm-mca") or shutil.which("llvm-mca-14")
    if mca is None:
        return "no llvm-mca on PATH"
    obj = Path(module.__file__).parent / "optim8bit.o"
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(obj)], check=True, capture_output=True,
                             text=True).stdout
    body = listing.split(f"{function}(", 1)[1].split(">:\n", 1)[1].split("\n\n", 1)[0]
    code = [(int(m[1], 16), m[2]) for m in re.finditer(r"^\s*([0-9a-f]+):\t(.*)$", body, re.M)]
    for address, instruction in code:
        branch = re.match(r"jne\s+([0-9a-f]+)", instruction)
        if branch and int(branch[1], 16) < address:
            start = int(branch[1], 16)
            loop = [re.sub(r"<.*>|#.*", "", i) for a, i in code if start <= a < address]
            break
    else:
        return "no loop found"
    report = subprocess.run([mca, f"-mcpu={march}", "-iterations=200"], input="\n".join(loop) + "\n",
                            check=True, capture_output=True, text=True).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", report)[1]) / 200
    return f"{cycles:.1f} cycles per iteration ({len(loop)} instructions)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", nargs="+", help="git revisions or WORKTREE")
    p.add_argument("--march", default="znver3")
    p.add_argument("--path", default="avx2", help="the kernel's code path (avx512, avx2, generic)")
    p.add_argument("--mca", action="store_true", help="also print llvm-mca's reading of the AVX2 quantizer loops")
    add_step_arguments(p, rounds=40)
    args = p.parse_args()

    modules = [build(v, args.march) for v in args.versions]
    if args.mca:
        for version, module in zip(args.versions, modules):
            for signed in ("true", "false"):
                function = f"avx2::requantize<{signed}>"
                print(f"{version} {function}, llvm-mca -mcpu={args.march}: {mca_cycles(module, args.march, function)}")
    kind, param, grad, *states, tables1, tables2, block_size, hyper = step_inputs(args)
    hyper = hyper.as_list()

    def step(module, p, s):
        module.optim8bit_step(kind, p, grad, *s, tables1, tables2, block_size, hyper, 7, 5, False, args.path)

    def fresh():  # the parameters and states every version starts from
        return param.clone(), [t.clone() if t is not None else None for t in states]

    results = []
    for module in modules:
        p, s = fresh()
        step(module, p, s)
        results.append([p.view(torch.uint8)] + [t for t in s if t is not None])
    for version, result in zip(args.versions[1:], results[1:]):
        if not all(torch.equal(a, b) for a, b in zip(result, results[0])):
            raise SystemExit(f"{version} computes other bits than {args.versions[0]}")
    print(f"{args.kind} {args.dtype}, {args.params} params, path {args.path}, -march={args.march}: "
          "the same bits in every version")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        p, s = fresh()
        times = [[] for _ in modules]
        for _ in range(args.rounds):
            for module, spent in zip(modules, times):
                start = time.perf_counter()
                step(module, p, s)
                spent.append(time.perf_counter() - start)
        for version, spent in zip(args.versions, times):
            median = sorted(spent)[len(spent) // 2]
            print(f"  {threads} thread{'s' if threads > 1 else ''} {version}: {median * 1e3:.3f} ms "
                  f"({median * 1e9 / args.params:.2f} ns/param)")


if __name__ == "__main__":
    main()
