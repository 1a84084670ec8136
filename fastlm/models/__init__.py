"""fastlm's Transformer: Llama-, GPT-2- and BERT-style models built on the fused ops."""

from fastlm.models.config import ModelConfig
from fastlm.models.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
