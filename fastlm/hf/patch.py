"""Patch ``transformers`` models with fastlm's kernels.

``patch_hf(model)`` works on one instantiated model: it sets ``forward`` on the matching module
*instances* (norms, MLPs, rotary attention, the causal-LM head, and every ``torch.nn.Linear`` and GPT-2
``Conv1D``, whose matmuls then run fastlm's gemm: oneDNN on CPU) and switches that model's config to
``attn_implementation="fastlm"``. Classes, parameters and buffers are untouched, so ``state_dict`` and
``save_pretrained`` write exactly what unpatched transformers writes and loads. ``patch_hf_class`` does the
same on the classes (for models loaded later with ``from_pretrained``); ``unpatch_hf_class`` undoes it.

A call fastlm's kernels do not take -- an input in a dtype they lack (float64), an MLP activation they do not
implement -- runs the module's own transformers forward instead, as attention falls back to SDPA, and
``fastlm.hf.fallback_counts()`` counts it under "<kind>: <reason>".
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastlm.hf import attention as hf_attention
from fastlm.hf.table import ACTIVATIONS, ARCHITECTURES, Arch, supported
from fastlm.ops.activation import SUPPORTED_DTYPES as ACTIVATION_DTYPES
from fastlm.ops.activation import geglu, gelu, swiglu
from fastlm.ops.cross_entropy import SUPPORTED_DTYPES as LOSS_DTYPES
from fastlm.ops.gemm import linear as fastlm_linear
from fastlm.ops.gemm import mm
from fastlm.ops.linear_cross_entropy import linear_cross_entropy
from fastlm.ops.norm import SUPPORTED_DTYPES as NORM_DTYPES
from fastlm.ops.norm import layer_norm, rms_norm
from fastlm.ops.rope import SUPPORTED_DTYPES as ROPE_DTYPES
from fastlm.ops.rope import rope

# The dtypes each kind's op takes (linear_cross_entropy takes cross_entropy's); the projections take any (gemm
# hands what oneDNN does not take to torch's matmul).
_DTYPES = {"norm": NORM_DTYPES, "mlp": ACTIVATION_DTYPES, "rope": ROPE_DTYPES, "loss": LOSS_DTYPES}


@dataclass
class PatchReport:
    """What a patch replaced: module counts per kind ("norm" includes BERT's fused post-norm blocks), the
    modules (classes, for ``patch_hf_class``) found patched already and left as they were, the attention
    implementation set, and the kinds that did not apply to this model, with why."""

    model_type: str
    counts: dict[str, int] = field(default_factory=dict)
    attention: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    already_patched: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- replacement forwards


def _original_forward(cls):
    """The class's own forward (the original even when patch_hf_class replaced it)."""
    return _ORIGINALS.get((cls.__module__, cls.__name__, "forward"), (None, cls.forward))[1]


def _fallback(module, reason: str):
    """The module's own transformers forward, bound, for a call fastlm's kernels do not take (counted)."""
    hf_attention.count_fallback(reason)
    return types.MethodType(_original_forward(type(module)), module)


def _unsupported_dtype(module, kind: str, dtype: torch.dtype):
    """``_fallback`` for an input in a dtype the kind's op does not take (float64, say), else None."""
    return None if dtype in _DTYPES[kind] else _fallback(module, f"{kind}: dtype {dtype} is not supported")


def _norm_forward(kind: str, eps_attr: str):
    if kind == "rms":
        def forward(self, hidden_states):
            if (own := _unsupported_dtype(self, "norm", hidden_states.dtype)) is not None:
                return own(hidden_states)
            return rms_norm(hidden_states, self.weight, getattr(self, eps_attr))
    elif kind == "rms_offset":
        def forward(self, x):
            if (own := _unsupported_dtype(self, "norm", x.dtype)) is not None:
                return own(x)
            # Gemma stores w and scales by (1 + w) in fp32 (as transformers does); the parameter stays w.
            return rms_norm(x, self.weight.float() + 1.0, getattr(self, eps_attr))
    else:
        def forward(self, input):
            if (own := _unsupported_dtype(self, "norm", input.dtype)) is not None:
                return own(input)
            return layer_norm(input, self.weight, self.bias, getattr(self, eps_attr))
    return forward


def _post_norm_forward(self, hidden_states, input_tensor):
    """BERT's ``LayerNorm(dropout(dense(h)) + input)`` with the residual add fused into the norm."""
    if (own := _unsupported_dtype(self, "norm", hidden_states.dtype)) is not None:
        return own(hidden_states, input_tensor)
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


def _check_activation(config, arch: Arch) -> None:
    """Refuse, at patch time, a config whose MLP activation fastlm does not implement for this MLP layout."""
    name = getattr(config, arch.act_attr, None)
    names = sorted(n for n, (act, _) in ACTIVATIONS.items() if arch.mlp_kind == "gated" or act == "gelu")
    if name not in names:
        raise ValueError(
            f"patch_hf: mlp: activation {arch.act_attr}={name!r} is not supported for a {arch.mlp_kind} MLP; "
            f"supported: {names} (pass mlp=False to keep the model's MLP)"
        )


@functools.cache
def _activations_by_class() -> dict[type, tuple[str, str | None]]:
    """transformers' activation module classes -> fastlm's (activation, gelu approximation), through
    transformers' own name -> class table. A class computes one function: "gelu" and "gelu_python" (exact GELU)
    share a class, as "gelu_pytorch_tanh" and "gelu_python_tanh" do."""
    from transformers.activations import ACT2CLS

    by_class = {}
    for name, act in ACTIVATIONS.items():
        cls = ACT2CLS[name]
        by_class[cls[0] if isinstance(cls, tuple) else cls] = act
    return by_class


def _mlp_forward(arch: Arch):
    """The MLP with fastlm's fused activation, the one the module itself holds (``arch.act_module``), read at
    each call: a class patched before loading serves models saved with any activation."""

    def forward(self, x):
        act_fn = getattr(self, arch.act_module)
        act = _activations_by_class().get(type(act_fn))
        if act is None or (arch.mlp_kind != "gated" and act[0] != "gelu"):
            return _fallback(self, f"mlp: activation {type(act_fn).__name__} is not supported")(x)
        if (own := _unsupported_dtype(self, "mlp", x.dtype)) is not None:
            return own(x)
        name, approximate = act
        if arch.mlp_kind == "gated":
            gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(swiglu(gate, up) if name == "silu" else geglu(gate, up, approximate))
        if arch.mlp_kind == "gpt2":
            # GPT-2's Conv1D projections (weight stored (in, out)) are kept as they are; only the activation fuses.
            return self.dropout(self.c_proj(gelu(self.c_fc(x), approximate)))
        return gelu(self.dense(x), approximate)

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
        if (own := _unsupported_dtype(self, "rope", hidden_states.dtype)) is not None:
            return own(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                       cache=cache, **kwargs)
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
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                hf_attention.eager_function(self))
    if "sliding_window" not in kwargs:
        window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        if window is not None:
            kwargs["sliding_window"] = window
    out, weights = attention_interface(self, q, k, v, attention_mask,
                                       dropout=0.0 if not self.training else self.attention_dropout,
                                       scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def _causal_lm_forward(arch: Arch, original):
    """With labels: the body's hidden states (``logits_to_keep`` of them, as in transformers) go straight into
    ``linear_cross_entropy`` with the head's weight (no logits tensor), with the loss keywords transformers'
    causal-LM loss takes: ``num_items_in_batch`` (the loss denominator), ``ignore_index``, ``shift_labels``.
    Logits are still computed in eval mode or with ``return_logits=True``. The output is transformers' own
    output class for this model, a tuple with ``return_dict=False``. Without labels: the original.
    ``functools.wraps`` gives it the original's signature, which the Trainer inspects to choose the dataset
    columns it passes and whether the model takes ``num_items_in_batch``."""
    from transformers import modeling_outputs
    from transformers.modeling_utils import slice_logits_to_keep
    from transformers.utils.generic import can_return_tuple

    output_class = getattr(modeling_outputs, arch.causal_lm_output)

    @can_return_tuple  # transformers' own handling of return_dict (a keyword, or the config's)
    def with_loss(self, *args, labels, return_logits, **kwargs):
        shift_labels = kwargs.pop("shift_labels", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        logits_to_keep = kwargs.pop("logits_to_keep", 0)
        outputs = getattr(self, arch.body_attr)(*args, return_dict=True, **kwargs)
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = self.get_output_embeddings()
        loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device), bias=head.bias,
                                    ignore_index=ignore_index, num_items=num_items)
        want_logits = return_logits if return_logits is not None else not self.training
        fields = {name: getattr(outputs, name, None) for name in output_class.__dataclass_fields__}
        return output_class(**{**fields, "loss": loss, "logits": head(hidden) if want_logits else None})

    @functools.wraps(original)
    def forward(self, *args, labels=None, return_logits=None, **kwargs):
        if labels is None:
            return original(self, *args, **kwargs)
        if (own := _unsupported_dtype(self, "loss", self.get_output_embeddings().weight.dtype)) is not None:
            return own(*args, labels=labels, **kwargs)
        return with_loss(self, *args, labels=labels, return_logits=return_logits, **kwargs)

    return forward


# ----------------------------------------------------------------------------- patching


def _arch(fn: str, model_type: str) -> Arch:
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{fn}: model type {model_type!r} is not supported; supported: {supported()}")
    return ARCHITECTURES[model_type]


def _check_flags(fn: str, flags: dict) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")


def _classes(arch: Arch, flags: dict) -> dict[str, str]:
    """Class name -> kind, for every class of this architecture the flags select."""
    out = {}
    if flags["norm"]:
        out.update(dict.fromkeys((*arch.norm_classes, *arch.post_norm_classes), "norm"))
    if flags["mlp"]:
        out[arch.mlp_class] = "mlp"
    if flags["rope"] and arch.rotary:
        out[arch.attention_class] = "rope"
    if flags["loss"] and arch.causal_lm_class is not None:
        out[arch.causal_lm_class] = "loss"
    return out


@functools.cache
def _replacement(model_type: str, class_name: str):
    """The forward that replaces ``class_name``'s in models of ``model_type`` (built once: patch_hf_class sets it
    on the class, patch_hf binds it to instances)."""
    arch = ARCHITECTURES[model_type]
    if class_name in arch.post_norm_classes:
        return _post_norm_forward
    if class_name in arch.norm_classes:
        return _norm_forward(arch.norm_kind, arch.eps_attr)
    if class_name == arch.mlp_class:
        return _mlp_forward(arch)
    if class_name == arch.attention_class:
        return _rope_attention_forward(arch.qk_norm)
    return _causal_lm_forward(arch, _original_forward(getattr(_modeling_module(model_type), class_name)))


class _BoundForward:
    """``module.forward`` after ``patch_hf``: the replacement forward of the module's class, bound to the module
    (``__self__`` and ``__func__`` as on a bound method, for code that unwraps one). A bound method pickles as
    ``getattr(module, function name)``, which no module has; this pickles as the module and the model type that
    rebuild it, so ``torch.save`` / ``torch.load`` and ``copy.deepcopy`` give a model patched as the original
    was, each forward bound to its own module."""

    def __init__(self, module, model_type: str):
        self.__self__, self.model_type = module, model_type
        cls = type(module)
        self.__func__ = _LINEAR_FORWARDS.get((cls.__module__, cls.__name__)) or _replacement(model_type, cls.__name__)

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return type(self), (self.__self__, self.model_type)

    @property
    def __signature__(self):
        # A bound method's (the causal-LM forward's is the original's): the Trainer and generate read it.
        return inspect.signature(types.MethodType(self.__func__, self.__self__))


def _skipped(arch: Arch, flags: dict, found: dict, model_cls: str) -> dict[str, str]:
    why = {}
    if flags["rope"] and not arch.rotary:
        why["rope"] = "this architecture has no rotary embedding"
    if flags["loss"] and not found.get("loss"):
        why["loss"] = f"{model_cls} has no causal-LM head ({arch.causal_lm_class or 'none for this architecture'})"
    return why


def patch_hf(model, norm=True, attention=True, mlp=True, rope=True, loss=True, linear=True) -> PatchReport:
    """Patch an instantiated ``transformers`` model in place (on its module instances); returns a PatchReport.

    ``linear``: every ``torch.nn.Linear`` and ``Conv1D`` (exact classes) runs fastlm's gemm (oneDNN for
    float32 on CPU, ~2x MKL on AVX-512 AMD processors; ``F.linear`` itself on CUDA).

    ``attention`` switches this model to ``attn_implementation="fastlm"`` (see fastlm.hf.attention for when it
    falls back to SDPA or the model's eager attention). ``loss``: a causal LM called with ``labels`` computes its
    loss with ``linear_cross_entropy`` from the hidden states, without a logits tensor; ``logits`` is None in
    training mode unless the call passes ``return_logits=True`` (eval mode returns them). One difference from
    transformers' loss, deliberate: a batch whose labels are all ignored has loss 0.0 (and zero gradients), not
    NaN, so one such micro-batch does not poison an accumulated step.

    Inputs in a dtype fastlm's kernels do not take (float64) and MLP activations they do not implement run the
    module's own forward, counted by ``fastlm.hf.fallback_counts()``. A patched model pickles (``torch.save``)
    and loads patched.

    Raises ValueError for a model type outside the table (listing the supported ones), for a selected kind
    that finds no module to patch, and for an activation fastlm does not implement. Patching twice replaces
    nothing more: the report counts the modules already patched in ``already_patched``.
    """
    flags = dict(norm=norm, attention=attention, mlp=mlp, rope=rope, loss=loss, linear=linear)
    _check_flags("patch_hf", flags)
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or config is None or not hasattr(config, "model_type"):
        raise TypeError(f"patch_hf: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    arch = _arch("patch_hf", config.model_type)
    if mlp:
        _check_activation(config, arch)
    report = PatchReport(config.model_type, counts={k: 0 for k, v in flags.items() if v})
    report.already_patched = dict(report.counts)
    by_class = _classes(arch, flags)
    # A post-norm block calls its LayerNorm's kernel itself (fused with the residual add): skip those norms.
    inside_post_norm = {id(m.LayerNorm) for m in model.modules() if type(m).__name__ in arch.post_norm_classes}
    targets = []
    for module in model.modules():
        kind = by_class.get(type(module).__name__)
        if flags["linear"] and _linear_target(module) is not None:
            kind = "linear"
        if kind is None or (flags["norm"] and id(module) in inside_post_norm):
            continue
        if kind == "norm" and isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) != 1:
            continue
        already = getattr(module, "_fastlm_patched", None) is not None
        (report.already_patched if already else report.counts)[kind] += 1
        if not already:
            targets.append((module, kind))
    if attention:
        n = sum(type(m).__name__ == arch.attention_class for m in model.modules())
        already = config._attn_implementation == hf_attention.NAME
        (report.already_patched if already else report.counts)["attention"] = n
    found = {k: report.counts[k] + report.already_patched[k] for k in report.counts}
    report.skipped = _skipped(arch, flags, found, type(model).__name__)
    missing = [k for k, n in found.items() if n == 0 and k not in report.skipped]
    if missing:  # checked before anything changes: a failed patch leaves the model as it was
        raise ValueError(
            f"patch_hf: found no {', '.join(missing)} module to patch in {type(model).__name__} "
            f"(model type {config.model_type!r}; expected classes: {_expected(arch)})"
        )
    for module, kind in targets:
        module.forward = _BoundForward(module, config.model_type)
        module._fastlm_patched = kind
    if attention:
        hf_attention.register()
        model.set_attn_implementation(hf_attention.NAME)
        report.attention = hf_attention.NAME
    return report


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


def patch_hf_class(model_type: str, norm=True, attention=True, mlp=True, rope=True, loss=True) -> PatchReport:
    """Patch the transformers classes of ``model_type`` (affects every model of that type in the process,
    including ones already built) until ``unpatch_hf_class(model_type)``; returns a PatchReport counting
    classes (those patched already in ``already_patched``). Attention is not a class patch: this registers
    "fastlm", and you pass ``attn_implementation="fastlm"`` to ``from_pretrained``. Neither are the projections:
    ``torch.nn.Linear`` and ``Conv1D`` are classes every model shares, so only ``patch_hf`` (on instances)
    switches them to fastlm's gemm. The MLP runs the activation each model's own module holds (read at each
    call); one fastlm does not implement runs the module's own forward, counted by ``fallback_counts()``."""
    flags = dict(norm=norm, attention=attention, mlp=mlp, rope=rope, loss=loss)
    _check_flags("patch_hf_class", flags)
    if not isinstance(model_type, str):
        raise TypeError(f"patch_hf_class: model_type must be a str, got {type(model_type).__name__}")
    arch = _arch("patch_hf_class", model_type)
    module = _modeling_module(model_type)
    report = PatchReport(model_type, counts={k: 0 for k, v in flags.items() if v})
    for name, kind in _classes(arch, flags).items():
        if name == "LayerNorm":
            report.skipped["norm"] = ("torch.nn.LayerNorm is torch's class, shared by every model; patch_hf patches "
                                      "its instances in a built model")
            continue
        cls = getattr(module, name, None)
        if cls is None:
            raise ValueError(f"patch_hf_class: transformers' {module.__name__} has no class {name}")
        fwd = _replacement(model_type, name)
        if cls.forward is fwd:
            report.already_patched[kind] = report.already_patched.get(kind, 0) + 1
            continue
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
    found = {k: report.counts.get(k, 0) + report.already_patched.get(k, 0) for k in flags}
    report.skipped.update(_skipped(arch, flags, found, arch.causal_lm_class or model_type))
    return report


def unpatch_hf_class(model_type: str) -> None:
    """Restore the classes ``patch_hf_class(model_type)`` replaced (a class shared with another patched
    model type is restored once no patched type uses it)."""
    keys = _OWNERS.pop(model_type, set())
    still_used = set().union(*_OWNERS.values()) if _OWNERS else set()
    for key in keys - still_used:
        cls, forward = _ORIGINALS.pop(key)
        cls.forward = forward
