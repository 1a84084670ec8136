"""The 8-bit codes of the block-wise optimizers, and the tables the kernels search them with.

The dynamic (tree) code of Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022): a value in [-1, 1] is ``sign * 10^-e * f``, the exponent ``e`` in 0..6 picked by
the first set bit of the code after the sign, the remaining bits a linear fraction ``f`` in
[0.1, 1]. More bits go to the fraction the larger the value, so the code is dense near 1
and still reaches 1e-7. The signed code (first moment) spends one bit on the sign; the
unsigned code (second moment, never negative) gives it to the fraction. Both contain 0 and 1.

The tables are generated here once (float64, rounded to fp32) and handed to every backend as
tensors, so the C++, CUDA and PyTorch paths quantize with the same numbers:

* ``code``: the 256 values, sorted;
* ``mid``: the 255 midpoints between neighbours, padded with +inf to ``MID_PADDED``; a value
  quantizes to ``#(mid < x)``, the index of its nearest code value (ties to the lower);
* ``lut``: for the CPU kernel, per bucket of fp32 values sharing their top 16 bits,
  ``#(mid < the bucket's smallest value) << 16 | t``, ``t`` locating the bucket's one midpoint
  by its low 16 bits, so ``quantize_lut`` (csrc/common/optim8bit_rule.h) counts with one load
  and one compare.

The constants mirror the header's; ``lookup_table`` checks the premises for each code.
"""

import functools

import numpy as np
import torch

CODE_SIZE = 256
MID_PADDED = CODE_SIZE
LUT_KEY_LO = (127 - 26) << 7  # top 16 bits of 2^-26
LUT_KEY_HI = 127 << 7  # top 16 bits of 1.0
LUT_KEYS = LUT_KEY_HI - LUT_KEY_LO + 1
LUT_LOW_MASK = 0xFFFF  # no midpoint in the bucket: no low half exceeds it
_EXPONENTS = 7  # decades 1e-6 .. 1e0


def dynamic_code(signed: bool) -> np.ndarray:
    """The 256 sorted values of the dynamic 8-bit code, as float32."""
    values = [0.0, 1.0]
    for i in range(_EXPONENTS):
        # Decade 10^(i-6) gets 2^i fraction steps (signed) or 2^(i+1) (unsigned): the
        # leading zeros before the indicator bit pick the decade, the rest is the fraction.
        steps = 2 ** i if signed else 2 ** (i + 1)
        edges = np.linspace(0.1, 1.0, steps + 1, dtype=np.float64)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - (_EXPONENTS - 1))
        values.extend(means.tolist())
        if signed:
            values.extend((-means).tolist())
    code = np.array(sorted(values), dtype=np.float64).astype(np.float32)
    assert code.size == CODE_SIZE and np.all(np.diff(code) > 0), "the code must be 256 distinct sorted values"
    return code


def _bucket_bounds(negative: bool) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest fp32 value of every quantize_lut bucket of one sign."""
    keys = np.arange(LUT_KEY_LO, LUT_KEY_HI + 1, dtype=np.uint32)
    lo_mag = (keys << 16).view(np.float32).copy()
    hi_mag = ((keys << 16) | 0xFFFF).view(np.float32).copy()
    lo_mag[0] = 0.0  # the lowest bucket takes every smaller magnitude
    hi_mag[-1] = np.inf  # the highest takes every larger one
    if negative:
        return -hi_mag, -lo_mag
    return lo_mag, hi_mag


def lookup_table(mid: np.ndarray) -> np.ndarray:
    """``lut`` for the 255 fp32 midpoints ``mid``, positive buckets first: per bucket
    ``#(mid < bucket minimum) << 16 | t``, where ``t`` is the low 16 bits of the one midpoint
    inside the bucket (inverted in a negative bucket, where larger bits mean smaller values) or
    ``LUT_LOW_MASK`` when there is none. ``quantize_lut`` adds 1 when x's low 16 bits, inverted
    alike, exceed ``t``: inside a bucket only the low 16 bits differ, so that is ``mid < x``."""
    mid_bits = mid.view(np.uint32)
    parts = []
    for negative in (False, True):
        smallest, largest = _bucket_bounds(negative)
        below_lo = np.searchsorted(mid, smallest, side="left")
        inside = np.searchsorted(mid, largest, side="right") - below_lo
        assert inside.max() <= 1, "a bucket holds more than one midpoint: quantize_lut needs more compares"
        # The clamped end buckets also take magnitudes outside their top-16-bit range, whose low
        # bits say nothing: they must hold no midpoint.
        assert inside[0] == 0 and inside[-1] == 0, "a midpoint lies in a clamped bucket"
        low = np.full(LUT_KEYS, LUT_LOW_MASK, dtype=np.int64)
        has = inside == 1
        low[has] = mid_bits[below_lo[has]] & LUT_LOW_MASK
        if negative:
            low[has] ^= LUT_LOW_MASK
        parts.append((below_lo.astype(np.int64) << 16) | low)
    return np.concatenate(parts).astype(np.int32)


@functools.cache
def _tables_cpu(signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    code = dynamic_code(signed)
    mid = ((code[:-1].astype(np.float64) + code[1:]) / 2).astype(np.float32)
    padded = np.concatenate([mid, np.full(MID_PADDED - mid.size, np.inf, dtype=np.float32)])
    values = torch.from_numpy(np.concatenate([code, padded]))
    return values, torch.from_numpy(lookup_table(mid))


@functools.cache
def tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, lut)`` on ``device``: ``values[:256]`` is the code, ``values[256:]`` the padded
    midpoints (fp32); ``lut`` the int32 bucket table. Built once per code and device."""
    values, lut = _tables_cpu(signed)
    return values.to(device), lut.to(device)
