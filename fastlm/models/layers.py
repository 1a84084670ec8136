"""The fused ops the model is built from, bound in one place.

``attention`` (flash attention, varlen with ``cu_seqlens``), ``attention_with_kvcache`` (decoding
against a preallocated key/value cache), ``swiglu``, ``gelu`` (the tanh
approximation of GPT-2 and BERT), ``rope`` and ``linear_cross_entropy`` (the LM head and the
loss fused, logits never materialized) are fastlm's ops: Triton on CUDA, C++ or PyTorch on
CPU, chosen per call (``fastlm.use_backend("torch")`` gives the plain PyTorch model).
Layouts follow FlashAttention: ``(batch, seqlen, nheads, headdim)``, or packed
``(total_tokens, nheads, headdim)`` with ``cu_seqlens`` (int32, ``[0, len_0, ..., total]``).
"""

import torch

from fastlm.ops.activation import gelu as _gelu
from fastlm.ops.attention import attention, attention_with_kvcache
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.rope import rope
from fastlm.ops.activation import swiglu

__all__ = ["attention", "attention_with_kvcache", "gelu", "linear_cross_entropy", "rope", "rope_cache", "swiglu"]


def gelu(x):
    """GELU, tanh approximation (GPT-2's and BERT's)."""
    return _gelu(x, approximate="tanh")


def rope_cache(max_seqlen, head_dim, theta, device=None):
    """cos, sin tables (max_seqlen, head_dim // 2) in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seqlen, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()
