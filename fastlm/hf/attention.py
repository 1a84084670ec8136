"""fastlm attention as a ``transformers`` attention implementation (``attn_implementation="fastlm"``).

transformers builds the attention mask with its SDPA mask function (registered for "fastlm" too), which
returns None whenever the pattern is plain causal (or plain bidirectional) with no padding: then fastlm's
flash attention runs. Packed sequences run the varlen kernel when transformers passes ``cu_seq_lens_q/k``
(e.g. ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``). Anything that cannot be expressed as
causal/bidirectional/varlen/sliding-window (a padding mask, packing described only by position_ids, chunked
prefill over a cache, attention weights requested, softcap, sinks, position bias, a head dim fastlm does not
support) falls back to transformers' SDPA function for that call; ``fallback_counts()`` says how often and why.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from fastlm.ops.attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, attention

NAME = "fastlm"
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
    if attention_mask is not None:
        return "an explicit attention mask (padding, position_ids packing or chunked prefill)"
    return None


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """The AttentionInterface function: query/key/value (batch, heads, seqlen, headdim); returns
    ((batch, seqlen, heads, headdim), None) like transformers' SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = cu_q is not None and cu_k is not None
    reason = _fallback_reason(query, key, value, attention_mask, packed, kwargs)
    if reason is not None:
        if not _fallbacks[reason]:
            _log.info("fastlm attention: falling back to SDPA (%s)", reason)
        _fallbacks[reason] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    sliding_window = kwargs.get("sliding_window")
    # transformers' sliding window keeps keys with q - k < sliding_window: left = sliding_window - 1.
    window = (int(sliding_window) - 1, 0 if causal else -1) if sliding_window else None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if packed:
        out = attention(q[0], k[0], v[0], causal=causal, softmax_scale=scaling, window=window, dropout_p=dropout,
                        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
                        max_seqlen_q=kwargs.get("max_length_q"), max_seqlen_k=kwargs.get("max_length_k"))
        return out.unsqueeze(0), None
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
