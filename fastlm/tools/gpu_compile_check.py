"""Hopper compile gate: build every GPU kernel for sm_90a on a machine without a GPU.

The Triton interpreter that runs our tests on CPU accepts code the real compiler rejects
(runtime values where constexprs are needed, tiles that do not fit shared memory, register
spills). This tool compiles every variant declared in ``fastlm.kernel_registry`` with
Triton's real compiler for a GPU that need not be present, reads each cubin's registers,
stack, local and shared memory (and, for tensor-core kernels, its SASS) with the
``cuobjdump`` shipped in the Triton wheel, compiles every ``.cu`` under ``csrc/`` with
nvcc, writes a JSON and a markdown report, and exits with status 1 when

- a variant does not compile;
- a kernel uses local memory or stack (register spills) and its KernelSpec gives no reason;
- a block needs more shared memory than the target allows (227 KiB on sm_90);
- a kernel declared ``tensor_cores=True`` issues no HGMMA (Hopper warpgroup MMA) on sm_90a;
- a ``@triton.jit`` function in fastlm is neither registered nor called by a registered kernel.

    python -m fastlm.tools.gpu_compile_check \\
        --json benchmarks/results/compile-report.json --markdown benchmarks/results/compile-report.md

Kernels decorated while ``TRITON_INTERPRET=1`` are interpreter objects that cannot be
compiled, so when run as a script with the interpreter on, the tool restarts itself
without it.
"""

import argparse
import ast
import concurrent.futures
import importlib
import inspect
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from fastlm.kernel_registry import REGISTRY, KernelSpec, Variant

# Largest shared memory one block may use (the opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin).
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
# ptxas counts the 1 KiB per block that the driver reserves on sm_80+ into the static shared
# size it records (a kernel with no shared memory at all reports SHARED:1024); it is not
# part of the per-block limit above.
RESERVED_SMEM = 1024
NVCC_GENCODE = {90: "-gencode=arch=compute_90a,code=sm_90a", 80: "-gencode=arch=compute_80,code=sm_80"}
DEFAULT_CUDA_HOME = "/usr/local/cuda"
_FALSE = ("", "0", "false", "off", "no")


# ----------------------------------------------------------------------------- discovery


def import_package_modules(extra: tuple[str, ...] = ()) -> list[ModuleType]:
    """Import every fastlm module (so each kernel registers itself), then ``extra`` modules.

    ``__main__`` modules are skipped (importing one runs a command-line program), and so are
    modules whose optional third-party dependency is not installed (fastlm.hf without
    transformers): kernels live in fastlm.ops and fastlm.optim, whose dependencies are required.
    An ``extra`` module that does not import raises, whatever is missing.
    """
    import fastlm

    names = sorted(
        info.name for info in pkgutil.walk_packages(fastlm.__path__, "fastlm.") if not info.name.endswith(".__main__")
    )
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "fastlm":
                raise
    # A module the user named must import: skipping it would pass a gate that compiled none of its kernels.
    modules += [importlib.import_module(name) for name in extra]
    return modules


def _is_triton_kernel(obj) -> bool:
    """A ``@triton.jit`` function, compiled or interpreted, possibly autotuned."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return False
    return isinstance(obj, KernelInterface) or type(obj).__name__ == "InterpretedFunction"


def _python_function(kernel):
    """The plain Python function under a JITFunction, InterpretedFunction or Autotuner."""
    while not inspect.isfunction(kernel) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _qualified_name(kernel) -> str:
    fn = _python_function(kernel)
    return f"{fn.__module__}.{fn.__name__}"


def find_jit_functions(modules: list[ModuleType]) -> dict[str, object]:
    """Every Triton kernel or device function defined (not merely imported) in ``modules``."""
    found = {}
    for module in modules:
        for obj in vars(module).values():
            if _is_triton_kernel(obj) and _python_function(obj).__module__ == module.__name__:
                found[_qualified_name(obj)] = obj
    return found


def _called_jit_functions(kernel) -> list:
    """The Triton functions a kernel's body names (its device-function callees)."""
    fn = _python_function(kernel)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    scope = fn.__globals__
    callees = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            obj = scope.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            obj = getattr(scope.get(node.value.id), node.attr, None)
        else:
            continue
        if _is_triton_kernel(obj) and _python_function(obj) is not fn:
            callees.append(obj)
    return callees


def find_unregistered(modules: list[ModuleType]) -> list[str]:
    """Triton functions in ``modules`` that no registered kernel compiles.

    A device function called (directly or through other device functions) by a registered
    kernel is compiled as part of it, so it needs no declaration of its own.
    """
    covered = set(REGISTRY)
    pending = [spec.kernel for spec in REGISTRY.values()]
    while pending:
        for callee in _called_jit_functions(pending.pop()):
            name = _qualified_name(callee)
            if name not in covered:
                covered.add(name)
                pending.append(callee)
    return sorted(set(find_jit_functions(modules)) - covered)


# ----------------------------------------------------------------------------- binary inspection


def _tool(name: str) -> str:
    """A CUDA binary utility: the copy in the Triton wheel, else the CUDA toolkit's."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file():
        return str(bundled)
    toolkit = Path(_cuda_home()) / "bin" / name
    if toolkit.is_file():
        return str(toolkit)
    raise FileNotFoundError(f"{name} not found in the Triton wheel ({bundled.parent}) nor in {toolkit.parent}")


def _ptxas(arch: int) -> str:
    """The ptxas Triton runs for ``sm_<arch>`` (Triton 3.9 has a newer one for sm_90 and up)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(arch).path
        except TypeError:  # releases whose get_ptxas takes no arch
            return get_ptxas().path
    except (ImportError, AttributeError):
        return _tool("ptxas")


def _cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or DEFAULT_CUDA_HOME


@dataclass
class Resources:
    """What one compiled function needs per thread (registers, stack, local) and per block (shared)."""

    registers: int
    stack: int
    local: int
    static_shared: int
    hgmma: int | None
    """Hopper warpgroup MMA instructions (wgmma) in the SASS; None when not disassembled."""
    hmma: int | None
    """Warp-level MMA instructions (mma.sync), what Triton falls back to when wgmma does not apply."""


def inspect_binary(path: Path, sass: bool = True) -> dict[str, Resources]:
    """Resources of every function in a cubin or a host object with an embedded fatbin.

    Disassembling (``sass``, to count tensor-core instructions) takes a second or more per
    cubin, so the gate does it only for kernels that must use tensor cores.
    """
    cuobjdump = _tool("cuobjdump")
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True)
    counts: dict[str, tuple[int, int]] = {}
    if sass:
        listing = subprocess.run([cuobjdump, "--dump-sass", str(path)], capture_output=True, text=True, check=True)
        for chunk in re.split(r"^\s*Function : ", listing.stdout, flags=re.MULTILINE)[1:]:
            name, _, body = chunk.partition("\n")
            counts[name.strip()] = (len(re.findall(r"\bHGMMA\b", body)), len(re.findall(r"\bHMMA\b", body)))
    found = {}
    for name, line in re.findall(r"^\s*Function (\S+):\s*\n(.*)$", usage.stdout, flags=re.MULTILINE):
        fields = {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}
        hgmma, hmma = counts.get(name, (0, 0)) if sass else (None, None)
        found[name] = Resources(fields["REG"], fields["STACK"], fields["LOCAL"], fields["SHARED"], hgmma, hmma)
    return found


# ----------------------------------------------------------------------------- Triton kernels


@dataclass
class VariantResult:
    kernel: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    tensor_cores: bool = False
    """Whether this variant must issue tensor-core instructions."""
    error: str | None = None
    registers: int | None = None
    stack: int | None = None
    local: int | None = None
    shared: int | None = None
    """Shared memory per block: Triton's dynamic allocation plus static, less the reserved 1 KiB."""
    hgmma: int | None = None
    hmma: int | None = None
    problems: list[str] = field(default_factory=list)


def _label(variant: Variant) -> str:
    if variant.label:
        return variant.label
    return " ".join(f"{k}={v}" for k, v in variant.constexprs.items())


def _source(kernel, variant: Variant):
    """The ASTSource the Triton runtime would build when launching ``variant``.

    Signature and constexprs keyed as in Triton >= 3.3 (every argument in the signature,
    constexprs as ``"constexpr"``; constexpr values and attributes keyed by argument-index
    paths), which is the API of both Triton 3.6 and 3.9. Pointers, and the integers the
    variant names in ``divisible_by_16``, carry the 16-divisibility attribute Triton's
    launcher gives them.
    """
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = kernel
    while not isinstance(jit, JITFunction) and hasattr(jit, "fn"):
        jit = jit.fn
    if not isinstance(jit, JITFunction):
        raise TypeError(
            f"{type(kernel).__name__} is not a compilable JITFunction (decorated under TRITON_INTERPRET=1?)"
        )
    names = list(jit.arg_names)
    declared = set(variant.signature) | set(variant.constexprs)
    if set(variant.signature) & set(variant.constexprs):
        both = sorted(set(variant.signature) & set(variant.constexprs))
        raise ValueError(f"declared both as runtime and constexpr: {both}")
    if declared != set(names):
        raise ValueError(
            f"variant must declare exactly the kernel's arguments: missing {sorted(set(names) - declared)}, "
            f"unknown {sorted(declared - set(names))}"
        )
    signature = {n: "constexpr" if n in variant.constexprs else variant.signature[n] for n in names}
    constexprs = {(i,): variant.constexprs[n] for i, n in enumerate(names) if n in variant.constexprs}
    unknown = set(variant.divisible_by_16) - {n for n in names if signature[n][0] in "iu"}
    if unknown:
        raise ValueError(f"divisible_by_16 names non-integer arguments: {sorted(unknown)}")
    aligned = {n for n in names if signature[n].startswith("*")} | set(variant.divisible_by_16)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    return ASTSource(jit, signature, constexprs, attrs)


def compile_variant(spec: KernelSpec, variant: Variant, arch: int) -> VariantResult:
    """Compile one variant for ``sm_<arch>`` and read its resources; never raises."""
    import triton
    from triton.backends.compiler import GPUTarget

    tensor_cores = spec.tensor_cores if variant.tensor_cores is None else variant.tensor_cores
    result = VariantResult(spec.name, _label(variant), arch, variant.num_warps, variant.num_stages, tensor_cores)
    try:
        compiled = triton.compile(
            _source(spec.kernel, variant),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": variant.num_warps, "num_stages": variant.num_stages},
        )
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            (res,) = inspect_binary(cubin, sass=tensor_cores).values()
    except Exception as exc:  # the gate reports every failure instead of stopping at the first
        result.error = f"{type(exc).__name__}: {exc}".strip()
        result.problems.append(f"does not compile: {_first_lines(result.error)}")
        return result
    result.registers, result.stack, result.local = res.registers, res.stack, res.local
    result.shared = compiled.metadata.shared + max(0, res.static_shared - RESERVED_SMEM)
    result.hgmma, result.hmma = res.hgmma, res.hmma
    result.problems = _resource_problems(result, arch, spec.spills_allowed, tensor_cores)
    return result


def _first_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[:count]) + (" | ..." if len(lines) > count else "")


def _resource_problems(res, arch: int, spills_allowed: str | None, tensor_cores: bool) -> list[str]:
    problems = []
    if (res.local or res.stack) and not spills_allowed:
        problems.append(
            f"spills: {res.local} B local memory and {res.stack} B stack per thread "
            "(shrink the tile or raise num_warps; if intended, register it with spills_allowed='why')"
        )
    if res.shared > SMEM_LIMIT[arch]:
        problems.append(f"shared memory {res.shared} B exceeds the {SMEM_LIMIT[arch]} B a block may use on sm_{arch}")
    if tensor_cores and arch >= 90 and not res.hgmma:
        problems.append(f"tensor_cores=True but the sm_{arch}a SASS has no HGMMA ({res.hmma} HMMA)")
    if tensor_cores and arch < 90 and not res.hmma:
        problems.append(f"tensor_cores=True but the sm_{arch} SASS has no HMMA")
    return problems


# ----------------------------------------------------------------------------- CUDA sources


@dataclass
class CudaKernelResult:
    name: str
    registers: int
    stack: int
    local: int
    shared: int
    """Static shared memory, less the reserved 1 KiB (dynamic shared memory is set at launch)."""
    hgmma: int
    hmma: int
    problems: list[str] = field(default_factory=list)


@dataclass
class CudaSourceResult:
    source: str
    arch: int
    error: str | None = None
    kernels: list[CudaKernelResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_cuda_sources() -> list[Path]:
    from fastlm.extension import source_dir

    return sorted(source_dir().rglob("*.cu"))


def _nvcc_flags(shim_dir: str) -> tuple[str, ...]:
    """The flags ``torch.utils.cpp_extension`` gives a CUDA extension, minus the arch flags.

    No host ``-O``: device code is optimized regardless (ptxas defaults to -O3), and
    optimizing the host side of torch's headers would only slow the gate down.
    """
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    from fastlm.extension import source_dir

    includes = [*include_paths(), sysconfig.get_paths()["include"], str(source_dir()), shim_dir]
    return (
        "-std=c++17", "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS,
        "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=fastlm_cuda",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in includes),
    )


def _make_shim_dir(root: Path) -> Path:
    """Headers that torch's CPU wheel leaves out but its CUDA headers include.

    ``c10/cuda/CUDAStream.h`` (and so ``CUDAGuard.h``) includes the build-generated
    ``c10/cuda/impl/cuda_cmake_macros.h``, which only the CUDA wheels ship; without it no
    source that uses torch's CUDA stream can compile on a CPU-only machine. An empty file
    stands in only when torch lacks it.
    """
    from torch.utils.cpp_extension import include_paths

    shim = root / "shim"
    relative = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if not any((Path(path) / relative).is_file() for path in include_paths()):
        (shim / relative).parent.mkdir(parents=True, exist_ok=True)
        (shim / relative).write_text("#pragma once\n")
    shim.mkdir(exist_ok=True)
    return shim


def compile_cuda_source(path: Path, arch: int) -> CudaSourceResult:
    """nvcc one ``.cu`` for ``sm_<arch>`` (``sm_90a`` for Hopper) and read every kernel's resources."""
    from fastlm.extension import source_dir

    root = source_dir().parent
    result = CudaSourceResult(str(path.relative_to(root) if path.is_relative_to(root) else path), arch)
    nvcc = Path(_cuda_home()) / "bin" / "nvcc"
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "source.o"
        command = [str(nvcc), NVCC_GENCODE[arch], "-c", str(path), "-o", str(obj),
                   *_nvcc_flags(str(_make_shim_dir(Path(tmp))))]
        try:
            proc = subprocess.run(command, capture_output=True, text=True)
        except OSError as exc:
            proc = None
            result.error = f"cannot run nvcc ({nvcc}; set CUDA_HOME): {exc}"
        if proc is not None and proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()
            result.error = "\n".join(errors[:20])
        if result.error:
            result.problems.append(f"does not compile: {_first_lines(result.error)}")
            return result
        resources = inspect_binary(obj)
    demangled = _demangle(list(resources))
    for mangled, res in resources.items():
        kernel = CudaKernelResult(
            demangled[mangled], res.registers, res.stack, res.local,
            max(0, res.static_shared - RESERVED_SMEM), res.hgmma, res.hmma,
        )
        kernel.problems = _resource_problems(kernel, arch, spills_allowed=None, tensor_cores=False)
        result.kernels.append(kernel)
    return result


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {name: name for name in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


# ----------------------------------------------------------------------------- running the gate


_WORKER_VARIANTS: dict[str, list[Variant]] = {}


def _variants(spec: KernelSpec) -> list[Variant]:
    if spec.name not in _WORKER_VARIANTS:
        _WORKER_VARIANTS[spec.name] = list(spec.variants())
    return _WORKER_VARIANTS[spec.name]


def _init_worker(extra_modules: tuple[str, ...]) -> None:
    # Triton 3.9 warns once per process that its fp-fusion default will change; the gate
    # compiles with the same default as a launch, so the warning is noise here.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    import_package_modules(extra_modules)


def _triton_task(name: str, index: int, arch: int) -> VariantResult:
    spec = REGISTRY[name]
    return compile_variant(spec, _variants(spec)[index], arch)


def run_gate(archs: tuple[int, ...], extra_modules: tuple[str, ...] = (), only: str | None = None,
             cuda_sources: bool = True, jobs: int = 1) -> tuple[dict, float]:
    """Compile everything; return the report (its ``failures`` empty when the gate passes) and the seconds taken."""
    import triton

    modules = import_package_modules(extra_modules)
    failures = [f"{name}: @triton.jit function not registered with fastlm.kernel_registry.register_kernel "
                "(and not called by a registered kernel)" for name in find_unregistered(modules)]
    specs = [REGISTRY[name] for name in _selected(only)]
    tasks = []
    for spec in specs:
        count = len(_variants(spec))
        if count == 0:
            failures.append(f"{spec.name}: registered with no variants")
        if spec.spills_allowed is not None and not spec.spills_allowed.strip():
            failures.append(f"{spec.name}: spills_allowed must say why spills are acceptable")
        tasks += [(_triton_task, (spec.name, i, arch)) for i in range(count) for arch in archs]
    sources = find_cuda_sources() if cuda_sources else []
    # nvcc runs are the longest, so they start first.
    tasks = [(compile_cuda_source, (path, arch)) for path in sources for arch in archs] + tasks
    # A gate that compiled nothing checked nothing: it fails rather than pass.
    if only is not None and not specs:
        failures.append(f"--only {only!r} matches no registered kernel")
    if not tasks:
        failures.append("nothing to compile: no Triton kernel variant and no CUDA source was selected")

    started = time.perf_counter()
    if jobs <= 1:
        _init_worker(extra_modules)
        results = [fn(*args) for fn, args in tasks]
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
        with concurrent.futures.ProcessPoolExecutor(jobs, context, _init_worker, (extra_modules,)) as pool:
            results = list(pool.map(_call, tasks))
    elapsed = time.perf_counter() - started

    kernels = [r for r in results if isinstance(r, VariantResult)]
    cuda = [r for r in results if isinstance(r, CudaSourceResult)]
    for r in kernels:
        failures += [f"{r.kernel} [{r.label}] sm_{r.arch}: {p}" for p in r.problems]
    for r in cuda:
        failures += [f"{r.source} sm_{r.arch}: {p}" for p in r.problems]
        failures += [f"{r.source} {k.name} sm_{r.arch}: {p}" for k in r.kernels for p in k.problems]
    return {
        "triton_version": triton.__version__,
        "ptxas": {f"sm_{a}": _version_line(_ptxas(a)) for a in archs},
        "nvcc": _version_line(str(Path(_cuda_home()) / "bin" / "nvcc")) if sources else None,
        "archs": list(archs),
        "smem_limit": {f"sm_{a}": SMEM_LIMIT[a] for a in archs},
        "kernels": [
            {
                "name": spec.name,
                "tensor_cores": spec.tensor_cores,
                "spills_allowed": spec.spills_allowed,
                "variants": [asdict(r) for r in kernels if r.kernel == spec.name],
            }
            for spec in specs
        ],
        "cuda_sources": [asdict(r) for r in cuda],
        "failures": failures,
    }, elapsed


def _call(task):
    fn, args = task
    return fn(*args)


def _version_line(tool: str) -> str | None:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release [\d.]+, V[\d.]+", out)
    return match.group(0) if match else out.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- reports


def _summary_rows(report: dict) -> list[list[str]]:
    rows = []
    for k in report["kernels"]:
        ok = [v for v in k["variants"] if v["error"] is None]
        bad = sum(bool(v["problems"]) for v in k["variants"])
        hgmma = [v["hgmma"] for v in ok if v["arch"] >= 90 and v["tensor_cores"]]
        rows.append([
            f"`{k['name']}`", str(len(k["variants"])),
            str(max((v["registers"] for v in ok), default="-")),
            str(max((v["local"] + v["stack"] for v in ok), default="-")),
            str(max((v["shared"] for v in ok), default="-")),
            "no" if not k["tensor_cores"] else f"yes (min HGMMA {min(hgmma)})" if hgmma else "yes",
            "FAIL" if bad else "ok",
        ])
    return rows


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def render_markdown(report: dict, command: str) -> str:
    status = "FAIL" if report["failures"] else "PASS"
    archs = ", ".join(f"sm_{a}{'a' if a >= 90 else ''}" for a in report["archs"])
    count = sum(len(k["variants"]) for k in report["kernels"])
    lines = [
        "# GPU compile report",
        "",
        f"Generated by `{command}` (Triton {report['triton_version']}, ptxas "
        + ", ".join(f"{v} for {k}" for k, v in report["ptxas"].items())
        + (f", nvcc {report['nvcc']}" if report["nvcc"] else "") + f"), for {archs}, without a GPU.",
        "",
        f"**{status}**: {len(report['kernels'])} Triton kernels, {count} compiled variants, "
        f"{len(report['cuda_sources'])} CUDA source builds, {len(report['failures'])} failures.",
        "",
        "Per thread: `regs` registers, `spill` local-memory + stack bytes (register spills; the gate fails on any "
        "unless the kernel says why). Per block: `smem` shared-memory bytes (Triton's dynamic allocation + static, "
        "less the 1 KiB the driver reserves), limit "
        + ", ".join(f"{v} B on {k}" for k, v in report["smem_limit"].items())
        + ". `HGMMA`/`HMMA`: Hopper warpgroup / warp-level tensor-core instructions in the SASS "
        "(counted for kernels declared `tensor_cores=True` and CUDA sources).",
        "",
        "## Summary",
        "",
        *_table(["kernel", "variants", "max regs", "max spill", "max smem", "tensor cores", "status"],
                _summary_rows(report)),
        "",
        "## Triton kernel variants",
        "",
    ]
    rows = []
    for k in report["kernels"]:
        for v in k["variants"]:
            arch = f"sm_{v['arch']}"
            if v["error"] is not None:
                rows.append([f"`{k['name'].rsplit('.', 1)[-1]}`", v["label"], arch, str(v["num_warps"]),
                             str(v["num_stages"]), "-", "-", "-", "-", "-", "does not compile"])
                continue
            rows.append([
                f"`{k['name'].rsplit('.', 1)[-1]}`", v["label"], arch, str(v["num_warps"]), str(v["num_stages"]),
                str(v["registers"]), str(v["local"] + v["stack"]), str(v["shared"]),
                _count(v["hgmma"]), _count(v["hmma"]), "FAIL" if v["problems"] else "ok",
            ])
    lines += _table(["kernel", "variant", "arch", "warps", "stages", "regs", "spill", "smem", "HGMMA", "HMMA",
                     "status"], rows)
    lines += ["", "## CUDA sources (`csrc/**/*.cu`, nvcc)", ""]
    if report["cuda_sources"]:
        rows = []
        for s in report["cuda_sources"]:
            if s["error"] is not None:
                rows.append([f"`{s['source']}`", "-", f"sm_{s['arch']}", "-", "-", "-", "-", "does not compile"])
            for k in s["kernels"]:
                rows.append([f"`{s['source']}`", f"`{k['name']}`", f"sm_{s['arch']}", str(k["registers"]),
                             str(k["local"] + k["stack"]), str(k["shared"]), str(k["hgmma"]),
                             "FAIL" if k["problems"] else "ok"])
        lines += _table(["source", "kernel", "arch", "regs", "spill", "static smem", "HGMMA", "status"], rows)
    else:
        lines.append("None.")
    lines += ["", "## Failures", ""]
    lines += [f"- {f}" for f in report["failures"]] or ["None."]
    return "\n".join(lines) + "\n"


def _without_jobs(args: list[str]) -> list[str]:
    """The command-line arguments less ``--jobs N`` / ``--jobs=N``, which change nothing in the report."""
    kept, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg == "--jobs":
            skip_value = True
        elif not arg.startswith("--jobs="):
            kept.append(arg)
    return kept


def _selected(only: str | None) -> list[str]:
    """The registered kernels ``--only`` selects (all when it is None)."""
    return [name for name in sorted(REGISTRY) if only is None or only in name]


def _check_writable(path: Path) -> str | None:
    """Why a report cannot be written at ``path`` (None when it can), found before compiling.

    Folders it needs are created (as the report's writing would) and a probe file written and
    removed; folders created here are removed again when the path turns out unwritable.
    """
    if path.is_dir():
        return "is a folder"
    missing = [parent for parent in [path.parent, *path.parent.parents] if not parent.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            return "the file is not writable"
    except OSError as exc:
        for parent in missing:  # deepest first
            try:
                parent.rmdir()
            except OSError:
                pass
        return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastlm.tools.gpu_compile_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the full report as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the markdown report here")
    parser.add_argument("--no-cuda-sources", action="store_true", help="skip nvcc on csrc/**/*.cu")
    parser.add_argument("--sm80", action="store_true", help="also compile for sm_80 (A100)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel compiles")
    parser.add_argument("--module", action="append", default=[], help="also import this module (its kernels register)")
    parser.add_argument("--only", help="compile only registered kernels whose name contains this")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")

    if os.environ.get("TRITON_INTERPRET", "0").lower() not in _FALSE:
        raise RuntimeError("TRITON_INTERPRET is on: kernels were decorated for the interpreter and cannot compile; "
                           "run `python -m fastlm.tools.gpu_compile_check` without it")
    # Everything a run would stop on is checked before compiling: a gate that checked nothing must not pass.
    import_package_modules()
    for module in args.module:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any failure: the module's kernels would go unchecked
            parser.error(f"--module {module}: cannot import it ({type(exc).__name__}: {exc})")
    if args.only is not None and not _selected(args.only):
        parser.error(f"--only {args.only!r} matches no registered kernel (names are like "
                     f"{next(iter(sorted(REGISTRY)), 'fastlm.ops.norm._norm_fwd_kernel')})")
    for option, path in (("--json", args.json), ("--markdown", args.markdown)):
        if path is not None and (why := _check_writable(path)):
            parser.error(f"{option} {path}: cannot write the report there ({why})")
    archs = (90, 80) if args.sm80 else (90,)
    report, elapsed = run_gate(archs, tuple(args.module), args.only, not args.no_cuda_sources, args.jobs)
    command = "python -m fastlm.tools.gpu_compile_check" + "".join(
        f" {a}" for a in _without_jobs(argv if argv is not None else sys.argv[1:])
    )
    markdown = render_markdown(report, command)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    print("\n".join(_table(["kernel", "variants", "max regs", "max spill", "max smem", "tensor cores", "status"],
                           _summary_rows(report))))
    print(f"{sum(len(k['variants']) for k in report['kernels'])} variants, "
          f"{len(report['cuda_sources'])} CUDA builds in {elapsed:.0f} s")
    if report["failures"]:
        print(f"\nGPU compile gate FAILED ({len(report['failures'])}):", file=sys.stderr)
        for failure in report["failures"]:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print("GPU compile gate passed.")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in _FALSE:
        # Kernels imported with the interpreter on cannot be compiled: start over without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastlm.tools.gpu_compile_check", *sys.argv[1:]], env)
    # Run the imported module's main, so worker processes can unpickle its functions by name.
    from fastlm.tools import gpu_compile_check

    sys.exit(gpu_compile_check.main())
