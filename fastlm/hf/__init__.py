"""Drop-in fastlm kernels for Hugging Face ``transformers`` models (needs ``pip install fastlm[hf]``).

``fastlm.patch_hf(model)`` patches a built model's instances; ``fastlm.patch_hf_class(model_type)`` patches
the classes before ``from_pretrained`` (undo with ``unpatch_hf_class``); ``attn_implementation="fastlm"``
selects fastlm attention in ``from_pretrained`` once this package is imported. The supported architectures
and their conventions are the rows of ``fastlm.hf.table.ARCHITECTURES``.
"""

from fastlm.hf.attention import fallback_counts, register, reset_fallback_counts
from fastlm.hf.patch import PatchReport, patch_hf, patch_hf_class, unpatch_hf_class
from fastlm.hf.table import ARCHITECTURES

register()

__all__ = ["patch_hf", "patch_hf_class", "unpatch_hf_class", "PatchReport", "ARCHITECTURES", "fallback_counts",
           "reset_fallback_counts", "register"]
