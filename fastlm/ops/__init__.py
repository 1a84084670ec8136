"""fastlm's ops, one module each; importing this registers them all with the dispatcher."""

from fastlm.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fastlm.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from fastlm.ops.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

__all__ = ["layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
__all__ += ["cross_entropy", "cross_entropy_ref", "linear_cross_entropy", "linear_cross_entropy_ref"]
