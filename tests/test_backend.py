"""Backend selection, the forced-backend switch, fallbacks and backend_info()."""

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastlm
from fastlm import backend, extension
from fastlm.testing import random_tensor


def test_cpp_extension_builds():
    # CI must fail, not skip, when the C++ extension does not build.
    assert extension.cpu_extension_error() is None
    assert hasattr(extension.cpu_extension(), "norm_fwd")


def test_auto_runs_cpp_on_cpu():
    assert backend._choose("norm_fwd", "cpu") == backend.Choice("cpp", "default")


def test_auto_on_cuda_prefers_triton():
    choice = backend._choose("norm_fwd", "cuda")
    assert choice.backend == ("triton" if backend.HAS_TRITON else "torch")


@pytest.mark.parametrize("name", ["torch", "cpp"])
def test_environment_variable_forces_backend(monkeypatch, name):
    monkeypatch.setenv("FASTLM_BACKEND", name)
    assert backend.select("norm_fwd", torch.device("cpu")) is backend._registry["norm_fwd"][name]


def test_context_manager_overrides_environment(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", "cpp")
    with fastlm.use_backend("torch"):
        assert backend.requested_backend() == "torch"
    assert backend.requested_backend() == "cpp"


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTLM_BACKEND must be one of"):
        fastlm.rms_norm(random_tensor(2, 8), None)
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastlm.use_backend("fast"):
            pass


def test_forcing_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastlm.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fastlm.rms_norm(random_tensor(2, 8), None)


def test_forcing_cpp_on_cuda_is_an_error():
    with fastlm.use_backend("cpp"), pytest.raises(RuntimeError, match="runs on CPU tensors"):
        backend.select("norm_fwd", torch.device("cuda"))


def test_broken_extension_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(backend, "cpu_extension_error", lambda: "compiler exploded\nline 2")
    monkeypatch.setattr(backend, "_warned", set())
    monkeypatch.setattr(backend, "_auto_choices", {})  # select() caches the auto choice per process
    x = random_tensor(3, 16)
    with pytest.warns(UserWarning, match="runs the PyTorch implementation .*compiler exploded"):
        y = fastlm.rms_norm(x, None)
    torch.testing.assert_close(y, fastlm.ops.rms_norm_ref(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlm.rms_norm(x, None)  # warned once only
    assert backend.backend_info()["ops"]["norm_fwd"]["cpu"]["backend"] == "torch"


def test_build_failure_carries_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("#include <torch/extension.h>\nint f() { return undefined_name_here; }\n")
    result = extension.build("fastlm_broken_for_test", [source], ("-O0",))
    assert isinstance(result, extension.ExtensionUnavailable)
    assert "undefined_name_here" in str(result)


def test_backend_info_reports_every_op_and_reason():
    info = fastlm.backend_info()
    assert info["cpp"] == {"available": True, "error": None}
    assert info["ops"]["norm_fwd"]["cpu"] == {"backend": "cpp", "reason": "default"}
    assert set(info["ops"]) >= {"norm_fwd", "norm_bwd"}
    assert info["torch"] == torch.__version__


def test_backend_info_says_which_library_runs_the_cpu_matmuls(monkeypatch):
    gemm_module = importlib.import_module("fastlm.ops.gemm")
    for faster, library in ((True, "oneDNN"), (False, "torch")):
        monkeypatch.setattr(gemm_module, "ONEDNN_FASTER", faster)
        matmuls = fastlm.backend_info()["cpu_matmuls"]
        assert matmuls["library"] == library and matmuls["reason"]


def test_register_requires_a_torch_fallback():
    with pytest.raises(ValueError, match="must have a torch implementation"):
        backend.register("op_without_fallback", cpp=lambda: None)
    with pytest.raises(ValueError, match="unknown backends"):
        backend.register("op_bad", torch=lambda: None, fortran=lambda: None)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_compiles_nothing_and_queries_no_gpu():
    result = run_python(
        "import torch\n"
        "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('GPU queried at import'))\n"
        "import fastlm\n"
        "assert fastlm.extension._load_cpu.cache_info().currsize == 0, 'extension built at import'\n"
    )
    assert result.returncode == 0, result.stderr


def test_import_and_cpu_ops_work_without_triton():
    result = run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastlm\n"
        "assert not fastlm.backend_info()['triton']['available']\n"
        "x = torch.randn(4, 32)\n"
        "torch.testing.assert_close(fastlm.layer_norm(x), fastlm.ops.layer_norm_ref(x))\n"
    )
    assert result.returncode == 0, result.stderr


def test_interpreter_loop_bounds_are_mended_only_where_triton_lacks_the_fix(monkeypatch):
    # Triton 3.6's interpreter (torch 2.11's pin) with NumPy >= 2.4: int() of a 1-element array raises.
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    np = pytest.importorskip("numpy")
    from types import SimpleNamespace

    from fastlm._triton import _mend_interpreter_loop_bounds

    set_attrs = {}
    scope = SimpleNamespace(set_attr=lambda obj, name, value: set_attrs.__setitem__(name, value))

    def unfixed(tensor, scope):
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    scalar = SimpleNamespace(handle=SimpleNamespace(data=np.array([7])))
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", unfixed)
    monkeypatch.setattr(np, "__version__", "2.3.5")
    assert _mend_interpreter_loop_bounds() is None and interpreter._patch_lang_tensor is unfixed

    monkeypatch.setattr(np, "__version__", "2.4.0")
    assert "triton-lang/triton#9171" in _mend_interpreter_loop_bounds()
    interpreter._patch_lang_tensor(object, scope)
    assert set_attrs["__index__"](scalar) == 7
    assert _mend_interpreter_loop_bounds() is None  # mended once: the wrapper is not wrapped again
