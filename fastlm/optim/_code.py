"""The 8-bit codes of the block-wise optimizers, and the tables the kernels quantize with.

The dynamic (tree) code of Dettmers et al., "8-bit Optimizers via Block-wise Quantization"
(ICLR 2022): a value in [-1, 1] is ``sign * 10^-e * f``, the exponent ``e`` in 0..6 picked by
the first set bit of the code after the sign, the remaining bits a linear fraction ``f`` in
[0.1, 1]. More bits go to the fraction the larger the value, so the code is dense near 1
and still reaches 1e-7. The signed code (first moment) spends one bit on the sign; the
unsigned code (second moment, never negative) gives it to the fraction. Both contain 0 and 1;
the unsigned code's quantizer never picks its 0 (``quantize_table``: a second moment stored as
0 beside a nonzero first moment would make the step m / eps).

Quantizing (``quantize`` in csrc/common/optim8bit_rule.h, mirrored by
``fastlm.optim._rule.quantize``) is a closed form, not a search: the code is linear inside
each decade, so a magnitude's index there is ``trunc(|x| * scale + offset)``; which decade
(segment) applies comes from |x|'s binary exponent (a 32-entry table, since each octave
[2^k, 2^(k+1)) holds at most one boundary between segments) and one compare with that
boundary. The boundaries are the fp32 midpoints between neighbouring segments' values, and
inside a decade the midpoints between values are the linear grid's edges, so the result is
the nearest code value except within an fp32 rounding of a midpoint (``tests/optim`` checks
it). The CPU kernel evaluates it with in-register permutes on 16 lanes; the search it
replaces needed a 26 KB table gather, the costliest step of the CPU update.

One fp32 table per code, generated here once (float64, rounded to fp32) and handed to every
backend as a tensor, so the C++, CUDA and PyTorch paths use the same numbers (the offsets
below mirror the header's ``kTable*`` constants):

* ``[0, 256)``: the 256 code values, sorted;
* ``[256, 288)``: per octave (|x|'s biased exponent mod 32, clamped to [2^-24, 1]), the
  segment boundary inside it, +inf if none;
* ``[288, 320)``: per octave, the segment at its bottom (an integer);
* ``[320, 336)``, ``[336, 352)``, ``[352, 368)``: per segment (0: zero, 1-7: the decades,
  8: one), ``scale``, ``offset`` and ``top`` (the segment's last index) of the closed form.

Signed code: the closed form gives the index of |x| among the non-negative values (127..255);
a negative x takes the mirror index ``max(254 - k, 0)`` (there is no -1: the largest
magnitudes map to the most negative value).
"""

import functools

import numpy as np
import torch

CODE_SIZE = 256
TABLE_THRESHOLD = 256
TABLE_SEGMENT = 288
TABLE_SCALE = 320
TABLE_OFFSET = 336
TABLE_TOP = 352
TABLE_SIZE = 368
# |x| is clamped to [2^-24, 1] before the octave lookup: those 25 binary exponents (103..127)
# are distinct mod 32, and no code value but 0 lies below 2^-22.
MAG_LO_BITS = 0x33800000  # 2^-24
MAG_HI_BITS = 0x3F800000  # 1.0
_EXPONENTS = 7  # decades 1e-6 .. 1e0
_SEGMENTS = _EXPONENTS + 2  # zero, the decades, one


def _steps(signed: bool) -> list[int]:
    # Decade 10^(i-6) gets 2^i fraction steps (signed) or 2^(i+1) (unsigned): the leading zeros
    # before the indicator bit pick the decade, the rest is the fraction.
    return [2**i if signed else 2 ** (i + 1) for i in range(_EXPONENTS)]


def dynamic_code(signed: bool) -> np.ndarray:
    """The 256 sorted values of the dynamic 8-bit code, as float32."""
    values = [0.0, 1.0]
    for i, steps in enumerate(_steps(signed)):
        edges = np.linspace(0.1, 1.0, steps + 1, dtype=np.float64)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - (_EXPONENTS - 1))
        values.extend(means.tolist())
        if signed:
            values.extend((-means).tolist())
    code = np.array(sorted(values), dtype=np.float64).astype(np.float32)
    assert code.size == CODE_SIZE and np.all(np.diff(code) > 0), "the code must be 256 distinct sorted values"
    return code


def quantize_table(signed: bool) -> np.ndarray:
    """The fp32 table of one code (layout in the module docstring)."""
    code = dynamic_code(signed)
    zero = 127 if signed else 0  # index of 0.0; the closed form counts magnitudes from there
    assert code[zero] == 0.0 and code[-1] == 1.0
    starts = [zero + 1]  # first index of each decade, then of the value 1
    for steps in _steps(signed):
        starts.append(starts[-1] + steps)
    assert starts[-1] == CODE_SIZE - 1
    scale = np.zeros(16)
    offset = np.zeros(16)
    top = np.zeros(16)
    # Segment 0 ("zero": magnitudes below half the smallest positive value) maps to the index of 0,
    # except in the unsigned code (second moments): there it maps to the smallest positive value,
    # so a second moment is never stored as 0. A tiny second moment beside a block's large one
    # would otherwise dequantize to 0 while its first moment (another block scale) does not, and
    # the update m / (sqrt(0) + eps) would move the parameter by ~lr * m / eps (thousands of
    # times lr). Rounded up, such a v only shrinks its element's step; a v of exactly 0 goes with
    # m = 0 (no gradient yet), whose step stays 0.
    offset[0] = top[0] = zero if signed else 1
    for i, steps in enumerate(_steps(signed)):
        # Index = start + (|x| / 10^(i-6) - 0.1) / 0.9 * steps, truncated: the grid's edges are
        # the midpoints between the decade's values.
        decade = 10.0 ** (i - (_EXPONENTS - 1))
        scale[i + 1] = steps / (0.9 * decade)
        offset[i + 1] = starts[i] - 0.1 * steps / 0.9
        top[i + 1] = starts[i] + steps - 1
    offset[_SEGMENTS - 1] = top[_SEGMENTS - 1] = CODE_SIZE - 1
    # Segment s >= 1 starts above the fp32 midpoint between its first value and the one below.
    bounds = ((code[np.array(starts) - 1].astype(np.float64) + code[starts]) / 2).astype(np.float32)
    threshold = np.full(32, np.inf, dtype=np.float32)
    segment = np.zeros(32)
    for slot in range(32):
        exponent = slot + 96 if slot >= 7 else slot + 128  # slots 0-6: exponents >= 128 (clamped away)
        if exponent >= 127:
            segment[slot] = _SEGMENTS - 1
            continue
        lo, hi = np.float32(2.0 ** (exponent - 127)), np.float32(2.0 ** (exponent - 126))
        segment[slot] = np.sum(bounds < lo)
        inside = bounds[(bounds >= lo) & (bounds < hi)]
        assert inside.size <= 1, "an octave holds two segment boundaries: one compare is not enough"
        if inside.size:
            threshold[slot] = inside[0]
    table = np.concatenate([code, threshold, segment, scale, offset, top]).astype(np.float32)
    assert table.size == TABLE_SIZE
    return table


@functools.cache
def _table_cpu(signed: bool) -> torch.Tensor:
    return torch.from_numpy(quantize_table(signed))


@functools.cache
def tables(signed: bool, device: torch.device) -> torch.Tensor:
    """The fp32 table of the signed or unsigned code on ``device`` (``[:256]`` is the code);
    built once per code and device."""
    return _table_cpu(signed).to(device)
