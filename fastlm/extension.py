"""Build and load fastlm's C++ CPU extension on first use.

The extension is compiled by ``torch.utils.cpp_extension.load`` the first time an op
needs it (never at import), and cached under ``$FASTLM_CACHE_DIR`` (default
``~/.cache/fastlm``) in a folder keyed by the sources and their location, the flags, torch's
version and the CPU, so a second process loads it in milliseconds. A failed build is remembered
with the compiler's message, which ``fastlm.backend_info()`` reports.
"""

import functools
import hashlib
import os
import platform
from pathlib import Path

CPU_SOURCES = ("cpu/fastlm_cpu.cpp", "cpu/norm.cpp", "cpu/optim8bit.cpp", "cpu/activation.cpp", "cpu/rope.cpp")
CPU_SOURCES += ("cpu/cross_entropy.cpp",)
CPU_SOURCES += ("cpu/decode.cpp",)
CPU_SOURCES += ("cpu/attention.cpp",)
CPU_SOURCES += ("cpu/transpose.cpp",)
# -fno-math-errno: sqrt never sets errno, so loops that take square roots vectorize.
# -fno-trapping-math: no FP exception is ever observed, so a float comparison may run on lanes
# that did not need it. Without it GCC 12 leaves the activation loops (exp_approx's clamps are
# `x < lo ? lo : x`) scalar on AVX2 ("control flow in loop"): 4.2 ns/element on Zen 3. Values and
# rounding are unchanged (no reassociation, no fast-math).
CPU_CFLAGS = ("-O3", "-fopenmp", "-march=native", "-std=c++17", "-fno-math-errno", "-fno-trapping-math")
CPU_LDFLAGS = ("-fopenmp",)
# The CUDA extension: built only on a machine with a CUDA device, on first use. No fast-math:
# the kernels must round like their PyTorch references.
CUDA_SOURCES = ("cuda/fastlm_cuda.cpp", "cuda/optim8bit.cu")
CUDA_CFLAGS = ("-O3", "-std=c++17")
CUDA_NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr")


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded; the message says why."""


def source_dir() -> Path:
    """Where the C++/CUDA sources are: inside the package for a wheel, the repo's csrc/ otherwise."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise ExtensionUnavailable(f"C++ sources not found next to {package}")


def _cpu_signature() -> str:
    # -march=native code must not be reused on another processor.
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _build_dir(name: str, sources: list[Path], flags: tuple[str, ...]) -> Path:
    import torch

    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    for header in sorted(source_dir().rglob("*.h")):
        digest.update(header.read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_signature().encode())
    # ninja's build file names the sources by absolute path: two checkouts with the same sources
    # would otherwise share a folder and rebuild over each other.
    digest.update(str(source_dir()).encode())
    root = Path(os.environ.get("FASTLM_CACHE_DIR", Path.home() / ".cache" / "fastlm"))
    path = root / f"{name}-{digest.hexdigest()[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(name: str, sources: list[Path], cflags: tuple[str, ...], ldflags: tuple[str, ...] = (), **kwargs):
    """Compile (or load from the cache) an extension; an ExtensionUnavailable carrying the
    compiler's output is returned, not raised, when that fails."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=list(cflags),
            extra_ldflags=list(ldflags),
            extra_include_paths=[str(source_dir())],
            build_directory=str(_build_dir(name, sources, cflags + ldflags)),
            verbose=False,
            **kwargs,
        )
    except Exception as exc:  # the compiler's output is in the message
        return ExtensionUnavailable(f"building the C++ extension {name} failed: {exc}")


@functools.cache
def _load_cpu():
    root = source_dir()
    return build("fastlm_cpu", [root / s for s in CPU_SOURCES], CPU_CFLAGS, CPU_LDFLAGS)


def cpu_extension():
    """The compiled CPU module; raises ExtensionUnavailable (with the compiler's error) if it cannot build."""
    module = _load_cpu()
    if isinstance(module, ExtensionUnavailable):
        raise module
    return module


def cpu_extension_error() -> str | None:
    """None when the CPU extension loads, else why it does not."""
    module = _load_cpu()
    return str(module) if isinstance(module, ExtensionUnavailable) else None


@functools.cache
def _load_cuda():
    import torch
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        return ExtensionUnavailable("the CUDA extension needs a CUDA device; none is available")
    if cpp_extension.CUDA_HOME is None:
        return ExtensionUnavailable("the CUDA extension needs the CUDA toolkit (nvcc); CUDA_HOME is not set")
    root = source_dir()
    sources = [root / s for s in CUDA_SOURCES]
    # Key the cache by the device's architecture too: the kernels are compiled for it.
    arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
    try:
        return cpp_extension.load(
            name="fastlm_cuda",
            sources=[str(s) for s in sources],
            extra_cflags=list(CUDA_CFLAGS),
            extra_cuda_cflags=list(CUDA_NVCC_FLAGS),
            extra_include_paths=[str(root)],
            # The .cuh headers join the cache key (_build_dir hashes only the sources and *.h).
            build_directory=str(_build_dir("fastlm_cuda", sources + sorted(root.rglob("*.cuh")),
                                           CUDA_CFLAGS + CUDA_NVCC_FLAGS + (arch,))),
            verbose=False,
        )
    except Exception as exc:  # the compiler's output is in the message
        return ExtensionUnavailable(f"building the CUDA extension failed: {exc}")


def cuda_extension():
    """The compiled CUDA module; raises ExtensionUnavailable (with the reason) if it cannot build."""
    module = _load_cuda()
    if isinstance(module, ExtensionUnavailable):
        raise module
    return module


def cuda_extension_error() -> str | None:
    """None when the CUDA extension loads, else why it does not (never builds without a CUDA device)."""
    module = _load_cuda()
    return str(module) if isinstance(module, ExtensionUnavailable) else None
