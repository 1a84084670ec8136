"""Shared helpers for fastlm's numerical tests: one tolerance table and one comparison rule.

The rule (FlashAttention's): a kernel's error against a float64 reference may be at most
``factor`` times the error of plain PyTorch computing the same thing in the same dtype,
plus a floor of a few ulps of the result's scale. The floor is there because plain
PyTorch is sometimes exact (e.g. it computes in fp32 and the value rounds cleanly), and
one correctly rounded result may still sit half an ulp away from the float64 truth.
"""

from dataclasses import dataclass

import torch

from fastlm.alloc import poison_outputs

__all__ = ["Tolerance", "TOLERANCES", "assert_matches_reference", "poison_outputs", "random_tensor"]


@dataclass(frozen=True)
class Tolerance:
    forward_factor: float
    """Kernel output error may be this many times plain torch's error (FlashAttention uses 2)."""
    grad_factor: float
    """The same for gradients, which chain more roundings (FlashAttention's tests allow 3)."""
    floor_ulps: float
    """Error always allowed, in ulps of the dtype at the reference's largest magnitude."""


TOLERANCES = {
    # fp32: kernels and torch differ only in summation order; 4 ulps covers a reduction
    # over tens of thousands of terms whose partial sums round differently.
    torch.float32: Tolerance(forward_factor=2.0, grad_factor=3.0, floor_ulps=4.0),
    torch.float16: Tolerance(forward_factor=2.0, grad_factor=3.0, floor_ulps=1.0),
    torch.bfloat16: Tolerance(forward_factor=2.0, grad_factor=3.0, floor_ulps=1.0),
}


def assert_matches_reference(
    name: str,
    out: torch.Tensor,
    ref: torch.Tensor,
    baseline: torch.Tensor,
    dtype: torch.dtype,
    grad: bool = False,
    scale: float | None = None,
) -> None:
    """Assert ``max|out - ref| <= factor * max|baseline - ref| + floor``.

    ``ref`` is computed in float64; ``baseline`` is plain PyTorch in ``dtype``. The floor
    is measured at ``scale``, by default ``max|ref|``; pass the size of the terms when the
    result is a cancellation of much larger ones (its rounding error scales with them).
    """
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if out.numel() == 0:
        return
    out64, ref64, base64 = out.double(), ref.double(), baseline.double()
    if not torch.isfinite(out64).all():
        bad = (~torch.isfinite(out64)).sum().item()
        raise AssertionError(f"{name}: {bad} of {out.numel()} elements are not finite (unwritten or overflow)")
    tol = TOLERANCES[dtype]
    factor = tol.grad_factor if grad else tol.forward_factor
    scale = ref64.abs().max().item() if scale is None else scale
    floor = tol.floor_ulps * torch.finfo(dtype).eps * scale
    err = (out64 - ref64).abs().max().item()
    base_err = (base64 - ref64).abs().max().item()
    bound = factor * base_err + floor
    if not err <= bound:
        raise AssertionError(
            f"{name} ({dtype}): max error {err:.3e} > {factor} x torch's {base_err:.3e} + floor {floor:.3e} "
            f"(reference max |value| {scale:.3e})"
        )


def random_tensor(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0, offset=0.0):
    """Normal random values (never all zeros or ones), created in fp32 then cast."""
    t = torch.randn(*shape, dtype=torch.float32, device="cpu", generator=generator) * scale + offset
    return t.to(device=device, dtype=dtype)
