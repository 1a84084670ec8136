"""Drop-in modules built on fastlm's ops."""

from fastlm.nn.attention import Attention
from fastlm.nn.norm import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
__all__ += ["Attention"]
