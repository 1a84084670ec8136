"""Drop-in fastlm kernels for Hugging Face ``transformers`` models (``pip install fastlm[hf]``).

    import fastlm
    model = AutoModelForCausalLM.from_pretrained(...)
    report = fastlm.patch_hf(model)          # norms, MLP activations, rope, attention, fused LM loss
    print(report.counts, report.skipped)

or, before loading (patches the classes of that model type for the whole process; undo with
``fastlm.hf.unpatch_hf_class``)::

    import fastlm.hf                          # registers attn_implementation="fastlm"
    fastlm.patch_hf_class("llama")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="fastlm")

What runs where: norms (RMSNorm, Gemma's 1 + w, LayerNorm, BERT's post-norm with the residual add fused),
the MLP activation (SwiGLU, GeGLU, GELU; the projections stay transformers' Linear / Conv1D modules), rope
(the Llama-family attention forward, q/k norms included), attention (``fastlm.hf.attention``: which masks
run fastlm's kernels and which fall back to SDPA or the model's eager attention), and the causal-LM loss
(``linear_cross_entropy`` with ``num_items_in_batch`` and ``ignore_index``; logits are not built in training
unless ``return_logits=True``; a batch whose labels are all ignored has loss 0.0, not transformers' NaN).
What fastlm's kernels do not take (float64 inputs, an activation fastlm lacks) runs the module's own
transformers forward; ``fallback_counts()`` counts every such call, attention's included. Parameters are
untouched, so ``save_pretrained`` checkpoints load in plain transformers, and a patched model pickles
(``torch.save``) and loads patched. The supported architectures and their conventions are the rows of
``fastlm.hf.table.ARCHITECTURES``.
"""

try:
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError("fastlm.hf needs transformers: pip install 'fastlm[hf]'") from err

from fastlm.hf.attention import fallback_counts, register, reset_fallback_counts
from fastlm.hf.patch import PatchReport, patch_hf, patch_hf_class, unpatch_hf_class
from fastlm.hf.table import ARCHITECTURES

register()

__all__ = ["patch_hf", "patch_hf_class", "unpatch_hf_class", "PatchReport", "ARCHITECTURES", "fallback_counts",
           "reset_fallback_counts", "register"]
