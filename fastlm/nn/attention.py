"""Multi-head attention block: fused QKV projection, optional rotary hook, flash attention, output projection.

GQA/MQA by ``n_kv_heads``; packed sequences by passing ``cu_seqlens`` (then ``x`` is
``(total_tokens, dim)``). The rotary embedding is a hook, ``rope(q, k) -> (q, k)`` on
``(..., seqlen, heads, headdim)`` tensors (positions are the caller's: for packed input
they restart per sequence), so the module does not fix one RoPE variant.
"""

from collections.abc import Callable

import torch
from torch import nn

from fastlm.nn.linear import Linear
from fastlm.ops.attention import attention


class Attention(nn.Module):
    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None, bias: bool = False,
        causal: bool = True, dropout_p: float = 0.0,
        rope: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        device=None, dtype=None,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = dim // n_heads if head_dim is None else head_dim
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"Attention: n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.dropout_p, self.rope = causal, dropout_p, rope
        # One matmul for q, k and v: a single read of x.
        self.qkv = Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias, device=device, dtype=dtype)
        self.out = Linear(n_heads * head_dim, dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None):
        lead = x.shape[:-1]
        qkv = self.qkv(x).view(*lead, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=-2)
        if self.rope is not None:
            q, k = self.rope(q, k)
        y = attention(
            q, k, v, causal=self.causal, dropout_p=self.dropout_p if self.training else 0.0,
            cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        )
        return self.out(y.reshape(*lead, self.n_heads * self.head_dim))
