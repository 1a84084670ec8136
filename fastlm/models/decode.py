"""The decode step ``fastlm.generate`` runs: one new token per row through the Transformer and its KVCache.

Two implementations compute the same logits:

* the Python path, ``model.hidden_states(tokens[:, None], kv_cache=cache)`` then ``model.logits``:
  the reference, and what runs on GPU;
* the C++ path (``DecodePlan`` in csrc/cpu/decode.cpp): the whole step, embedding to logits, in one
  C++ call that chains the same ATen matmuls with fastlm's norm, rope and activation kernels. On CPU a
  decode step of a small model is bound by per-op overhead (each of the ~40 op calls of the Python
  path costs tens of microseconds of dispatch around a kernel of under one), which the C++ step
  does not pay.

The rule (``decode_step``): the C++ step runs when the op ``decode_step`` resolves to ``cpp`` (it is
registered with ``fastlm.backend``, so ``backend_info()`` lists it: CPU tensors under ``auto`` or a
forced ``cpp``) and ``cpp_unsupported(model)`` finds nothing: the model is a plain fastlm
``Transformer`` (its own Block/Attention/MLP, fastlm ``Linear`` and norm modules, no forward
hooks: anything else could compute something the C++ step does not know about), on CPU, fp32 or
bf16, causal, in eval mode, under no_grad and without CPU autocast. Otherwise the Python path runs:
``fastlm.use_backend("torch")`` keeps it plain PyTorch, and a forced ``triton`` or ``cuda`` runs the
Python path with those ops.
"""

from collections.abc import Callable

import torch
from torch import nn

from fastlm import backend
from fastlm.extension import cpu_extension
from fastlm.models.transformer import MLP, Attention, Block, KVCache, Transformer
from fastlm.nn import LayerNorm, Linear, RMSNorm

Step = Callable[[torch.Tensor, KVCache], torch.Tensor]
"""(tokens (B,) int64, cache) -> logits (B, V); appends the tokens' keys/values and advances the cache.
A step's ``backend`` attribute says which one it is: ``"cpp"`` or ``"torch"`` (the Python path)."""

CPP_DTYPES = (torch.float32, torch.bfloat16)


def _python_step(model: Transformer) -> Step:
    def step(tokens, cache):
        h = model.hidden_states(tokens[:, None], kv_cache=cache)  # (B, 1, C)
        return model.logits(h[:, 0])  # (B, V)

    step.backend = "torch"
    return step


def _eps(norm: nn.Module, dtype: torch.dtype) -> float:
    # torch.nn.RMSNorm's eps=None means the dtype's machine epsilon (as fastlm.nn.RMSNorm.forward).
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def cpp_unsupported(model) -> str | None:
    """None when the C++ decode step computes exactly what ``model``'s Python path does, else why not."""
    if type(model) is not Transformer:
        return f"the model is a {type(model).__name__}, not a plain fastlm Transformer"
    cfg = model.cfg
    if not cfg.causal:
        return "the model is not causal"
    weight = model.tok_emb.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}"
    if weight.dtype not in CPP_DTYPES:
        return f"the weights are {weight.dtype} (C++ step: {', '.join(map(str, CPP_DTYPES))})"
    if any(p.dtype != weight.dtype or p.device != weight.device for p in model.parameters()):
        return "the parameters do not share one dtype and device"
    if model.training:
        return "the model is in training mode"
    if torch.is_grad_enabled():
        return "grad mode is on"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    norm_type = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
    eps = _eps(model.norm_f, weight.dtype)
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a {type(module).__name__} has forward hooks"
    for block in model.blocks:
        parts = {block: Block, block.attn: Attention, block.mlp: MLP, block.attn.qkv: Linear,
                 block.attn.proj: Linear, block.mlp.fc1: Linear, block.mlp.fc2: Linear,
                 block.norm1: norm_type, block.norm2: norm_type}
        for module, expected in parts.items():
            if type(module) is not expected:
                return f"a block holds a {type(module).__name__} where the model builds a {expected.__name__}"
        if _eps(block.norm1, weight.dtype) != eps or _eps(block.norm2, weight.dtype) != eps:
            return "the norms do not share one eps"
    if type(model.norm_f) is not norm_type or (model.head is not None and type(model.head) is not Linear):
        return "the final norm or the head is not the module the model builds"
    return None


def _plan(model: Transformer):
    """The model's weights gathered for the C++ step (by reference: nothing is copied)."""
    cfg = model.cfg
    layers = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        layers.append([
            block.norm1.weight, getattr(block.norm1, "bias", None), attn.qkv.weight, attn.qkv.bias,
            attn.proj.weight, attn.proj.bias, block.norm2.weight, getattr(block.norm2, "bias", None),
            mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
        ])
    rope = model.rope_cos is not None
    return cpu_extension().DecodePlan(
        model.tok_emb.weight,
        model.pos_emb.weight if model.pos_emb is not None else None,
        # The tables are fp32 (the op casts them the same way): model.to(bf16) also casts buffers.
        model.rope_cos.float().contiguous() if rope else None,
        model.rope_sin.float().contiguous() if rope else None,
        layers,
        model.norm_f.weight,
        getattr(model.norm_f, "bias", None),
        model.output_weight,
        cfg.n_heads,
        cfg.n_kv_heads,
        _eps(model.norm_f, model.tok_emb.weight.dtype),
        cfg.norm == "rmsnorm",
        cfg.mlp == "swiglu",
        0 if cfg.mlp == "swiglu" else 1,  # act_fwd_cpu's codes: SiLU, GELU (tanh)
    )


def _cpp_step(model: Transformer) -> Step:
    plan = _plan(model)

    def step(tokens, cache):
        return plan.step(tokens, cache.k, cache.v, cache.seqlens)

    step.backend = "cpp"
    return step


backend.register("decode_step", cpp=_cpp_step, torch=_python_step)


def decode_step(model) -> Step:
    """The decode step for ``model`` by the module docstring's rule. Built once per generation: the C++
    plan holds the current parameter tensors, so it must be rebuilt after they are replaced."""
    if backend.requested_backend() in ("triton", "cuda"):
        return _python_step(model)  # the Python path, its ops on the forced backend
    factory = backend.select("decode_step", model.tok_emb.weight.device)
    if factory is _cpp_step and cpp_unsupported(model) is not None:
        return _python_step(model)
    return factory(model)
