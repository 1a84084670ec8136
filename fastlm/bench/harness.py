"""The one benchmark harness: timing, peak memory and provenance.

Used by ``fastlm-bench`` (fastlm/bench/cli.py), the per-op case modules beside this file,
and the A/B scripts under benchmarks/ (``alternating_medians``).

Timing: on CUDA, ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) with
its 20/50/80% quantiles, one case after another; on CPU, the cases of one op and shape (its
providers and modes) take turns, a block of calls each per round, and each gets the quantiles
of its blocks, under the default allocator. Taking turns is for the ratios: a shared machine's
speed drifts by tens of percent over seconds (neighbours, clocks), and timed one after another
two providers would each see a different machine. Peak memory: the peak of tensor
allocations above what was held before the call (CUDA: the caching allocator's statistics; CPU:
the profiler's allocation events).

Each op's module builds ``Case``s; ``groups`` gathers those timed together, ``measure`` turns
them into rows of figures.
"""

import argparse
import contextlib
import datetime
import itertools
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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


# CPU timing: a block of calls lasts at least this long (timer overhead and jitter stay small next to
# it), and every case gets at least this many blocks (a median of a few).
BLOCK_SECONDS = 0.02
MIN_BLOCKS = 5


def times_in_turn(fns: list[Callable[[], object]], rounds: int, min_run_time: float = 0.0,
                  block_seconds: float = 0.0) -> list[list[float]]:
    """Per callable, the milliseconds per call of each of its blocks: the callables take turns, one
    block each per round, for at least ``rounds`` rounds and until each has run ``min_run_time``
    seconds. A block is as many calls as last ``block_seconds`` (from one timed call; one at least)."""
    number = [1] * len(fns)
    if block_seconds > 0:
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            number[i] = max(1, int(block_seconds / max(time.perf_counter() - start, 1e-9)))
    times = [[] for _ in fns]
    deadline = time.perf_counter() + min_run_time * len(fns)
    while len(times[0]) < rounds or time.perf_counter() < deadline:
        for fn, calls, taken in zip(fns, number, times):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            taken.append((time.perf_counter() - start) / calls * 1e3)
    return times


def time_fns(fns: list[Callable[[], object]], device: torch.device, min_run_time: float = 0.5) -> list[Timing]:
    """Median and 20/80% quantiles of each ``fn()``'s run time in milliseconds (module docstring)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return [Timing(*do_bench(fn, quantiles=[0.5, 0.2, 0.8])) for fn in fns]
    for fn in fns:
        fn()  # warm-up: first-use compilation and allocator growth stay out of the figure
    times = times_in_turn(fns, MIN_BLOCKS, min_run_time, BLOCK_SECONDS)
    return [Timing(_quantile(t, 0.5), _quantile(t, 0.2), _quantile(t, 0.8)) for t in times]


def alternating_medians(runs: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each callable over ``rounds`` rounds that call each once in turn (after
    ``warmup`` calls each), so that the machine's drift hits every one alike: the A/B scripts' timer."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = times_in_turn(list(runs.values()), rounds)
    return {name: _quantile(t, 0.5) for name, t in zip(runs, times)}


def ab_count(doc: str | None, argv: list[str] | None, name: str, default: int, what: str) -> int:
    """The one optional argument of the A/B scripts: how many alternating ``what`` (``name``, at least 1);
    ``--help`` prints ``doc``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("count", metavar=name, type=int, nargs="?", default=default,
                   help=f"alternating {what} (default {default})")
    count = p.parse_args(argv).count
    if count < 1:
        p.error(f"{name} must be at least 1, not {count}")
    return count


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null: Kineto prints two lines to it per profiled call. Only around a
    call made once before, so a warning it prints has already been seen."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_tensor_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of the CPU tensor bytes ``fn()`` holds above what was held before it, from the allocation
    events the PyTorch profiler records (every allocation and free of the CPU allocator, any thread);
    None when this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        cpu = torch._C._autograd.DeviceType.CPU
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    except AttributeError:
        return None
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes held at the peak of ``fn()`` above what was held before it.

    CUDA: the caching allocator's peak. CPU: the peak of tensor allocations, from the profiler's
    allocation events (the same quantity as on CUDA; the resident set would depend on when glibc
    returns freed memory, and forcing it to return every large block charged page faults to the
    timings). Memory outside tensors (a C++ kernel's scratch) is not counted.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    fn()  # first call outside the window: one-time allocations and lazy builds
    return _cpu_peak_tensor_bytes(fn)


def _git(*args: str) -> str | None:
    """A git command's output in this checkout; None when git or the checkout is missing."""
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def commit() -> str | None:
    """The checked-out commit, with ``-dirty`` when tracked files have uncommitted changes: figures
    measured on changed code must not read as the commit's."""
    head = _git("rev-parse", "--short", "HEAD")
    if head is None:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return f"{head}-dirty" if status is None or status else head


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor's model name (CPU timings depend on it): /proc/cpuinfo's first ``model name``,
    else ``platform.processor()``, else the architecture."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict:
    """Where and when a figure was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    cpu = cpu_model()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({cpu}, {torch.get_num_threads()} threads)",
        "cpu": cpu,
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
    """fwd, bwd, fwd+bwd, step, ..."""
    shape: str
    fn: Callable[[], object]
    size: float | None = None
    """A number for the x axis of plots (e.g. the row width, the sequence length)."""
    bytes_moved: int | None = None
    """Bytes the op must read and write at least; gives GB/s."""
    flops: int | None = None
    """Floating-point operations; gives TFLOP/s."""
    extra: dict = field(default_factory=dict)
    """Further figures for the row; a ``tokens`` count (per call) also gives tokens/s, a ``peak_flops``
    (the device's datasheet FLOP/s) MFU, a ``series``
    name draws its own plot (e.g. one per attention head dim and causality)."""


def autograd_modes(fn: Callable, inputs: list[torch.Tensor], grad_out, train_forward: bool = True) -> dict:
    """{mode: zero-argument callable} timing ``fn(*inputs)``: fwd, bwd and fwd+bwd.

    fwd is the training forward (the graph is built) unless ``train_forward`` is False, then
    it runs under no_grad (inference). bwd replays the backward of one saved forward
    (retain_graph), through torch.autograd.grad so gradients never accumulate. ``grad_out``
    matches ``fn``'s output (a tensor or a sequence of them). The saved forward runs here,
    once, so build these per size and let them go when measured.
    """

    def fwd():
        if train_forward:
            return fn(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    saved = fn(*inputs)

    def bwd():
        return torch.autograd.grad(saved, inputs, grad_out, retain_graph=True)

    def both():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}


def groups(cases: Iterable[Case], device: torch.device) -> Iterator[list[Case]]:
    """The cases timed together: on the CPU those of one op and shape (the case modules yield them
    one after another), on CUDA each alone, so that only the case being measured holds its tensors
    (the GPU suite's largest optimizer case takes 10-16 GB)."""
    if device.type == "cuda":
        yield from ([case] for case in cases)
        return
    for _, group in itertools.groupby(cases, key=lambda case: (case.op, case.shape)):
        yield list(group)


def measure(cases: list[Case], device: torch.device, min_run_time: float, roofline: dict | None = None) -> list[dict]:
    """Time ``cases`` together (``time_fns``) and take each one's peak memory; one JSON-able row each."""
    timings = time_fns([case.fn for case in cases], device, min_run_time)
    return [_row(case, timing, device, roofline) for case, timing in zip(cases, timings)]


def _row(case: Case, timing: Timing, device: torch.device, roofline: dict | None) -> dict:
    gbps = case.bytes_moved / timing.median_ms / 1e6 if case.bytes_moved else None
    tflops = case.flops / timing.median_ms / 1e9 if case.flops else None
    row = {
        "op": case.op, "provider": case.provider, "mode": case.mode, "shape": case.shape, "size": case.size,
        **asdict(timing),
        "gbps": gbps,
        "tflops": tflops,
        "peak_mem_bytes": peak_memory_bytes(case.fn, device),
        **case.extra,
    }
    if "tokens" in case.extra:
        row["tokens_per_s"] = case.extra["tokens"] / timing.median_ms * 1e3
    if "peak_flops" in case.extra and tflops:
        row["mfu"] = tflops * 1e12 / case.extra["peak_flops"]
    if roofline:
        row["pct_bandwidth"] = 100 * gbps / roofline["copy_gbps"] if gbps else None
        row["pct_compute"] = 100 * tflops / roofline["matmul_tflops"] if tflops else None
    return row
