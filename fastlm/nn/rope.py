"""RotaryEmbedding: the cos/sin tables and ``fastlm.rope`` in one module."""

import torch
from torch import nn

from fastlm.ops.rope import rope


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the first ``dim`` features of each head.

    ``dim`` is the rotary dim (even; less than the head dim for partial rotary); angles are
    ``position * base ** (-2i / dim)`` for positions below ``max_seq_len``. The tables are
    computed in fp64 and kept in fp32 even when the model is cast to bf16/fp16 (rounding the
    angles' cos/sin to bf16 would cost every rotation precision); they are buffers, not
    state_dict entries. ``forward(q, k, position_ids=None)`` returns rotated ``(q, k)``.
    """

    def __init__(self, dim: int, max_seq_len: int, base: float = 10000.0, interleaved: bool = False, device=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even int, got {dim!r}")
        if not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"RotaryEmbedding: max_seq_len must be a positive int, got {max_seq_len!r}")
        if not base > 1:
            raise ValueError(f"RotaryEmbedding: base must be > 1, got {base!r}")
        self.dim, self.max_seq_len, self.base, self.interleaved = dim, max_seq_len, float(base), bool(interleaved)
        inv_freq = self.base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda() move the tables but not change their dtype.
        cos, sin = self.cos, self.sin
        super()._apply(fn, recurse)
        self.cos = cos.to(self.cos.device)
        self.sin = sin.to(self.sin.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor | None = None):
        return rope(q, k, self.cos, self.sin, position_ids, self.interleaved)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, interleaved={self.interleaved}"
