"""fastlm: fused kernels for fast, memory-lean Transformer training.

Importing fastlm compiles nothing and queries no GPU; kernels are built on first use.
"""

from fastlm import nn
from fastlm.backend import backend_info, use_backend
from fastlm.ops import layer_norm, rms_norm
from fastlm.ops import cross_entropy, linear_cross_entropy

__version__ = "0.1.0"
__all__ = ["backend_info", "use_backend", "layer_norm", "rms_norm", "nn", "__version__"]
__all__ += ["cross_entropy", "linear_cross_entropy"]
