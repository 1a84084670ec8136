"""fastlm attention as a ``transformers`` attention implementation (``attn_implementation="fastlm"``).

transformers builds the attention mask with its SDPA mask function (registered for "fastlm" too), which
returns None whenever the pattern is plain causal (or plain bidirectional) with no padding: then fastlm's
flash attention runs. Packed sequences run the varlen kernel when transformers passes ``cu_seq_lens_q/k``
(e.g. ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``). A padding mask without a cache
offset (training, prefill) and packing described only by position_ids (``DataCollatorWithFlattening``)
are recognised -- every kept token sees exactly the kept keys of its own sequence, causally or not,
checked against the mask itself -- and run the varlen kernel on the kept tokens; padded positions'
outputs are zeros there (transformers' SDPA leaves other values there, which nothing reads).
Sliding windows (Mistral, Qwen2) run as fastlm windows, with padding too. Anything else (a decode step
over a padded or windowed cache, chunked prefill over a cache, attention weights requested, softcap,
sinks, position bias, a head dim fastlm does not support) falls back to transformers' SDPA function for
that call; ``fallback_counts()`` says how often and why.

One more case runs transformers' SDPA function, by measurement: plain dense attention (no mask, not packed)
that needs gradients, where fastlm's attention would run its PyTorch backend under ``FASTLM_BACKEND=auto``
(on CPU: fp16/bf16 or dropout; fp32 runs the C++ kernel). That backend IS SDPA, and its backward reruns
the SDPA forward (it keeps no statistics), so calling SDPA directly is the same math without the rerun: a
Llama 2x128 training step at seq 128 took 0.95x unpatched transformers' speed with it and 1.09x without
(``benchmarks/plain_process_ab.py hf-quick``). For fp32 on CPU the C++ kernel was measured against this
rule, patched/unpatched speed: 1.08x vs 1.13x at 2x128, 1.15x vs 1.05x at 4x512 (seq 512), so fp32 keeps the
kernel. It is counted in ``fallback_counts()`` under ``DENSE_TRAINING_ON_TORCH_BACKEND``; forcing a backend
(``use_backend("torch")``) runs fastlm's attention.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter

import torch

from fastlm import backend
from fastlm.ops.attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, attention, runs_torch_backend

NAME = "fastlm"
DENSE_TRAINING_ON_TORCH_BACKEND = (
    "dense attention with gradients on fastlm's PyTorch attention backend: SDPA directly (no backward rerun)"
)
_log = logging.getLogger(__name__)
_fallbacks: Counter = Counter()


def fallback_counts() -> dict[str, int]:
    """How many attention calls fell back to SDPA since the last reset, per reason."""
    return dict(_fallbacks)


def reset_fallback_counts() -> None:
    _fallbacks.clear()


def _fallback_reason(query, key, value, attention_mask, packed, kwargs) -> str | None:
    if kwargs.get("output_attentions"):
        return "attention weights requested"
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return "k/v head dims differ from q's"
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        return f"head dim {head_dim} is not a multiple of 8 in [8, {MAX_HEAD_DIM}]"
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not supported"
    if packed:
        return "packed sequences with batch > 1" if query.shape[0] != 1 else None
    return None


@torch.compiler.assume_constant_result
def _auto_runs_torch_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fastlm's attention runs its PyTorch backend for this call under "auto" (a constant to
    torch.compile, which cannot trace the backend choice's context variable)."""
    return backend.requested_backend() == "auto" and runs_torch_backend(device, dtype, 0.0)


def _sdpa_is_the_kernel(query, key, value, attention_mask, packed) -> bool:
    """Plain dense attention needing gradients where fastlm's attention would run SDPA plus a backward rerun
    (see the module docstring)."""
    return (
        attention_mask is None and not packed and query.shape[2] == key.shape[2]
        and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        and _auto_runs_torch_attention(query.device, query.dtype)
    )


# The last mask analysed: transformers passes the same mask (and position_ids) to every layer of one forward.
_plan_cache: list = [None, None, None, None]


def _segments(position_ids, batch: int, seqlen: int):
    """(batch, seqlen) index of the packed sequence each token belongs to (a new one wherever the position
    does not follow the previous token's), or None without position_ids."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != seqlen:
        return None
    pos = position_ids.expand(batch, seqlen)
    return (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)


def _unpad_plan(mask, causal: bool, position_ids, sliding_window):
    """If the (batch, 1, s, s) bool mask is padding and packing only -- each kept token (one that sees
    itself) sees exactly the kept keys of its own sequence (split where position_ids restart), causally if
    ``causal``, the last ``sliding_window`` of them if given -- return (kept token indices, cu_seqlens, max
    length) for the varlen kernel, else None."""
    mask_ref, pos_ref, cached_key, plan = _plan_cache
    if mask_ref is not None and mask_ref() is mask and cached_key == (causal, sliding_window) and (
            (pos_ref is None and position_ids is None) or (pos_ref is not None and pos_ref() is position_ids)):
        return plan
    plan = None
    if mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]:
        m = mask[:, 0]
        batch, seqlen = m.shape[:2]
        kept = m.diagonal(dim1=1, dim2=2)
        allowed = kept[:, None, :].expand_as(m)
        segments = _segments(position_ids, batch, seqlen)
        if segments is None:
            segments = torch.zeros_like(kept, dtype=torch.long)
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
        index = torch.arange(seqlen, device=m.device)
        distance = index[:, None] - index[None, :]
        if causal:
            allowed = allowed & (distance >= 0)
        if sliding_window:
            allowed = allowed & (distance < sliding_window)
        if kept.any() and torch.equal(m[kept], allowed[kept]):
            group = (torch.arange(batch, device=m.device)[:, None] * (seqlen + 1) + segments)[kept]
            tokens = kept.flatten().nonzero().squeeze(1)
            # The kernel's window counts kept tokens, the mask counts positions: equal without holes.
            holes = ((tokens[1:] - tokens[:-1]) != 1) & (group[1:] == group[:-1])
            if sliding_window and holes.any():
                _plan_cache[:] = [weakref.ref(mask), _weak(position_ids), (causal, sliding_window), None]
                return None
            lengths = torch.unique_consecutive(group, return_counts=True)[1]
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            plan = tokens, cu, int(lengths.max())
    _plan_cache[:] = [weakref.ref(mask), _weak(position_ids), (causal, sliding_window), plan]
    return plan


def _weak(t):
    return None if t is None else weakref.ref(t)


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """The AttentionInterface function: query/key/value (batch, heads, seqlen, headdim); returns
    ((batch, seqlen, heads, headdim), None) like transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = cu_q is not None and cu_k is not None
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason = _fallback_reason(query, key, value, attention_mask, packed, kwargs)
    if reason is None and _sdpa_is_the_kernel(query, key, value, attention_mask, packed):
        reason = DENSE_TRAINING_ON_TORCH_BACKEND
    plan = None
    if reason is None and attention_mask is not None and not packed:
        if attention_mask.shape[0] == query.shape[0]:
            plan = _unpad_plan(attention_mask, causal, kwargs.get("position_ids"), kwargs.get("sliding_window"))
        if plan is None:
            reason = "an attention mask that is not padding/packing (decode step, window, chunked prefill)"
    if reason is not None:
        if not _fallbacks[reason]:
            _log.info("fastlm attention: falling back to SDPA (%s)", reason)
        _fallbacks[reason] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    sliding_window = kwargs.get("sliding_window")
    # transformers' sliding window keeps keys with q - k < sliding_window: left = sliding_window - 1.
    window = (int(sliding_window) - 1, 0 if causal else -1) if sliding_window else None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if packed:
        out = attention(q[0], k[0], v[0], causal=causal, softmax_scale=scaling, window=window, dropout_p=dropout,
                        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
                        max_seqlen_q=kwargs.get("max_length_q"), max_seqlen_k=kwargs.get("max_length_k"))
        return out.unsqueeze(0), None
    if plan is not None:
        kept, cu, max_len = plan
        batch, seqlen, heads = q.shape[:3]
        pick = [t.reshape(batch * seqlen, *t.shape[2:]).index_select(0, kept) for t in (q, k, v)]
        out = attention(*pick, causal=causal, softmax_scale=scaling, window=window, dropout_p=dropout,
                        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)
        full = out.new_zeros(batch * seqlen, heads, out.shape[-1]).index_copy(0, kept, out)
        return full.view(batch, seqlen, heads, -1), None
    q_len, kv_len = q.shape[1], k.shape[1]
    if causal and 1 < q_len < kv_len:
        # The mask was skipped for a prefill into an empty static cache: the keys past q_len are empty slots
        # (transformers' SDPA path crops them the same way); fastlm's causal is bottom-right aligned.
        k, v = k[:, :q_len], v[:, :q_len]
    out = attention(q, k, v, causal=causal, softmax_scale=scaling, window=window, dropout_p=dropout)
    return out, None


def register() -> None:
    """Register "fastlm" with transformers' attention and mask registries (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, fastlm_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
