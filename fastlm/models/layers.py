"""The fused ops the model is built from, bound in one place.

``attention`` (flash attention, varlen with ``cu_seqlens``), ``attention_with_kvcache`` (decoding
against a preallocated key/value cache), ``fused_mlp`` (the MLP around
the fused SwiGLU / GELU activation, saving neither the activation's output nor a concatenated
gate/up gradient), ``gelu`` (the tanh approximation of GPT-2 and BERT, for the MLM head),
``rope`` and ``linear_cross_entropy`` (the LM head and the loss fused, logits never
materialized) are fastlm's ops: Triton on CUDA, C++ or PyTorch on
CPU, chosen per call (``fastlm.use_backend("torch")`` gives the plain PyTorch model).
Layouts follow FlashAttention: ``(batch, seqlen, nheads, headdim)``, or packed
``(total_tokens, nheads, headdim)`` with ``cu_seqlens`` (int32, ``[0, len_0, ..., total]``).
"""

import math

import torch

from fastlm.ops.activation import gelu as _gelu
from fastlm.ops.attention import attention, attention_with_kvcache
from fastlm.ops.gemm import linear
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.rope import rope
from fastlm.nn.mlp import fused_mlp

__all__ = ["attention", "attention_with_kvcache", "fused_mlp", "gelu", "linear", "linear_cross_entropy", "rope", "rope_cache"]


def gelu(x):
    """GELU, tanh approximation (GPT-2's and BERT's)."""
    return _gelu(x, approximate="tanh")


def rope_cache(max_seqlen, head_dim, theta, device=None, scaling=None):
    """cos, sin tables (max_seqlen, head_dim // 2) in fp32; ``scaling``: ``ModelConfig.rope_scaling``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is not None and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling is not None and scaling["rope_type"] == "llama3":
        # Wavelengths longer than the original context / low_freq_factor are stretched by factor, those
        # shorter than original / high_freq_factor kept, and the band between blended smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)  # 0 at the long end of the band, 1 at the short
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > original / low, inv_freq / factor,
                               torch.where(wavelen < original / high, inv_freq, blended))
    angles = torch.outer(torch.arange(max_seqlen, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()
