"""fastlm: fused kernels for fast, memory-lean Transformer training.

Importing fastlm compiles nothing and queries no GPU; kernels are built on first use.
"""

from fastlm import nn, optim
from fastlm.backend import backend_info, use_backend
from fastlm.ops import attention, attention_ref, attention_with_kvcache
from fastlm.ops import layer_norm, rms_norm
from fastlm.ops import geglu, gelu, rope, swiglu
from fastlm.ops import cross_entropy, linear_cross_entropy
from fastlm.ops import gemm, linear
from fastlm.generate import generate

__version__ = "0.1.0"
__all__ = ["backend_info", "use_backend", "layer_norm", "rms_norm", "nn", "optim", "__version__"]
__all__ += ["attention", "attention_ref", "attention_with_kvcache"]
__all__ += ["swiglu", "geglu", "gelu", "rope"]
__all__ += ["cross_entropy", "linear_cross_entropy", "gemm", "linear"]
__all__ += ["generate"]

_HF_EXPORTS = ("patch_hf", "patch_hf_class")
__all__ += list(_HF_EXPORTS)


def __getattr__(name):
    # fastlm.hf imports transformers, so it is only imported when these are first used.
    if name in _HF_EXPORTS:
        import fastlm.hf

        return getattr(fastlm.hf, name)
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
