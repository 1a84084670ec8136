"""Every GPU kernel in fastlm declares itself here, so the compile gate can find it.

Triton's interpreter accepts code the real compiler rejects, and most of our machines
have no GPU, so ``python -m fastlm.tools.gpu_compile_check`` compiles every declared
kernel variant for Hopper (sm_90a) without a GPU and checks registers, spills, shared
memory and tensor-core use. A test asserts that every ``@triton.jit`` function in the
package is declared, so no kernel can skip the gate.

Declare right after the kernel, with the variants its launcher can actually choose
(derive them from the launcher's own config function so they cannot drift)::

    register_kernel(_norm_fwd_kernel, variants=_norm_fwd_variants)
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """One compiled specialization of a Triton kernel."""

    signature: dict[str, str]
    """Runtime arguments -> Triton type: ``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"*i32"``, ``"i32"``, ``"i64"``, ``"fp32"``."""
    constexprs: dict[str, object] = field(default_factory=dict)
    """Compile-time arguments -> value (``tl.constexpr`` parameters, and pointers passed as None)."""
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    """Short readable name for the report, e.g. ``"bf16 n=4096"``."""
    divisible_by_16: tuple[str, ...] = ()
    """Integer arguments that are multiples of 16 in this variant. Triton specializes a launch
    on it (vectorized loads, aligned wgmma tiles), so a width or stride that can be either way
    is worth a variant each. Pointer arguments are always taken as 16-byte aligned, as they
    are for tensors from PyTorch's allocator."""
    tensor_cores: bool | None = None
    """Overrides the kernel's ``tensor_cores`` for this variant: e.g. False for an fp32 variant
    whose dots are exact IEEE fp32 and so never use tensor cores."""


@dataclass(frozen=True)
class KernelSpec:
    kernel: object
    variants: Callable[[], Iterable[Variant]]
    tensor_cores: bool = False
    """True for matmul-bound kernels: their Hopper build must issue wgmma (HGMMA)."""
    spills_allowed: str | None = None
    """Why register spills are acceptable for this kernel; None means spills fail the gate."""

    @property
    def name(self) -> str:
        fn = self.kernel
        while hasattr(fn, "fn"):  # JITFunction, InterpretedFunction, Autotuner, Heuristics
            fn = fn.fn
        return f"{fn.__module__}.{fn.__name__}"


REGISTRY: dict[str, KernelSpec] = {}


def register_kernel(
    kernel, variants: Callable[[], Iterable[Variant]], *, tensor_cores: bool = False, spills_allowed: str | None = None
) -> None:
    """Declare a ``@triton.jit`` kernel and the variants its launcher can choose (evaluated lazily)."""
    spec = KernelSpec(kernel, variants, tensor_cores, spills_allowed)
    REGISTRY[spec.name] = spec
