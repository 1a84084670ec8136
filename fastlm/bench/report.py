"""Turn benchmark rows into a markdown report (one table per op) and PNG plots."""

import os
from collections import defaultdict
from pathlib import Path


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def is_fastlm(provider: str) -> bool:
    """fastlm itself, or one of its options measured beside it (e.g. ``fastlm-atomic-dq``): never a peer."""
    return provider == "fastlm" or provider.startswith("fastlm-")


def best_peer_ratio(rows: list[dict]) -> dict[int, float]:
    """For each fastlm row (by index): the best other provider's median / fastlm's median."""
    groups = defaultdict(list)
    for i, r in enumerate(rows):
        groups[(r["op"], r["mode"], r["shape"])].append(i)
    ratios = {}
    for members in groups.values():
        peers = [rows[i]["median_ms"] for i in members if not is_fastlm(rows[i]["provider"])]
        for i in members:
            if is_fastlm(rows[i]["provider"]) and peers:
                ratios[i] = min(peers) / rows[i]["median_ms"]
    return ratios


# Figures some ops add to their rows (Case.extra, or computed from it): column title and format.
EXTRA_COLUMNS = {"tokens_per_s": ("tokens/s", ",.0f"), "mfu": ("MFU", ".1%"),
                 "state_bytes_per_param": ("state B/param", ".2f")}


def markdown(rows: list[dict], env: dict, roofline: dict) -> str:
    ratios = best_peer_ratio(rows)
    lines = [
        f"# fastlm benchmarks: {env['device']}",
        "",
        f"Measured {env['date']} at commit `{env['commit']}` with torch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env['cuda']}, Python {env['python']}" + (f", on a {env['cpu']} CPU." if env.get("cpu") else "."),
        f"Roofline measured in the same run: copy {roofline['copy_gbps']:.1f} GB/s "
        f"({roofline['copy_bytes'] / 2**20:.0f} MiB moved), matmul {roofline['matmul_tflops']:.2f} TFLOP/s "
        f"({roofline['matmul_shape']}).",
        "Times are medians (20%-80% quantiles); 'vs best peer' is the best other provider's median over fastlm's "
        "(above 1: fastlm is faster).",
    ]
    by_op = defaultdict(list)
    for i, r in enumerate(rows):
        by_op[r["op"]].append(i)
    for op, members in by_op.items():
        extras = [key for key in EXTRA_COLUMNS if any(rows[i].get(key) is not None for i in members)]
        lines += [
            "",
            f"## {op}",
            "",
            "| mode | shape | provider | ms | GB/s | TFLOP/s | % roofline | peak MiB | vs best peer |"
            + "".join(f" {EXTRA_COLUMNS[key][0]} |" for key in extras),
            "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extras),
        ]
        for i in members:
            r = rows[i]
            pct = r.get("pct_bandwidth") if r.get("pct_bandwidth") is not None else r.get("pct_compute")
            peak = r["peak_mem_bytes"] / 2**20 if r.get("peak_mem_bytes") is not None else None
            lines.append(
                f"| {r['mode']} | {r['shape']} | {r['provider']} | "
                f"{r['median_ms']:.3f} ({r['p20_ms']:.3f}-{r['p80_ms']:.3f}) | {_fmt(r.get('gbps'), '.1f')} | "
                f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(pct, '.0f')} | {_fmt(peak, '.1f')} | "
                f"{_fmt(ratios.get(i), '.2f')} |"
                + "".join(f" {_fmt(r.get(key), EXTRA_COLUMNS[key][1])} |" for key in extras)
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per op, mode and series (a row's optional ``series``, e.g. head dim and causality
    for attention) with several sizes: throughput (or time) vs size per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups = defaultdict(list)
    for r in rows:
        if r.get("size") is not None:
            groups[(r["op"], r["mode"], r.get("series", ""))].append(r)
    written = []
    for (op, mode, series), members in groups.items():
        if len({r["size"] for r in members}) < 2:
            continue
        metric = "tflops" if members[0].get("tflops") else "gbps" if members[0].get("gbps") else "median_ms"
        label = {"tflops": "TFLOP/s", "gbps": "GB/s", "median_ms": "median ms"}[metric]
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in dict.fromkeys(r["provider"] for r in members):
            points = sorted((r["size"], r[metric]) for r in members if r["provider"] == provider)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("size")
        ax.set_ylabel(label)
        ax.set_title(f"{op} {mode} {series}".strip())
        ax.legend()
        ax.grid(alpha=0.3)
        name = "-".join(part for part in (op, mode, series) if part)
        path = out_dir / f"{name.replace('+', '_').replace(' ', '_')}.png"
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
        plt.close(fig)
        written.append(path)
    return written


def write_atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
