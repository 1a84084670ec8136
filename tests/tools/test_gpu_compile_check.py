"""The Hopper compile gate: every kernel is declared, and the gate fails on broken kernels.

That the gate passes on fastlm's own kernels is checked by running it in CI (it compiles
every declared variant, too slow for a unit test); see benchmarks/results/compile-report.md.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastlm import kernel_registry
from fastlm.tools import gpu_compile_check as gate

REPO = Path(__file__).resolve().parents[2]
FIXTURES = "tests.tools.gate_fixture_kernels"


@pytest.fixture
def registry_snapshot():
    """Undo registrations a test makes, so other tests see fastlm's registry only."""
    saved = dict(kernel_registry.REGISTRY)
    yield
    kernel_registry.REGISTRY.clear()
    kernel_registry.REGISTRY.update(saved)


def test_every_triton_function_in_fastlm_is_registered():
    modules = gate.import_package_modules()
    found = gate.find_jit_functions(modules)
    # The scan must see the kernels it is meant to police, or this test could not fail.
    assert {"fastlm.ops.norm._norm_fwd_kernel", "fastlm.ops.norm._norm_bwd_kernel"} <= set(found)
    assert gate.find_unregistered(modules) == [], (
        "declare these @triton.jit kernels with fastlm.kernel_registry.register_kernel"
    )


def test_unregistered_kernel_is_reported_and_called_helper_is_not(tmp_path, registry_snapshot):
    source = tmp_path / "gate_scan_probe.py"
    source.write_text(
        "from fastlm._triton import tl, triton\n"
        "from fastlm.kernel_registry import Variant, register_kernel\n\n"
        "@triton.jit\n"
        "def _helper(x):\n"
        "    return x + 1\n\n"
        "@triton.jit\n"
        "def _declared(X):\n"
        "    tl.store(X, _helper(tl.load(X)))\n\n"
        "register_kernel(_declared, variants=lambda: [Variant({'X': '*fp32'})])\n\n"
        "@triton.jit\n"
        "def _orphan(X):\n"
        "    tl.store(X, 0.0)\n"
    )
    spec = importlib.util.spec_from_file_location("gate_scan_probe", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert set(gate.find_jit_functions([module])) == {
        "gate_scan_probe._helper", "gate_scan_probe._declared", "gate_scan_probe._orphan"
    }
    assert gate.find_unregistered([module]) == ["gate_scan_probe._orphan"]


def test_main_refuses_interpreted_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        gate.main(["--no-cuda-sources"])


def test_gate_fails_on_broken_kernels(tmp_path):
    """Compile the fixture kernels for real: the good matmul passes, each broken one fails.

    Started with TRITON_INTERPRET=1, as under pytest here: the tool must restart without it.
    """
    report_json, report_md = tmp_path / "report.json", tmp_path / "report.md"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastlm.tools.gpu_compile_check", "--module", FIXTURES, "--only", FIXTURES,
         "--no-cuda-sources", "--jobs", "1", "--json", str(report_json), "--markdown", str(report_md)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "GPU compile gate FAILED" in proc.stderr

    report = json.loads(report_json.read_text())
    problems = {
        k["name"].rsplit(".", 1)[-1]: " / ".join(p for v in k["variants"] for p in v["problems"])
        for k in report["kernels"]
    }
    assert set(problems) == {
        "_matmul_kernel", "_smem_hog_kernel", "_runtime_shape_kernel", "_spilling_kernel", "_no_dot_kernel",
        "_misdeclared_kernel",
    }
    assert problems["_matmul_kernel"] == ""
    assert "shared memory" in problems["_smem_hog_kernel"]
    assert "does not compile" in problems["_runtime_shape_kernel"] and "constexpr" in problems["_runtime_shape_kernel"]
    assert "spills" in problems["_spilling_kernel"]
    assert "no HGMMA" in problems["_no_dot_kernel"]
    assert "missing ['Y']" in problems["_misdeclared_kernel"]

    (matmul,) = next(k for k in report["kernels"] if k["name"].endswith("._matmul_kernel"))["variants"]
    assert matmul["hgmma"] > 0 and matmul["local"] == matmul["stack"] == 0 and matmul["registers"] > 0
    # The device function the fixture kernels share is compiled inside them, not flagged.
    assert not any("_matmul_tile" in f for f in report["failures"])
    markdown = report_md.read_text()
    assert "**FAIL**" in markdown and "`_spilling_kernel`" in markdown
    # The report's command reproduces it: --jobs and its value (which change nothing there) are left out.
    assert f"--no-cuda-sources --json {report_json} --markdown" in markdown


def test_report_command_leaves_out_jobs_and_its_value():
    args = ["--jobs", "2", "--json", "r.json", "--jobs=4", "--only", "attention"]
    assert gate._without_jobs(args) == ["--json", "r.json", "--only", "attention"]


@pytest.mark.skipif(not (Path(gate._cuda_home()) / "bin" / "nvcc").is_file(), reason="needs nvcc (set CUDA_HOME)")
def test_cuda_source_resources_and_spills(tmp_path):
    source = tmp_path / "probe.cu"
    source.write_text(
        "__global__ void reverse_block(float* x) {\n"
        "  __shared__ float tile[256];\n"
        "  tile[threadIdx.x] = x[threadIdx.x];\n"
        "  __syncthreads();\n"
        "  x[threadIdx.x] = tile[255 - threadIdx.x];\n"
        "}\n"
        "__global__ void dynamic_index(float* x, const int* idx) {\n"
        "  float a[64];  // a running sum indexed at run time: it lives in local memory\n"
        "  a[0] = x[threadIdx.x];\n"
        "  for (int i = 1; i < 64; ++i) a[i] = a[i - 1] * x[i * blockDim.x + threadIdx.x];\n"
        "  x[threadIdx.x] = a[idx[threadIdx.x]];\n"
        "}\n"
    )
    result = gate.compile_cuda_source(source, 90)
    assert result.error is None
    kernels = {k.name: k for k in result.kernels}
    assert set(kernels) == {"reverse_block(float*)", "dynamic_index(float*, int const*)"}
    assert kernels["reverse_block(float*)"].shared == 256 * 4
    assert kernels["reverse_block(float*)"].problems == []
    assert any("spills" in p for p in kernels["dynamic_index(float*, int const*)"].problems)

    source.write_text("__global__ void broken(float* x) { x[0] = undefined_name; }\n")
    result = gate.compile_cuda_source(source, 90)
    assert result.error is not None and "undefined_name" in result.error
    assert result.problems and result.problems[0].startswith("does not compile")



def _refused(monkeypatch, capsys, args: list[str]) -> str:
    """Run the gate's main on ``args``; it must stop with a one-line usage error before compiling."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(gate, "run_gate", lambda *a, **k: pytest.fail("compiled although the arguments are wrong"))
    with pytest.raises(SystemExit) as exit_info:
        gate.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_module_that_does_not_import_is_an_error(monkeypatch, capsys):
    err = _refused(monkeypatch, capsys, ["--module", "nosuch.module", "--only", "x", "--no-cuda-sources"])
    assert "--module nosuch.module: cannot import it" in err and "nosuch" in err
    with pytest.raises(ModuleNotFoundError):
        gate.import_package_modules(("nosuch.module",))


def test_a_selection_that_matches_no_kernel_is_an_error(monkeypatch, capsys):
    err = _refused(monkeypatch, capsys, ["--only", "nosuchkernel", "--no-cuda-sources"])
    assert "--only 'nosuchkernel' matches no registered kernel" in err


def test_jobs_must_be_positive(monkeypatch, capsys):
    assert "--jobs must be at least 1" in _refused(monkeypatch, capsys, ["--jobs", "0", "--no-cuda-sources"])


def test_an_unwritable_report_path_is_refused_before_compiling(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    for option, path in (("--markdown", tmp_path / "file" / "sub" / "r.md"), ("--json", tmp_path)):
        err = _refused(monkeypatch, capsys, [option, str(path), "--only", "_norm_fwd", "--no-cuda-sources"])
        assert f"{option} {path}: cannot write the report there" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], "the check left something behind"


def test_a_gate_that_compiled_nothing_fails():
    report, _ = gate.run_gate((90,), only="nosuchkernel", cuda_sources=False)
    assert report["kernels"] == [] and any("matches no registered kernel" in f for f in report["failures"])
    assert any("nothing to compile" in f for f in report["failures"])
