"""Transformer MLP blocks with fused activations and minimal saved-for-backward memory.

``SwiGLUMLP`` (Llama): ``down_proj(silu(gate) * up)`` where ``[gate | up] = gate_up_proj(x)``
is ONE matmul; the weight's rows ``[:hidden_dim]`` project to gate and ``[hidden_dim:]`` to up
(to load separate ``gate_proj`` / ``up_proj`` weights, concatenate them in that order).

``GELUMLP`` (GPT-2): ``down_proj(gelu(up_proj(x)))``.

Saved for backward, per token (besides the parameters, which are not copied):

* SwiGLUMLP: ``x`` (dim) and the pre-activation ``[gate | up]`` (2 * hidden_dim).
* GELUMLP: ``x`` (dim) and the pre-activation ``up_proj(x)`` (hidden_dim).

The activation's output, which the down projection's weight gradient needs, is NOT saved:
the backward kernel that forms the activation's gradient recomputes it in the same pass. Eager
PyTorch also keeps ``silu(gate)`` and the product (2 * hidden_dim more per token for SwiGLU,
hidden_dim more for GELU).
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.ops.activation import APPROXIMATE, _act_bwd_packed_op, _act_fwd_op
from fastlm.ops.gemm import mm


class _MLPFunction(torch.autograd.Function):
    """out = linear(act(linear(x, w_in, b_in)), w_out, b_out); gated: act(gate) * up on the halves."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, act, gated):
        # Under autocast the matmuls compute in the autocast dtype, so ``pre`` carries the compute
        # dtype; the backward (which runs outside autocast) casts to it and back explicitly.
        x2 = x.reshape(-1, x.shape[-1])  # (N, C)
        pre = mm(x2, w_in.t(), b_in)  # (N, 2F) or (N, F)
        gate, up = pre.chunk(2, dim=-1) if gated else (pre, None)
        out = mm(_act_fwd_op(gate, up, act), w_out.t(), b_out).view(*x.shape[:-1], w_out.shape[0])  # (..., C)
        ctx.save_for_backward(x, w_in, w_out, pre)
        ctx.act, ctx.gated = act, gated
        ctx.has_b_in, ctx.has_b_out = b_in is not None, b_out is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w_in, w_out, pre = ctx.saved_tensors
        need_x, need_w_in, need_b_in, need_w_out, need_b_out = ctx.needs_input_grad[:5]
        dt = pre.dtype  # the forward's compute dtype (the autocast dtype under autocast)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        dout2 = dout.reshape(-1, dout.shape[-1]).to(dt)
        w_in_c, w_out_c = w_in.to(dt), w_out.to(dt)
        # One pass: the gradient of the packed pre-activation ([dgate | dup] when gated) and the
        # recomputed activation output; each gradient through w_in is then ONE matmul.
        dpre, act_out = _act_bwd_packed_op(mm(dout2, w_out_c), pre, ctx.act, ctx.gated, need_w_out)
        dw_out = mm(dout2.t(), act_out).to(w_out.dtype) if need_w_out else None
        db_out = dout2.sum(0, dtype=w_out.dtype) if need_b_out and ctx.has_b_out else None
        dx = mm(dpre, w_in_c).view(x.shape).to(x.dtype) if need_x else None
        dw_in = mm(dpre.t(), x2).to(w_in.dtype) if need_w_in else None
        db_in = dpre.sum(0, dtype=w_in.dtype) if need_b_in and ctx.has_b_in else None
        return dx, dw_in, db_in, dw_out, db_out, None, None


ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def fused_mlp(x, w_in, b_in, w_out, b_out, activation: str = "silu", gated: bool = True):
    """``linear(act(gate) * up, w_out, b_out)`` with ``[gate | up] = linear(x, w_in, b_in)`` (gated), or
    ``linear(act(linear(x, w_in, b_in)), w_out, b_out)``: the functional form of SwiGLUMLP / GELUMLP,
    for models that keep their own parameters (fastlm.models). ``activation``: "silu", "gelu_tanh" or
    "gelu" (exact). Saves what the module doc says and works under autocast."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_mlp: activation must be one of {ACTIVATIONS}, got {activation!r}")
    return _MLPFunction.apply(x, w_in, b_in, w_out, b_out, activation, gated)


def fused_mlp_ref(x, w_in, b_in, w_out, b_out, activation: str = "silu", gated: bool = True):
    """PyTorch reference of ``fused_mlp`` (differentiable, any dtype)."""
    pre = F.linear(x, w_in, b_in)
    if activation == "silu":
        act = F.silu
    else:
        act = lambda t: F.gelu(t, approximate="tanh" if activation == "gelu_tanh" else "none")  # noqa: E731
    if gated:
        gate, up = pre.chunk(2, dim=-1)
        return F.linear(act(gate) * up, w_out, b_out)
    return F.linear(act(pre), w_out, b_out)


def _check_sizes(cls: str, dim, hidden_dim) -> None:
    for name, v in (("dim", dim), ("hidden_dim", hidden_dim)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{cls}: {name} must be a positive int, got {v!r}")


def _check_input(cls: str, x, weight: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{cls}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{cls}: x's last dim must be dim={weight.shape[1]}, got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"{cls}: x must have the parameters' dtype {weight.dtype}, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{cls}: x is on {x.device} but the parameters are on {weight.device}")


class SwiGLUMLP(nn.Module):
    """Llama-style MLP, ``down_proj(silu(gate) * up)``, gate and up from one matmul (see the module doc)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        _check_sizes("SwiGLUMLP", dim, hidden_dim)
        self.dim, self.hidden_dim = dim, hidden_dim
        self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("SwiGLUMLP", x, self.gate_up_proj.weight)
        return fused_mlp(x, self.gate_up_proj.weight, self.gate_up_proj.bias, self.down_proj.weight,
                         self.down_proj.bias, "silu", gated=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}"


class GELUMLP(nn.Module):
    """GPT-2-style MLP, ``down_proj(gelu(up_proj(x)))`` (see the module doc).

    ``approximate``: ``"tanh"`` (GPT-2's ``gelu_new``, the default) or ``"none"`` (exact).
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, approximate: str = "tanh", device=None,
                 dtype=None):
        super().__init__()
        _check_sizes("GELUMLP", dim, hidden_dim)
        if approximate not in APPROXIMATE:
            raise ValueError(f"GELUMLP: approximate must be 'tanh' or 'none', got {approximate!r}")
        self.dim, self.hidden_dim, self.approximate = dim, hidden_dim, approximate
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("GELUMLP", x, self.up_proj.weight)
        return fused_mlp(x, self.up_proj.weight, self.up_proj.bias, self.down_proj.weight, self.down_proj.bias,
                         APPROXIMATE[self.approximate], gated=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, approximate={self.approximate!r}"
