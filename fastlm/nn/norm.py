"""LayerNorm and RMSNorm modules: drop-ins for torch.nn.LayerNorm / torch.nn.RMSNorm.

Same constructor arguments, parameters and state_dict keys, so a model can swap them in
and load its existing checkpoints. ``forward(x, residual=None)`` also takes the pre-norm
block's residual: ``norm(x, residual)`` returns ``(norm(x + residual), x + residual)``
computed in one pass.
"""

import numbers

import torch
from torch import nn

from fastlm.ops.norm import layer_norm, rms_norm


def _last_dim(normalized_shape) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"fastlm norms normalize over the last dim only; normalized_shape must be one int, got {shape}")
    return shape


class LayerNorm(nn.LayerNorm):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__(_last_dim(normalized_shape), eps, elementwise_affine, bias, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return layer_norm(x, self.weight, self.bias, self.eps, residual)


class RMSNorm(nn.RMSNorm):
    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None):
        super().__init__(_last_dim(normalized_shape), eps, elementwise_affine, device, dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # torch.nn.RMSNorm's eps=None means the dtype's machine epsilon.
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, residual)
