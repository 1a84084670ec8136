"""The 8-bit optimizers' update rule in plain PyTorch: the torch backend and the tests' reference.

It performs the operations of csrc/common/optim8bit_rule.h in the same order, each rounded
to fp32 once, and quantizes with the same tables (``fastlm.optim._code``), so the C++ and
CUDA kernels match it bit for bit. Two habits keep it exact: every scalar is rounded to fp32
once (``Hyper``), nothing is divided by a scalar or a broadcast value (PyTorch may turn
that into a multiplication by the reciprocal, which rounds differently) and per-block values
are materialized per element, and square roots are taken in float64 (``_sqrt_rn``).

State layout (the same on every device, so a state_dict moves between them): a parameter
of n elements, flattened, in blocks of ``block_size``; per moment a uint8 tensor of n codes
and an fp32 tensor of ceil(n / block_size) block absmax values.
"""

import math
from dataclasses import astuple, dataclass

import numpy as np
import torch

from fastlm.optim import _code

ADAMW, ADAM, LION = 0, 1, 2
KIND_NAMES = {ADAMW: "AdamW", ADAM: "Adam", LION: "Lion"}
_MASK32 = 0xFFFFFFFF


def f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (still a Python float)."""
    return float(np.float32(x))


@dataclass(frozen=True)
class Hyper:
    """Every scalar of one step, rounded to fp32; the field order is the header's ``Hyper``."""

    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    step_size: float
    inv_bias_correction2_sqrt: float
    decay: float
    l2: float

    def as_list(self) -> list[float]:
        return list(astuple(self))


def make_hyper(kind: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> Hyper:
    """The step-``step`` scalars (step counts from 1), computed in float64 then rounded once."""
    if kind == LION:
        return Hyper(*map(f32, (beta1, 1 - beta1, beta2, 1 - beta2, eps, lr, 1.0, 1 - lr * weight_decay, 0.0)))
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    decay, l2 = (1 - lr * weight_decay, 0.0) if kind == ADAMW else (1.0, weight_decay)
    return Hyper(*map(f32, (
        beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / bias_correction1, 1 / math.sqrt(bias_correction2), decay, l2,
    )))


# ---- per-element rule on fp32 tensors (same operations, same order as the header) -----------
def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    # PyTorch's vectorized fp32 sqrt on CPU is not always correctly rounded; the float64 square
    # root rounded to fp32 is (53 >= 2 * 24 + 2 bits makes the double rounding innocuous).
    return x.double().sqrt().float()


def adam_update(g, p, m, v, h: Hyper, coupled_l2: bool):
    """New (p, m, v) of Adam/AdamW; with ``coupled_l2`` (Adam) ``h.l2 * p`` joins the gradient."""
    if coupled_l2:
        g = g + p * h.l2
    m = m * h.beta1 + g * h.one_minus_beta1
    v = v * h.beta2 + (g * h.one_minus_beta2) * g
    denom = _sqrt_rn(v) * h.inv_bias_correction2_sqrt + h.eps
    p = p * h.decay - (m * h.step_size) / denom
    return p, m, v


def lion_update(g, p, m, h: Hyper):
    """New (p, m) of Lion."""
    c = m * h.beta1 + g * h.one_minus_beta1
    sign = torch.where(c > 0, 1.0, torch.where(c < 0, -1.0, 0.0)).to(torch.float32)
    p = p * h.decay - sign * h.step_size
    m = m * h.beta2 + g * h.one_minus_beta2
    return p, m


# ---- bf16 rounding ---------------------------------------------------------------------------
def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding uint32 values; products wrap mod 2^64, whose low 32 bits are exact.
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def rng_key(seed: int, step: int) -> int:
    return _fmix32_int((seed & _MASK32) ^ _fmix32_int((step + 0x9E3779B9) & _MASK32))


def rng_bits(key: int, index: torch.Tensor) -> torch.Tensor:
    """The header's ``rng_bits``: 32 random bits (in int64) per element index."""
    folded = (index & _MASK32) ^ _fmix32(index >> 32)
    return _fmix32((folded * 0x9E3779B1 + key) & _MASK32)


def round_to_bf16_stochastic(x: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """fp32 -> bf16 with stochastic rounding, keyed by (seed, step, flat index of x)."""
    flat = x.reshape(-1)
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32
    noise = rng_bits(rng_key(seed, step), torch.arange(flat.numel(), dtype=torch.int64, device=x.device))
    rounded = ((bits + (noise & 0xFFFF)) >> 16).to(torch.int32).to(torch.int16).view(torch.bfloat16)
    # Non-finite values round to nearest, as the header does.
    rounded = torch.where(torch.isfinite(flat), rounded, flat.to(torch.bfloat16))
    return rounded.view(x.shape)


def store_param(param: torch.Tensor, p: torch.Tensor, stochastic: bool, seed: int, step: int) -> None:
    """Write the fp32 result ``p`` into ``param`` (nearest, or stochastic rounding for bf16)."""
    if stochastic and param.dtype == torch.bfloat16:
        param.copy_(round_to_bf16_stochastic(p, seed, step).view(param.shape))
    else:
        param.copy_(p.view(param.shape))


# ---- quantization ----------------------------------------------------------------------------
def quantize(x: torch.Tensor, table: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 index of (about) the nearest code value to normalized ``x``: the header's closed
    form (fastlm/optim/_code.py), the same fp32 operations."""
    bits = x.contiguous().view(torch.int32)
    # The unsigned code's input is never negative: its sign bit is not masked (a negative int32
    # clamps to the lowest octave, segment 0), as in the header.
    magnitude = (bits & 0x7FFFFFFF) if signed else bits
    magnitude = magnitude.clamp(_code.MAG_LO_BITS, _code.MAG_HI_BITS)
    slot = ((magnitude >> 23) & 31).long()
    xa = magnitude.view(torch.float32)
    above = xa > table[_code.TABLE_THRESHOLD:_code.TABLE_SEGMENT][slot]
    segment = table[_code.TABLE_SEGMENT:_code.TABLE_SCALE].long()[slot] + above.long()
    y = xa * table[_code.TABLE_SCALE:_code.TABLE_OFFSET][segment] + table[_code.TABLE_OFFSET:_code.TABLE_TOP][segment]
    k = torch.minimum(y, table[_code.TABLE_TOP:_code.TABLE_SIZE][segment]).to(torch.int32)  # y >= 0: truncation
    if signed:
        k = torch.where(bits < 0, (254 - k).clamp_min(0), k)
    return k.to(torch.uint8)


def dequantize(q: torch.Tensor, table: torch.Tensor, absmax: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 values of flat codes ``q`` with one absmax per block."""
    return table[q.long()] * _per_element(absmax, block_size, q.numel())


def _per_element(per_block: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    # Materialized (not broadcast), so each element's product is one plain fp32 multiplication.
    return per_block.repeat_interleave(block_size)[:n]


def _block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n = x.numel()
    blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(x.abs(), (0, blocks * block_size - n))
    return padded.view(blocks, block_size).amax(dim=1)


def requantize(x: torch.Tensor, table: torch.Tensor, signed: bool,
               block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, absmax) of flat fp32 ``x``: per block, x * (1 / absmax) quantized (all-zero
    blocks: scale 1). One division per block, then multiplications, as the kernels do."""
    absmax = _block_absmax(x, block_size)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    inverse = torch.ones_like(scale) / scale
    return quantize(x * _per_element(inverse, block_size, x.numel()), table, signed), absmax


# ---- one optimizer step over one parameter -----------------------------------------------------
def step_8bit(kind, param, grad, state1, absmax1, state2, absmax2, tables1, tables2, block_size, hyper,
              seed, step, stochastic_rounding):
    """Update ``param`` and its 8-bit states in place (the torch backend of ``optim8bit_step``)."""
    g = grad.reshape(-1).float()
    p = param.reshape(-1).float()
    m = dequantize(state1, tables1, absmax1, block_size)
    if kind == LION:
        p, m = lion_update(g, p, m, hyper)
    else:
        v = dequantize(state2, tables2, absmax2, block_size)
        p, m, v = adam_update(g, p, m, v, hyper, kind == ADAM)
        q2, a2 = requantize(v, tables2, False, block_size)
        state2.copy_(q2)
        absmax2.copy_(a2)
    q1, a1 = requantize(m, tables1, True, block_size)
    state1.copy_(q1)
    absmax1.copy_(a1)
    store_param(param, p, stochastic_rounding, seed, step)


def step_fp32(kind, param, grad, exp_avg, exp_avg_sq, hyper, seed, step, stochastic_rounding):
    """The same rule with fp32 states (small tensors): updates param, exp_avg, exp_avg_sq in place."""
    g = grad.reshape(-1).float()
    p = param.reshape(-1).float()
    m = exp_avg.view(-1)
    if kind == LION:
        p, m_new = lion_update(g, p, m, hyper)
    else:
        p, m_new, v_new = adam_update(g, p, m, exp_avg_sq.view(-1), hyper, kind == ADAM)
        exp_avg_sq.view(-1).copy_(v_new)
    m.copy_(m_new)
    store_param(param, p, stochastic_rounding, seed, step)
