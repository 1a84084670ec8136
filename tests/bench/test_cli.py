"""fastlm-bench's quick suite runs end to end (it proves the suite works; speed is not asserted)."""

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch

from fastlm.bench.cli import SUITES, main
from fastlm.bench.harness import Case, measure
from fastlm.bench.report import best_peer_ratio, markdown, plot

ENV = {"device": "cpu (Some CPU, 2 threads)", "date": "today", "commit": "abc", "cpu": "Some CPU", "torch": "2",
       "triton": "3", "cuda": None, "python": "3"}
ROOFLINE = {"copy_gbps": 10.0, "copy_bytes": 2**20, "matmul_tflops": 0.1, "matmul_shape": "64x64x64 float32"}


def test_quick_suite_writes_results_report_and_plots(tmp_path):
    assert main(["--suite", "quick", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["bench"] for r in rows} == set(SUITES), "an op of the suite produced no rows"
    assert {r["op"].split("_")[0] for r in rows} >= {"rms", "layer"}
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    assert all(r["commit"] is not None and r["torch"] and r["device"] and r["cpu"] for r in rows)
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


@pytest.mark.parametrize("args, message", [
    (["--ops", "norm", "--device", "foo"], "--device foo: not a device"),
    (["--ops", "norm", "--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--ops", "norm", "--device", "meta"], "--device meta: fastlm-bench measures on cpu or cuda"),
    (["--ops", ","], "--ops ',' selects no op"),
])
def test_bad_arguments_fail_in_one_line_before_anything_is_created(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("fastlm.bench.cli.measure_roofline", lambda *a, **k: pytest.fail("measured"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists(), "the output folder was created before the arguments were checked"


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
    (row,) = measure([case], torch.device("cpu"), 0.05)
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


def test_cpu_cases_of_one_shape_take_turns_in_blocks(monkeypatch):
    """Each case runs a block of calls (as many as BLOCK_SECONDS holds, sized from one call) per round,
    in turn with the others, for MIN_BLOCKS rounds and min_run_time at least; each gets the quantiles of
    its blocks. The clock is a fake that each call advances by its case's cost."""
    from fastlm.bench import harness

    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    calls = []

    def costing(name, seconds):
        def fn():
            calls.append(name)
            clock[0] += seconds
        return fn

    # Binary fractions of a second, so the fake clock's sums are exact.
    slow, fast = harness.time_fns([costing("slow", 2**-7), costing("fast", 2**-9)], torch.device("cpu"), 0.2)
    # warm-up, then one sizing call each, then blocks: 2 calls of "slow" (20 ms // 7.8 ms), 10 of "fast".
    assert calls[:4] == ["slow", "fast", "slow", "fast"]
    runs = [(name, len(list(group))) for name, group in itertools.groupby(calls[4:])]
    assert runs[:4] == [("slow", 2), ("fast", 10), ("slow", 2), ("fast", 10)]
    assert runs == runs[:2] * (len(runs) // 2)
    # min_run_time * 2 cases = 0.4 s of rounds of 35 ms: 12 rounds (more than MIN_BLOCKS).
    assert len(runs) == 2 * 12
    assert slow == harness.Timing(*[2**-7 * 1e3] * 3) and fast == harness.Timing(*[2**-9 * 1e3] * 3)
    calls.clear()
    harness.time_fns([costing("slow", 2**-7), costing("fast", 2**-9)], torch.device("cpu"), 0.0)
    assert len([name for name, _ in itertools.groupby(calls[4:])]) == 2 * harness.MIN_BLOCKS


def test_cases_are_grouped_by_op_and_shape_on_cpu_only():
    from fastlm.bench.harness import groups

    def case(op, provider, mode, shape):
        return Case(op, provider, mode, shape, lambda: None)

    cases = [case("a", "fastlm", "fwd", "1"), case("a", "fastlm", "bwd", "1"), case("a", "torch", "fwd", "1"),
             case("a", "fastlm", "fwd", "2"), case("b", "fastlm", "fwd", "2")]
    on_cpu = [[(c.op, c.provider, c.mode, c.shape) for c in g] for g in groups(iter(cases), torch.device("cpu"))]
    assert on_cpu == [[("a", "fastlm", "fwd", "1"), ("a", "fastlm", "bwd", "1"), ("a", "torch", "fwd", "1")],
                      [("a", "fastlm", "fwd", "2")], [("b", "fastlm", "fwd", "2")]]
    assert [len(g) for g in groups(iter(cases), torch.device("cuda"))] == [1] * 5


def test_commit_is_marked_dirty_when_tracked_files_changed(monkeypatch):
    from fastlm.bench import harness

    answers = {("rev-parse", "--short", "HEAD"): "abc1234", ("status", "--porcelain", "--untracked-files=no"): ""}
    monkeypatch.setattr(harness, "_git", lambda *args: answers[args])
    assert harness.commit() == "abc1234"
    answers[("status", "--porcelain", "--untracked-files=no")] = " M fastlm/ops/norm.py"
    assert harness.commit() == "abc1234-dirty"
    assert harness.environment()["commit"] == "abc1234-dirty"
    answers[("rev-parse", "--short", "HEAD")] = None  # not a checkout
    assert harness.commit() is None


def test_cpu_model_is_recorded(tmp_path, monkeypatch):
    from fastlm.bench import harness

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example  CPU 9000 @ 3.0GHz\n\n"
                       "processor\t: 1\nmodel name\t: Example  CPU 9000 @ 3.0GHz\n")
    assert harness.cpu_model(cpuinfo) == "Example CPU 9000 @ 3.0GHz"
    monkeypatch.setattr(harness.platform, "processor", lambda: "fallback-cpu")
    assert harness.cpu_model(tmp_path / "missing") == "fallback-cpu"
    env = harness.environment()
    assert env["cpu"] and (torch.cuda.is_available() or env["cpu"] in env["device"])
    assert f"on a {ENV['cpu']} CPU" in markdown([], ENV, ROOFLINE)


def test_every_op_has_its_script_and_is_listed_in_the_readme():
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[2] / "benchmarks"
    readme = (benchmarks / "README.md").read_text()
    for op in SUITES:
        scripts = [p for p in (benchmarks / f"bench_{op}.py", benchmarks / f"bench_{op}s.py") if p.is_file()]
        assert scripts, f"no benchmarks/bench_{op}.py"
        script = scripts[0]
        assert f'"--ops", "{op}"' in script.read_text()
        assert f"`{op}`" in readme.split("Each op's cases live in")[0], f"{op} is not in the README's op list"
