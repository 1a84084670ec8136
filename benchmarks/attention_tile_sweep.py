"""Tile sweep for the Hopper attention kernels (forward, dQ, dK/dV), in two steps so that the
GPU minutes go to timing only:

    python benchmarks/attention_tile_sweep.py compile OUT.jsonl [KINDS]   # no GPU: compile every candidate for sm_90a
    python benchmarks/attention_tile_sweep.py time OUT.jsonl [COMPILED.jsonl [KINDS]]   # on the GPU: time, check
    python benchmarks/attention_tile_sweep.py best OUT.jsonl   # after: the fastest tiles against the defaults

``KINDS`` (e.g. ``bwd_dkdv`` or ``bwd_dkdv,bwd_dq``) limits either step to those kernels: the timing
for a device window too short for every candidate, the compile to a kind added since the last run.

``compile`` builds each candidate tile (BLOCK_M, BLOCK_N, warps, stages) of each kernel, bf16,
causal, at head dims 64 and 128, and records registers, spill bytes, shared memory and HGMMA
count, as the compile gate reads them. ``time`` runs fastlm.attention with each candidate in
place of the launcher's choice (``fastlm.ops.attention._config``, the one place tiles are
decided), checks dQ/dK/dV against SDPA's flash backward (a candidate's error may be at most
2x the default tiles' error), and records each kernel's median device time from the CUDA
profiler, with TFLOP/s counting the causal half. Given the ``compile`` step's output, ``time``
skips the candidates that did not compile cleanly or spill more than the launcher's default
tiles do. Candidates that fail on the device or fail the check are recorded with the reason,
not timed. Lines are JSON.

Register allocation, and so spilling, changes between Triton releases: run ``compile`` with the
device's Triton (``DEVICE_TRITON``, 3.6 on the H200 image: ``pip install triton==3.6.0`` into a
separate virtual environment here), whose version each line records. Either step says so when the
versions differ.
"""

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import warnings

import torch

# The module, not the function of the same name that fastlm.ops exports.
attn = importlib.import_module("fastlm.ops.attention")

HEAD_DIMS = (128, 64)  # 128 first: the size users compare, timed first if the device window ends early
# dK/dV first: the backward is the slow part (0.30-0.34x SDPA on the H200, benchmarks/results/h200-2026-11-28),
# and dK/dV (4 of its 7 matmuls) the larger share of it: timed first if the device window ends early.
# bwd_dkdv_dq is the dK/dV kernel of the deterministic=False backward, which also adds dQ atomically.
KERNELS = {"bwd_dkdv": "_attn_bwd_dkdv_kernel", "bwd_dkdv_dq": "_attn_bwd_dkdv_kernel", "bwd_dq": "_attn_bwd_dq_kernel",
           "fwd": "_attn_fwd_kernel"}
# (BLOCK_M, BLOCK_N, num_warps, num_stages). HGMMA needs 64 rows on the M side of a dot: the
# query block for the forward and dQ, the key block (BLOCK_N) for dK/dV.
CANDIDATES = {
    "fwd": [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)],
    "bwd_dq": [(m, n, w, s) for m in (64, 128) for n in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)],
    "bwd_dkdv": [(m, n, w, s) for m in (16, 32, 64) for n in (64, 128) for w in (4, 8) for s in (1, 2, 3)],
}
CANDIDATES["bwd_dkdv_dq"] = CANDIDATES["bwd_dkdv"]
# The variant label (fastlm.ops.attention._train_variants) of each kind's bf16 causal build.
LABEL_TAG = {"bwd_dkdv_dq": " atomic dQ"}
# Matmuls per score tile: the forward's QK^T and PV; dQ recomputes QK^T and forms dO V^T and dS K;
# dK/dV recomputes QK^T and forms dO V^T, P^T dO and dS^T Q.
MATMULS = {"fwd": 2, "bwd_dq": 3, "bwd_dkdv": 4, "bwd_dkdv_dq": 5}
# A larger tile may win despite a few more spilled registers; beyond this it is not worth a
# device compile (several seconds each, the sweep's main cost). 256 admits the dK/dV tiles with
# 32-query steps at head dim 128 (150-230 bytes against the default 16-query step's 0): whether
# their fewer, larger steps beat the spill is what only the device can say.
SPILL_SLACK = 256
# The H200 image's Triton release (device README): the compiler whose spills the committed sweep records.
DEVICE_TRITON = "3.6."
SHAPE = dict(batch=4, seqlen=4096, heads=16)  # 64 programs per query block row: fills 132 SMs


@contextlib.contextmanager
def tiles(kind: str, tile: tuple[int, int, int, int]):
    """Make the launchers (and the compile gate's variant builder) use ``tile`` for ``kind``."""
    default = attn._config

    def patched(k, head_dim, dtype, device_type):
        if k != kind:
            return default(k, head_dim, dtype, device_type)
        block_m, block_n, num_warps, num_stages = tile
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)

    attn._config = patched
    try:
        yield
    finally:
        attn._config = default


def default_tile(kind: str, head_dim: int) -> tuple[int, int, int, int]:
    cfg = attn._config(kind, head_dim, torch.bfloat16, "cuda")
    return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]


def compile_sweep(out, kinds: tuple[str, ...] = tuple(KERNELS)) -> None:
    import triton

    from fastlm.kernel_registry import REGISTRY
    from fastlm.tools.gpu_compile_check import compile_variant

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    if not triton.__version__.startswith(DEVICE_TRITON):
        print(f"note: this is Triton {triton.__version__}; the device compiles with {DEVICE_TRITON}x, whose "
              "register allocation (and spills) may differ", file=sys.stderr)
    for kind, name in KERNELS.items():
        if kind not in kinds:
            continue
        spec = REGISTRY[f"fastlm.ops.attention.{name}"]
        for head_dim in HEAD_DIMS:
            label = f"bf16 d={head_dim} causal{LABEL_TAG.get(kind, '')}"
            for tile in CANDIDATES[kind]:
                with tiles(kind, tile):
                    (variant,) = [v for v in spec.variants() if v.label == label]
                r = compile_variant(spec, variant, 90)
                rec = {"kind": kind, "head_dim": head_dim, "tile": tile,
                       "default": tile == default_tile(kind, head_dim),
                       "regs": r.registers, "spill": None if r.error else r.stack + r.local, "smem": r.shared,
                       "hgmma": r.hgmma, "problems": r.problems, "triton": triton.__version__}
                print(json.dumps(rec), flush=True)
                out.write(json.dumps(rec) + "\n")


def _kernel_ms(fn, names: list[str], reps: int = 10) -> dict[str, float]:
    """Median device milliseconds per call of each named kernel over ``reps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    per_rep = {n: [] for n in names}
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        totals = dict.fromkeys(names, 0.0)
        for event in prof.events():
            for n in names:
                if n in event.name:
                    totals[n] += event.device_time_total / 1e3
        for n in names:
            per_rep[n].append(totals[n])
    return {n: statistics.median(v) for n, v in per_rep.items()}


def admitted(compiled_path: str) -> set[tuple[str, int, tuple[int, ...]]]:
    """(kind, head dim, tile) of the compiled candidates worth timing: no compile problem, and at most
    SPILL_SLACK bytes more spill than the default tiles of that kernel and head dim (always admitted)."""
    records = [json.loads(line) for line in open(compiled_path)]
    budget = {(r["kind"], r["head_dim"]): r["spill"] for r in records if r["default"]}
    return {(r["kind"], r["head_dim"], tuple(r["tile"])) for r in records
            if r["default"] or (not r["problems"] and r["spill"] is not None
                                and r["spill"] <= budget.get((r["kind"], r["head_dim"]), 0) + SPILL_SLACK)}


def time_sweep(out, compiled_path: str | None, kinds: tuple[str, ...] = tuple(KERNELS)) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import triton

    keep = admitted(compiled_path) if compiled_path else None
    if compiled_path:
        versions = {json.loads(line).get("triton", "unrecorded") for line in open(compiled_path)}
        if versions != {triton.__version__}:
            print(f"note: {compiled_path} was compiled with Triton {sorted(versions)}, this is {triton.__version__}: "
                  "its spill figures may not hold here", file=sys.stderr)
    b, s, h = SHAPE["batch"], SHAPE["seqlen"], SHAPE["heads"]
    for head_dim in HEAD_DIMS:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        dout = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref_out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        ref = (ref_out.transpose(1, 2),) + torch.autograd.grad(ref_out, (q, k, v), dout.transpose(1, 2))
        flops = 4 * b * h * s * s * head_dim / 2  # the forward's two matmuls, causal half

        def run(deterministic=True):
            o = attn.attention(q, k, v, causal=True, deterministic=deterministic)
            return (o,) + torch.autograd.grad(o, (q, k, v), dout)

        def errors(deterministic=True):
            return [(x.float() - r.float()).abs().max().item() for x, r in zip(run(deterministic), ref)]

        base = errors()
        for kind, name in KERNELS.items():
            if kind not in kinds:
                continue
            for tile in CANDIDATES[kind]:
                if keep is not None and (kind, head_dim, tile) not in keep:
                    continue
                rec = {"kind": kind, "head_dim": head_dim, "tile": tile,
                       "default": tile == default_tile(kind, head_dim),
                       **SHAPE}
                deterministic = kind != "bwd_dkdv_dq"
                with tiles(kind, tile):
                    try:
                        err = errors(deterministic)
                        bad = [i for i, (e, e0) in enumerate(zip(err, base)) if e > 2 * e0 + 1e-3]
                        if bad:
                            rec["problem"] = f"error {err} vs default {base}"
                        else:
                            ms = _kernel_ms(lambda: run(deterministic), [name])[name]
                            rec.update(ms=ms, tflops=flops * MATMULS[kind] / 2 / ms / 1e9)
                    except Exception as exc:  # a tile the device refuses (shared memory): recorded, not fatal
                        rec["problem"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        torch.cuda.empty_cache()
                print(json.dumps(rec), flush=True)
                out.write(json.dumps(rec) + "\n")


def _kinds(arg: str | None) -> tuple[str, ...]:
    """The comma-separated kinds of a command line (all when absent), checked."""
    kinds = tuple(arg.split(",")) if arg else tuple(KERNELS)
    unknown = set(kinds) - set(KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernel kinds {sorted(unknown)}; expected some of {list(KERNELS)}")
    return kinds


def best(timed_path: str) -> list[str]:
    """Markdown rows, per (kind, head dim) of a ``time`` run: the default tiles' time, the fastest
    checked candidate and its speedup, for the next change to ``_config``."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for line in open(timed_path):
        rec = json.loads(line)
        if "ms" in rec:
            groups.setdefault((rec["kind"], rec["head_dim"]), []).append(rec)
    rows = ["| kind | head dim | default tiles | ms | fastest tiles | ms | TFLOP/s | speedup |",
            "|---|---|---|---|---|---|---|---|"]
    for (kind, head_dim), recs in sorted(groups.items()):
        top = min(recs, key=lambda r: r["ms"])
        default = next((r for r in recs if r["default"]), None)
        base = f"{tuple(default['tile'])} | {default['ms']:.3f}" if default else "not timed | -"
        speedup = f"{default['ms'] / top['ms']:.2f}x" if default else "-"
        rows.append(f"| {kind} | {head_dim} | {base} | {tuple(top['tile'])} | {top['ms']:.3f} | {top['tflops']:.0f} "
                    f"| {speedup} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = p.add_subparsers(dest="mode", required=True, metavar="{compile,time,best}")
    kinds_help = f"comma-separated kernel kinds, from {','.join(KERNELS)} (default: all)"
    step = steps.add_parser("compile", help="no GPU: compile every candidate for sm_90a")
    step.add_argument("out", metavar="OUT.jsonl", help="append a JSON line per candidate here")
    step.add_argument("kinds", metavar="KINDS", nargs="?", help=kinds_help)
    step = steps.add_parser("time", help="on the GPU: time and check every candidate")
    step.add_argument("out", metavar="OUT.jsonl", help="append a JSON line per candidate here")
    step.add_argument("compiled", metavar="COMPILED.jsonl", nargs="?",
                      help="the compile step's output: skip what did not compile cleanly or spills more")
    step.add_argument("kinds", metavar="KINDS", nargs="?", help=kinds_help)
    step = steps.add_parser("best", help="after: the fastest tiles against the defaults")
    step.add_argument("out", metavar="OUT.jsonl", help="the time step's output")
    args = p.parse_args(argv)
    if args.mode == "best":
        print("\n".join(best(args.out)))
        return
    kinds = _kinds(args.kinds)
    with open(args.out, "a") as out:
        if args.mode == "compile":
            compile_sweep(out, kinds)
        else:
            time_sweep(out, args.compiled, kinds)


if __name__ == "__main__":
    main()
