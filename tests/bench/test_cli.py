"""fastlm-bench's quick suite runs end to end (it proves the suite works; speed is not asserted)."""

import json
import subprocess
import sys

import pytest
import torch

from fastlm.bench.cli import SUITES, main
from fastlm.bench.harness import Case, measure
from fastlm.bench.report import best_peer_ratio, markdown, plot

ENV = {"device": "cpu", "date": "today", "commit": "abc", "torch": "2", "triton": "3", "cuda": None, "python": "3"}
ROOFLINE = {"copy_gbps": 10.0, "copy_bytes": 2**20, "matmul_tflops": 0.1, "matmul_shape": "64x64x64 float32"}


def test_quick_suite_writes_results_report_and_plots(tmp_path):
    assert main(["--suite", "quick", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == set(SUITES), "an op of the suite produced no rows"
    assert {r["op"].split("_")[0] for r in rows} >= {"rms", "layer"}
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    assert all(r["commit"] is not None and r["torch"] and r["device"] for r in rows)
    assert all(r["pct_bandwidth"] is not None for r in rows if r["gbps"] is not None)
    report = (tmp_path / "report.md").read_text()
    assert "## rms_norm" in report and "## layer_norm" in report
    assert all(r["tokens_per_s"] > 0 for r in rows if r["bench"] == "train")
    assert "| tokens/s |" in report and "| state B/param |" in report
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


def test_an_unwritable_out_fails_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("fastlm.bench.cli.measure_roofline", lambda *a, **k: pytest.fail("measured"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--ops", "norm", "--out", str(tmp_path / "file" / "out")])
    assert exit_info.value.code == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_every_suite_module_defines_cases():
    import importlib

    for module in SUITES.values():
        assert callable(importlib.import_module(module).cases)


def test_best_peer_ratio_compares_within_one_shape_and_mode():
    rows = [
        {"op": "x", "mode": "fwd", "shape": "a", "provider": "fastlm", "median_ms": 1.0},
        {"op": "x", "mode": "fwd", "shape": "a", "provider": "torch", "median_ms": 3.0},
        {"op": "x", "mode": "fwd", "shape": "a", "provider": "torch.compile", "median_ms": 2.0},
        {"op": "x", "mode": "fwd", "shape": "b", "provider": "torch", "median_ms": 0.1},
        # An option of fastlm's is compared with the peers, never counted as one.
        {"op": "x", "mode": "fwd", "shape": "a", "provider": "fastlm-atomic-dq", "median_ms": 0.5},
    ]
    assert best_peer_ratio(rows) == {0: 2.0, 4: 4.0}


def test_suite_modules_import_no_peer_library():
    """Peers (transformers, Liger, flash-attn, ...) are imported inside cases(), only when found."""
    peers = ["transformers", "liger_kernel", "flash_attn", "xformers", "bitsandbytes", "apex"]
    code = (f"import sys, importlib; [importlib.import_module(m) for m in {list(SUITES.values())!r}]; "
            f"print([p for p in {peers!r} if p in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_plot_draws_one_figure_per_series(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"op": "attention", "mode": "fwd", "provider": p, "size": s, "tflops": 1.0, "series": series}
        for p in ("fastlm", "torch") for s in (1024, 2048) for series in ("d64", "d64 causal")
    ]
    written = sorted(path.name for path in plot(rows, tmp_path))
    assert written == ["attention-fwd-d64.png", "attention-fwd-d64_causal.png"]


def test_rows_carry_tokens_per_s_and_mfu_when_given():
    a = torch.randn(64, 64)
    case = Case("mm", "fastlm", "fwd", "64", lambda: a @ a, flops=2 * 64**3, extra={"tokens": 64, "peak_flops": 1e15})
    row = measure(case, torch.device("cpu"), 0.05)
    assert row["tokens_per_s"] == pytest.approx(64 / row["median_ms"] * 1e3)
    assert row["mfu"] == pytest.approx(row["tflops"] * 1e12 / 1e15)
    assert "MFU" in markdown([row], ENV, ROOFLINE)


def test_every_op_has_gpu_tests_that_exist():
    from pathlib import Path

    from fastlm.bench.cli import GPU_TESTS

    assert set(GPU_TESTS) == set(SUITES)
    gpu_tests = Path(__file__).resolve().parents[1] / "gpu"
    assert all((gpu_tests / name).is_file() for names in GPU_TESTS.values() for name in names)
    assert {p.name for p in gpu_tests.glob("test_*.py")} == {n for names in GPU_TESTS.values() for n in names}


def test_cpu_peak_memory_is_the_peak_of_tensor_bytes_held():
    from fastlm.bench.harness import peak_memory_bytes

    kept = torch.randn(256, 256)  # held before the call: not counted

    def fn():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB: 6 MB held
        del a
        c = torch.empty(1000, 1000)  # 2 + 4 MB held
        return b, c  # 6 MB returned, freed by the caller

    assert kept.numel() > 0
    assert peak_memory_bytes(fn, torch.device("cpu")) == 6_000_000


def test_alternating_medians_calls_each_in_turn():
    from fastlm.bench.harness import alternating_medians

    calls = []
    result = alternating_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(result) == {"a", "b"} and all(ms >= 0 for ms in result.values())
