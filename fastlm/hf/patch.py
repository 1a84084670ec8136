"""Patch ``transformers`` models with fastlm's kernels.

``patch_hf(model)`` works on one instantiated model: it sets ``forward`` on the matching module
*instances* (norms, MLPs, rotary attention, the causal-LM head, and every ``torch.nn.Linear`` and GPT-2
``Conv1D``, whose matmuls then run fastlm's gemm: oneDNN on CPU) and switches that model's config to
``attn_implementation="fastlm"``. Classes, parameters and buffers are untouched, so ``state_dict`` and
``save_pretrained`` write exactly what unpatched transformers writes and loads. ``patch_hf_class`` does the
same on the classes (for models loaded later with ``from_pretrained``); ``unpatch_hf_class`` undoes it.
"""

from __future__ import annotations

import functools
import sys
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastlm.hf import attention as hf_attention
from fastlm.hf.table import ACTIVATIONS, ARCHITECTURES, Arch, supported
from fastlm.ops.activation import geglu, gelu, swiglu
from fastlm.ops.gemm import linear as fastlm_linear
from fastlm.ops.gemm import mm
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.norm import layer_norm, rms_norm
from fastlm.ops.rope import rope

@dataclass
class PatchReport:
    """What a patch replaced: module counts per kind ("norm" includes BERT's fused post-norm blocks),
    the attention implementation set, and the kinds that did not apply to this model, with why."""

    model_type: str
    counts: dict[str, int] = field(default_factory=dict)
    attention: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- replacement forwards


def _norm_forward(kind: str, eps_attr: str):
    if kind == "rms":
        def forward(self, hidden_states):
            return rms_norm(hidden_states, self.weight, getattr(self, eps_attr))
    elif kind == "rms_offset":
        def forward(self, x):
            # Gemma stores w and scales by (1 + w) in fp32 (as transformers does); the parameter stays w.
            return rms_norm(x, self.weight.float() + 1.0, getattr(self, eps_attr))
    else:
        def forward(self, input):
            return layer_norm(input, self.weight, self.bias, getattr(self, eps_attr))
    return forward


def _post_norm_forward(self, hidden_states, input_tensor):
    """BERT's ``LayerNorm(dropout(dense(h)) + input)`` with the residual add fused into the norm."""
    h = self.dropout(self.dense(hidden_states))
    ln = self.LayerNorm
    return layer_norm(h, ln.weight, ln.bias, ln.eps, residual=input_tensor)[0]


def _linear_forward(self, input):
    return fastlm_linear(input, self.weight, self.bias)


def _conv1d_forward(self, x):
    """transformers' ``Conv1D`` (GPT-2's projections): ``x @ weight + bias`` with weight stored (in, out)."""
    return mm(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], self.nf)


# The projections: exact classes only (a subclass, e.g. a quantized or LoRA layer, computes something else).
_LINEAR_FORWARDS = {("torch.nn.modules.linear", "Linear"): _linear_forward,
                    ("transformers.pytorch_utils", "Conv1D"): _conv1d_forward}


def _linear_target(module):
    cls = type(module)
    return _LINEAR_FORWARDS.get((cls.__module__, cls.__name__))


def _activation(config, arch: Arch) -> tuple[str, str | None]:
    name = getattr(config, arch.act_attr, None)
    if name not in ACTIVATIONS:
        raise ValueError(
            f"patch_hf: mlp: activation {arch.act_attr}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}"
            " (pass mlp=False to keep the model's MLP)"
        )
    return ACTIVATIONS[name]


def _mlp_forward(arch: Arch, act: str, approximate: str | None):
    if arch.mlp_kind == "gated":
        if act == "silu":
            def forward(self, x):
                return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        else:
            def forward(self, x):
                return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), approximate))
    elif act != "gelu":
        raise ValueError(f"patch_hf: mlp: a {arch.mlp_kind} MLP needs a GELU activation, got {act}")
    elif arch.mlp_kind == "gpt2":
        # GPT-2's Conv1D projections (weight stored (in, out)) are kept as they are; only the activation fuses.
        def forward(self, hidden_states):
            return self.dropout(self.c_proj(gelu(self.c_fc(hidden_states), approximate)))
    else:
        def forward(self, hidden_states):
            return gelu(self.dense(hidden_states), approximate)
    return forward


def _rope_tables(cos, sin, batch, seqlen):
    """transformers' gathered (b or 1, s, headdim) cos/sin with duplicated halves -> fastlm's
    (positions, headdim / 2) fp32 tables and the positions indexing them."""
    half = cos.shape[-1] // 2
    cos_t = cos[..., :half].reshape(-1, half).float()
    sin_t = sin[..., :half].reshape(-1, half).float()
    if cos.shape[0] == 1:
        return cos_t, sin_t, None
    positions = torch.arange(batch * seqlen, device=cos.device).view(batch, seqlen)
    return cos_t, sin_t, positions


def _rope_attention_forward(qk_norm: bool):
    """The Llama-family attention forward with fastlm's rope on (batch, seqlen, heads, headdim) tensors
    (``qk_norm``: Qwen3's per-head RMSNorm of q and k before the rotation)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return _rope_attention(self, qk_norm, hidden_states, position_embeddings, attention_mask, cache, kwargs)

    return forward


def _rope_attention(self, qk_norm, hidden_states, position_embeddings, attention_mask, cache, kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape)
    k = self.k_proj(hidden_states).view(hidden_shape)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    cos_t, sin_t, positions = _rope_tables(cos, sin, *input_shape)
    q, k = rope(q, k, cos_t, sin_t, positions)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    # "eager" is not in the registry: each modeling file defines its own eager function.
    eager = sys.modules[type(self).__module__].eager_attention_forward
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    if "sliding_window" not in kwargs:
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        if window is not None:
            kwargs["sliding_window"] = window
    out, weights = attention_interface(self, q, k, v, attention_mask,
                                       dropout=0.0 if not self.training else self.attention_dropout,
                                       scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _causal_lm_forward(original, body_attr: str):
    """With labels: the body's hidden states go straight into ``linear_cross_entropy`` with the head's
    weight (no logits tensor); ``num_items_in_batch`` is the loss denominator, as in transformers' loss.
    Logits are still computed in eval mode or with ``return_logits=True``. Without labels: the original.
    ``functools.wraps`` gives it the original's signature, which the Trainer inspects to choose the dataset
    columns it passes and whether the model takes ``num_items_in_batch``."""

    @functools.wraps(original)
    def forward(self, *args, labels=None, return_logits=None, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return original(self, *args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        outputs = getattr(self, body_attr)(*args, **kwargs)
        hidden = outputs[0]
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        head = self.get_output_embeddings()
        loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias,
                                    num_items=num_items)
        want_logits = return_logits if return_logits is not None else not self.training
        cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
        return CausalLMOutputWithPast(
            loss=loss, logits=head(hidden) if want_logits else None,
            hidden_states=getattr(outputs, "hidden_states", None), attentions=getattr(outputs, "attentions", None),
            **{cache_field: getattr(outputs, cache_field, None)},
        )

    return forward


# ----------------------------------------------------------------------------- patching


def _arch(model_type: str) -> Arch:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"fastlm.patch_hf: model type {model_type!r} is not supported; supported: {supported()}")
    return ARCHITECTURES[model_type]


def _check_flags(fn: str, flags: dict) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def _replacements(arch: Arch, config, flags: dict, causal_lm_original) -> list[tuple[str, str, object]]:
    """(kind, class name, forward) for every class of this architecture the flags select."""
    out = []
    if flags["norm"]:
        out += [("norm", name, _norm_forward(arch.norm_kind, arch.eps_attr)) for name in arch.norm_classes]
        out += [("norm", name, _post_norm_forward) for name in arch.post_norm_classes]
    if flags["mlp"]:
        out.append(("mlp", arch.mlp_class, _mlp_forward(arch, *_activation(config, arch))))
    if flags["rope"] and arch.rotary:
        out.append(("rope", arch.attention_class, _rope_attention_forward(arch.qk_norm)))
    if flags["loss"] and arch.causal_lm_class is not None and causal_lm_original is not None:
        out.append(("loss", arch.causal_lm_class, _causal_lm_forward(causal_lm_original, arch.body_attr)))
    return out


def _skipped(arch: Arch, flags: dict, counts: dict, model_cls: str) -> dict[str, str]:
    why = {}
    if flags["rope"] and not arch.rotary:
        why["rope"] = "this architecture has no rotary embedding"
    if flags["loss"] and not counts.get("loss"):
        why["loss"] = f"{model_cls} has no causal-LM head ({arch.causal_lm_class or 'none for this architecture'})"
    return why


def patch_hf(model, norm=True, attention=True, mlp=True, rope=True, loss=True, linear=True) -> PatchReport:
    """Patch an instantiated ``transformers`` model in place (on its module instances); returns a PatchReport.

    ``linear``: every ``torch.nn.Linear`` and ``Conv1D`` (exact classes) runs fastlm's gemm (oneDNN for
    float32 on CPU, ~2x MKL on AVX-512 AMD processors; ``F.linear`` itself on CUDA).

    ``attention`` switches this model to ``attn_implementation="fastlm"`` (see fastlm.hf.attention for when it
    falls back to SDPA). ``loss``: a causal LM called with ``labels`` computes its loss with
    ``linear_cross_entropy`` from the hidden states, without a logits tensor; ``logits`` is None in training
    mode unless the call passes ``return_logits=True`` (eval mode returns them).

    Raises ValueError for a model type outside the table (listing the supported ones), for a selected kind
    that finds no module to patch, and for an activation fastlm does not implement. Patching twice is a no-op.
    """
    flags = dict(norm=norm, attention=attention, mlp=mlp, rope=rope, loss=loss, linear=linear)
    _check_flags("patch_hf", flags)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(config, "model_type"):
        raise TypeError(f"patch_hf: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    arch = _arch(config.model_type)
    report = PatchReport(config.model_type, counts={k: 0 for k, v in flags.items() if v})
    by_class = {name: (kind, fwd) for kind, name, fwd in _replacements(arch, config, flags, _class_forward(model))}
    # A post-norm block calls its LayerNorm's kernel itself (fused with the residual add): skip those norms.
    inside_post_norm = {id(m.LayerNorm) for m in model.modules() if type(m).__name__ in arch.post_norm_classes}
    targets = []
    for module in model.modules():
        entry = by_class.get(type(module).__name__)
        if flags["linear"] and _linear_target(module) is not None:
            entry = ("linear", _linear_target(module))
        if entry is None or (flags["norm"] and id(module) in inside_post_norm):
            continue
        if entry[0] == "norm" and isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) != 1:
            continue
        targets.append((module, *entry))
        report.counts[entry[0]] += 1
    if attention:
        report.counts["attention"] = sum(type(m).__name__ == arch.attention_class for m in model.modules())
    report.skipped = _skipped(arch, flags, report.counts, type(model).__name__)
    missing = [k for k, n in report.counts.items() if n == 0 and k not in report.skipped]
    if missing:  # checked before anything changes: a failed patch leaves the model as it was
        raise ValueError(
            f"patch_hf: found no {', '.join(missing)} module to patch in {type(model).__name__} "
            f"(model type {config.model_type!r}; expected classes: {_expected(arch)})"
        )
    for module, kind, fwd in targets:
        if getattr(module, "_fastlm_patched", None) is None:
            module.forward = types.MethodType(fwd, module)
            module._fastlm_patched = kind
    if attention:
        hf_attention.register()
        model.set_attn_implementation(hf_attention.NAME)
        report.attention = hf_attention.NAME
    return report


def _class_forward(model):
    """The causal-LM class's own forward (the original even when patch_hf_class replaced it)."""
    cls = type(model)
    return _ORIGINALS.get((cls.__module__, cls.__name__, "forward"), (None, cls.forward))[1]


def _expected(arch: Arch) -> str:
    names = [*arch.norm_classes, *arch.post_norm_classes, arch.mlp_class, arch.attention_class, arch.causal_lm_class]
    return ", ".join(n for n in names if n)


# ----------------------------------------------------------------------------- class patching

# (module, class, attribute) -> (class, original function); model type -> the keys it patched.
_ORIGINALS: dict[tuple[str, str, str], tuple[type, object]] = {}
_OWNERS: dict[str, set] = {}


def _modeling_module(model_type: str):
    import importlib

    try:
        return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError as err:  # the table names a model this transformers version lacks
        raise ValueError(f"patch_hf_class: transformers has no modeling module for {model_type!r}: {err}") from err


def patch_hf_class(model_type: str, norm=True, attention=True, mlp=True, rope=True, loss=True, config=None):
    """Patch the transformers classes of ``model_type`` (affects every model of that type in the process,
    including ones already built) until ``unpatch_hf_class(model_type)``; returns a PatchReport counting
    classes. Attention is not a class patch: this registers "fastlm", and you pass
    ``attn_implementation="fastlm"`` to ``from_pretrained``. Neither are the projections: ``torch.nn.Linear``
    and ``Conv1D`` are classes every model shares, so only ``patch_hf`` (on instances) switches them to
    fastlm's gemm. ``config`` (a config instance) selects the MLP activation; by default the model type's
    config class defaults are used."""
    flags = dict(norm=norm, attention=attention, mlp=mlp, rope=rope, loss=loss)
    _check_flags("patch_hf_class", flags)
    if not isinstance(model_type, str):
        raise TypeError(f"patch_hf_class: model_type must be a str, got {type(model_type).__name__}")
    arch = _arch(model_type)
    module = _modeling_module(model_type)
    if config is None:
        from transformers import AutoConfig

        config = AutoConfig.for_model(model_type)
    report = PatchReport(model_type, counts={k: 0 for k, v in flags.items() if v})
    causal_cls = getattr(module, arch.causal_lm_class, None) if arch.causal_lm_class else None
    causal_original = None
    if causal_cls is not None:
        causal_original = _ORIGINALS.get((causal_cls.__module__, causal_cls.__name__, "forward"),
                                         (None, causal_cls.forward))[1]
    for kind, name, fwd in _replacements(arch, config, flags, causal_original):
        if name == "LayerNorm":
            report.skipped["norm"] = ("torch.nn.LayerNorm is torch's class, shared by every model; patch_hf patches "
                                      "its instances in a built model")
            continue
        cls = getattr(module, name, None)
        if cls is None:
            raise ValueError(f"patch_hf_class: transformers' {module.__name__} has no class {name}")
        key = (cls.__module__, cls.__name__, "forward")
        if key not in _ORIGINALS:
            _ORIGINALS[key] = (cls, cls.forward)
        cls.forward = fwd
        _OWNERS.setdefault(model_type, set()).add(key)
        report.counts[kind] += 1
    if attention:
        hf_attention.register()
        report.attention = hf_attention.NAME
        report.counts["attention"] = 1
    report.skipped.update(_skipped(arch, flags, report.counts, arch.causal_lm_class or model_type))
    return report


def unpatch_hf_class(model_type: str) -> None:
    """Restore the classes ``patch_hf_class(model_type)`` replaced (a class shared with another patched
    model type is restored once no patched type uses it)."""
    keys = _OWNERS.pop(model_type, set())
    still_used = set().union(*_OWNERS.values()) if _OWNERS else set()
    for key in keys - still_used:
        cls, forward = _ORIGINALS.pop(key)
        cls.forward = forward
