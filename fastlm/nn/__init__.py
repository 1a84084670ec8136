"""Drop-in modules built on fastlm's ops."""

from fastlm.nn.attention import Attention
from fastlm.nn.linear import Linear
from fastlm.nn.mlp import GELUMLP, SwiGLUMLP
from fastlm.nn.norm import LayerNorm, RMSNorm
from fastlm.nn.rope import RotaryEmbedding

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["Attention", "Linear"]
__all__ += ["SwiGLUMLP", "GELUMLP", "RotaryEmbedding"]
