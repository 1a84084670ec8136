"""fastlm's ops, one module each; importing this registers them all with the dispatcher."""

from fastlm.ops.attention import attention, attention_ref, attention_with_kvcache
from fastlm.ops.activation import geglu, geglu_ref, gelu, gelu_ref, swiglu, swiglu_ref
from fastlm.ops.gemm import gemm, gemm_ref, linear
from fastlm.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fastlm.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from fastlm.ops.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from fastlm.ops.rope import rope, rope_ref

__all__ = ["layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
__all__ += ["attention", "attention_ref", "attention_with_kvcache"]
__all__ += ["swiglu", "swiglu_ref", "geglu", "geglu_ref", "gelu", "gelu_ref", "rope", "rope_ref"]
__all__ += ["gemm", "gemm_ref", "linear"]
__all__ += ["cross_entropy", "cross_entropy_ref", "linear_cross_entropy", "linear_cross_entropy_ref"]
