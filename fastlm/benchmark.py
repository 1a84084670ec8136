"""The one benchmark harness: timing, peak memory, provenance, JSON lines, markdown tables.

Used by the scripts in ``benchmarks/`` and by ``fastlm-demo``.

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) with
its 20/50/80% quantiles; on CPU, ``torch.utils.benchmark.Timer.blocked_autorange`` and the
quantiles of its blocks. Peak memory: on CUDA, the allocator's peak above the memory in
use before the call; on CPU, the running total of the profiler's allocation events.

Each benchmark script builds ``Case``s and calls ``run_cases``, which times them, prints
a markdown table and appends one JSON line per measurement to ``--out``.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> Timing:
    """Median and 20/80% quantiles of ``fn()``'s run time in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-use compilation and allocator growth stay out of the figure
    measurement = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = [t * 1e3 for t in measurement.times]
    return Timing(_quantile(times, 0.5), _quantile(times, 0.2), _quantile(times, 0.8))


def _fix_malloc_mmap_threshold() -> None:
    """Make glibc serve every allocation >= 128 KiB with mmap, returned to the OS on free.

    Otherwise glibc raises the threshold after the first large free, later tensors come
    from the heap and stay resident after they are freed, and resident memory stops
    tracking what the op really holds.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes held at the peak of ``fn()`` above what was held before it.

    CUDA: the caching allocator's peak. CPU (Linux): the peak resident set size, reset
    through /proc/self/clear_refs before the call; None where that is not available.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    try:
        _fix_malloc_mmap_threshold()
        fn()  # first call outside the window: one-time allocations and lazy builds
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
        before = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def environment() -> dict:
    """Where and when a figure was measured."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
    }


@dataclass
class Case:
    """One timed call: an op, a provider (fastlm, torch, ...), a mode and its size."""

    op: str
    provider: str
    mode: str
    shape: str
    fn: Callable[[], object]
    bytes_moved: int | None = None
    """Bytes the op must read and write at least; gives GB/s."""
    flops: int | None = None
    """Floating-point operations; gives TFLOP/s."""
    extra: dict = field(default_factory=dict)


def run_cases(cases: list[Case], device: torch.device, out: Path | None, min_run_time: float = 0.5) -> list[dict]:
    """Time every case, print a markdown table, append JSON lines to ``out``."""
    env = environment()
    rows = []
    for case in cases:
        timing = time_fn(case.fn, device, min_run_time)
        row = {
            "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape,
            **asdict(timing),
            "gbps": case.bytes_moved / timing.median_ms / 1e6 if case.bytes_moved else None,
            "tflops": case.flops / timing.median_ms / 1e9 if case.flops else None,
            "peak_mem_bytes": peak_memory_bytes(case.fn, device),
            **case.extra,
            **env,
        }
        rows.append(row)
        print(f"  {case.op:12s} {case.provider:16s} {case.mode:8s} {case.shape:16s} {timing.median_ms:9.3f} ms",
              file=sys.stderr)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict], baseline_provider: str = "torch") -> str:
    """One line per measurement, with the speed-up over ``baseline_provider`` for the same op/mode/shape."""
    base = {(r["op"], r["mode"], r["shape"]): r["median_ms"] for r in rows if r["provider"] == baseline_provider}
    lines = [
        "| op | mode | shape | provider | median ms (p20-p80) | GB/s | TFLOP/s | peak MiB | vs " + baseline_provider + " |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base.get((r["op"], r["mode"], r["shape"]))
        speedup = f"{ref / r['median_ms']:.2f}x" if ref else "-"
        peak = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r.get("peak_mem_bytes") is not None else "-"
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") else "-"
        tflops = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        lines.append(
            f"| {r['op']} | {r['mode']} | {r['shape']} | {r['provider']} | "
            f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {gbps} | {tflops} | "
            f"{peak} | {speedup} |"
        )
    return "\n".join(lines)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark script shares."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("FASTLM_BENCH_OUT", "benchmarks/out/results.jsonl")),
                   help="JSON lines file the results are appended to")
    p.add_argument("--quick", action="store_true", help="small sizes, short runs: proves the script works")
    return p
