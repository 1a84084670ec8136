"""fastlm-bench: every op benchmark in one run, with a report and plots.

    fastlm-bench [--suite quick|full|gpu] [--ops norm,...] [--out DIR]

quick: small CPU sizes, a few minutes at most (CI runs it: it proves the suite works and
asserts nothing about speed). full: realistic sizes on this device. gpu: the H200 sizes,
sized to fit one ten-minute window, after a correctness pass of the GPU test modules of
the selected ops (bf16 on the real kernels) that stops the run on any mismatch.

Writes under --out: results.jsonl (one line per measurement, with device, CPU model,
versions, commit (-dirty when tracked files had changes) and date), report.md (one table per op) and one PNG per op and mode.
"""

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config

from fastlm.bench.harness import environment, groups, measure
from fastlm.bench.report import markdown, plot, write_atomic
from fastlm.bench.roofline import measure_roofline

# op name -> module with ``cases(suite, device)``, an iterable of Cases (a generator where the
# tensors are large, so that only the cases being measured hold them), the providers and modes of
# one shape one after another (the CPU times them in turn: fastlm.bench.harness)
SUITES = {
    "norm": "fastlm.bench.norms",
    "cross_entropy": "fastlm.bench.cross_entropy",
    "hf": "fastlm.bench.hf",
    "attention": "fastlm.bench.attention",
    "ffn": "fastlm.bench.ffn",
    "rope": "fastlm.bench.rope",
    "optim": "fastlm.bench.optim",
    "train": "fastlm.bench.train",
    "generate": "fastlm.bench.generate",
    "gemm": "fastlm.bench.gemm",
}
MIN_RUN_TIME = {"quick": 0.1, "full": 1.0, "gpu": 0.2}


# op -> the GPU test modules (tests/gpu) of the kernels it times: the correctness pass runs those of
# the selected ops only, so `--ops attention` does not wait on the CUDA optimizer extension's build.
MODEL_KERNELS = ("test_norm_cuda.py", "test_attention_cuda.py", "test_cross_entropy_gpu.py", "test_activation_gpu.py",
                 "test_rope_gpu.py")
GPU_TESTS = {
    "norm": ("test_norm_cuda.py",),
    "cross_entropy": ("test_cross_entropy_gpu.py",),
    "hf": MODEL_KERNELS,
    "attention": ("test_attention_cuda.py",),
    "ffn": ("test_activation_gpu.py",),
    "rope": ("test_rope_gpu.py",),
    "optim": ("test_optim_cuda.py",),
    "train": MODEL_KERNELS,
    "generate": ("test_attention_cuda.py", "test_generate_gpu.py"),
    "gemm": (),
}


def gpu_correctness_pass(ops: list[str]) -> None:
    """Run the GPU test modules (bf16 on the compiled kernels) of ``ops``; raise on any failure."""
    tests = Path(__file__).resolve().parents[2] / "tests" / "gpu"
    if not tests.is_dir():
        raise SystemExit(f"fastlm-bench --suite gpu: the GPU tests are not at {tests} (run from a checkout)")
    modules = sorted({str(tests / name) for op in ops for name in GPU_TESTS[op]})
    result = subprocess.run([sys.executable, "-m", "pytest", *modules, "-q"], cwd=tests.parents[1])
    if result.returncode != 0:
        raise SystemExit("fastlm-bench: the GPU correctness pass FAILED; no timings are reported")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastlm-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(MIN_RUN_TIME), default="quick")
    p.add_argument("--ops", default=",".join(SUITES), help=f"comma-separated, from: {', '.join(SUITES)}")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/out/DATE-DEVICE)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpu-tests-passed", action="store_true",
                   help="skip the gpu suite's correctness pass: only right after tests/gpu passed on this checkout "
                        "and device (benchmarks/gpu_session.sh runs them first and keeps their log)")
    args = p.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(SUITES))
    if unknown:
        p.error(f"unknown ops {unknown}; choose from {sorted(SUITES)}")
    if not ops:
        p.error(f"--ops {args.ops!r} selects no op; choose from {sorted(SUITES)}")
    # Before anything is created: a device this torch cannot use would fail in the first measurement.
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        p.error(f"--device {args.device}: not a device ({str(exc).splitlines()[0]})")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: fastlm-bench measures on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: CUDA is not available to this torch ({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices")
    if args.suite == "gpu" and device.type != "cuda":
        p.error("--suite gpu needs a CUDA device")
    env = environment()
    out = args.out or Path("benchmarks/out") / f"{datetime.date.today()}-{env['device'].split(' (')[0].replace(' ', '_')}"
    # Before any measurement: a folder that cannot be written would otherwise lose the whole run.
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {out}: cannot create the output folder ({exc.strerror})")
    if not os.access(out, os.W_OK):
        p.error(f"--out {out}: the output folder is not writable")
    if args.suite == "gpu" and not args.gpu_tests_passed:
        gpu_correctness_pass(ops)

    # The bwd modes replay one saved backward (retain_graph=True), which a torch.compile'd
    # backward with donated buffers refuses.
    torch._functorch.config.donated_buffer = False
    start = time.perf_counter()
    roofline = measure_roofline(device, quick=args.suite == "quick")
    rows = []
    for op in ops:
        for group in groups(importlib.import_module(SUITES[op]).cases(args.suite, device), device):
            for case, row in zip(group, measure(group, device, MIN_RUN_TIME[args.suite], roofline)):
                rows.append({**row, **env, "suite": args.suite, "bench": op})
                print(f"  {case.op:14s} {case.mode:8s} {case.shape:22s} {case.provider:14s} "
                      f"{row['median_ms']:10.3f} ms", file=sys.stderr)

    write_atomic(out / "results.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    report = markdown(rows, env, roofline)
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(report))
    plots = plot(rows, out)
    print(report)
    print(f"fastlm-bench: {len(rows)} measurements in {time.perf_counter() - start:.0f} s; "
          f"wrote {out}/results.jsonl, report.md and {len(plots)} plots", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
