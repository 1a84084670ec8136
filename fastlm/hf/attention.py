"""fastlm attention as a ``transformers`` attention implementation (``attn_implementation="fastlm"``).

transformers builds the attention mask with its SDPA mask function (registered for "fastlm" too), which
returns None whenever the pattern is plain causal (or plain bidirectional) with no padding: then fastlm's
flash attention runs. Packed sequences run the varlen kernel when transformers passes ``cu_seq_lens_q/k``
(e.g. ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``). A padding mask without a cache
offset (training, prefill) and packing described only by position_ids (``DataCollatorWithFlattening``)
are recognised -- every kept token (one that sees itself) sees exactly the kept keys of its own sequence,
causally or not, checked against the mask itself -- and run the varlen kernel on the kept tokens. Rows that
do not see themselves are computed as transformers computes them: one that sees no key (left padding under a
causal mask) gives zeros, as SDPA does; one that sees some (a right-padded position, a hole in a 2-D mask, any
padded position of a bidirectional model) attends to exactly the keys its mask row allows, in a second varlen
call where rows allowing the same keys form one sequence. Sliding windows (Mistral, Qwen2) run as fastlm
windows, with padding too.

Anything else falls back for that call, counted by ``fallback_counts()`` with the reason: to transformers'
SDPA function for a decode step over a padded or windowed cache, chunked prefill over a cache, a window over
a mask with holes, padded rows whose key sets together hold more keys than the layer (gathering them would
cost more memory than the dense call), position bias, a dtype or head dim fastlm does not support; to the
model's own eager attention function where SDPA cannot run the call either: attention weights requested
(``output_attentions=True``), softcapping (Gemma 2), attention sinks.

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
import sys
import weakref
from collections import Counter
from typing import NamedTuple

import torch

from fastlm import backend
from fastlm.ops.attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, attention, runs_torch_backend

NAME = "fastlm"
DENSE_TRAINING_ON_TORCH_BACKEND = (
    "dense attention with gradients on fastlm's PyTorch attention backend: SDPA directly (no backward rerun)"
)
NOT_VARLEN = "an attention mask that is not padding/packing (decode step, window over holes, chunked prefill)"
SCATTERED_ROWS = "padded rows that see keys but not themselves, in key sets holding more keys than the layer has"
_log = logging.getLogger(__name__)
_fallbacks: Counter = Counter()


def fallback_counts() -> dict[str, int]:
    """How many calls ran transformers' own code instead of fastlm's kernels since the last reset, per reason:
    attention's (SDPA, or the model's eager function) and, prefixed with their kind ("norm: ..."), those of the
    forwards ``patch_hf`` replaces."""
    return dict(_fallbacks)


def reset_fallback_counts() -> None:
    _fallbacks.clear()


def count_fallback(reason: str) -> None:
    """Count one call that runs transformers' own code (logged the first time for each reason)."""
    if not _fallbacks[reason]:
        _log.info("fastlm: running transformers' own code (%s)", reason)
    _fallbacks[reason] += 1


def _weights_requested(kwargs) -> bool:
    """Whether the caller wants attention weights: most models pass ``output_attentions`` down to the attention
    function; GPT-2's body drops it, and only transformers' output collector (which records the weights each
    attention module returns) knows."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # a private API (transformers 5.24): where it moved, only the keyword tells
        return False
    collecting = _active_collector.get()
    return collecting is not None and "attentions" in collecting


def _eager_only_reason(kwargs) -> str | None:
    """Why neither fastlm nor transformers' SDPA function can run this call (SDPA returns no weights, refuses
    softcap and ignores attention sinks), or None."""
    if _weights_requested(kwargs):
        return "attention weights requested"
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            return f"{name} is not supported"
    return None


def _fallback_reason(query, key, value, packed, kwargs) -> str | None:
    """Why SDPA runs this call instead of fastlm, or None."""
    if kwargs.get("position_bias") is not None:
        return "position_bias is not supported"
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


def eager_function(module):
    """The model's own eager attention function ("eager" is not in transformers' registry: each modeling file
    defines its own)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _eager_attention(module, query, key, value, attention_mask, causal: bool, **kwargs):
    """The model's eager function on the mask built for SDPA: eager functions add a float mask to the scores
    (transformers' ``eager_mask`` is the bool mask as 0 / the dtype's minimum), and always need one."""
    mask = attention_mask
    if mask is None and causal and query.shape[2] > 1:
        # Skipped for SDPA's is_causal, which is top-left aligned (in a prefill into an empty static cache the
        # keys past the queries are empty slots): the same pattern, written out.
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    return eager_function(module)(module, query, key, value, mask, **kwargs)


class _Varlen(NamedTuple):
    """One varlen attention call on a layer's (batch * seqlen) flattened tokens: the tokens ``q_index`` attend
    to the tokens ``k_index``, split into sequences by ``cu_q`` / ``cu_k``."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool
    window: tuple[int, int] | None


def _cu(lengths):
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _window(sliding_window, causal: bool):
    """fastlm's (left, right) window for transformers' sliding window, which keeps keys with
    q - k < sliding_window: left = sliding_window - 1."""
    return (int(sliding_window) - 1, 0 if causal else -1) if sliding_window else None


def _segments(position_ids, batch: int, seqlen: int):
    """(batch, seqlen) index of the packed sequence each token belongs to (a new one wherever the position
    does not follow the previous token's), or None without position_ids."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != seqlen:
        return None
    pos = position_ids.expand(batch, seqlen)
    return (torch.diff(pos, dim=-1, prepend=pos[:, :1] - 1) != 1).cumsum(-1)


def _kept_call(m, kept, causal: bool, position_ids, sliding_window):
    """The varlen call of the kept tokens, if each sees exactly the kept keys of its own sequence (split where
    position_ids restart), causally if ``causal``, the last ``sliding_window`` of them if given; else None."""
    batch, seqlen = kept.shape
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
    if not torch.equal(m[kept], allowed[kept]):
        return None
    group = (torch.arange(batch, device=m.device)[:, None] * (seqlen + 1) + segments)[kept]
    tokens = kept.flatten().nonzero().squeeze(1)
    # The kernel's window counts kept tokens, the mask counts positions: equal without holes.
    holes = ((tokens[1:] - tokens[:-1]) != 1) & (group[1:] == group[:-1])
    if sliding_window and holes.any():
        return None
    lengths = torch.unique_consecutive(group, return_counts=True)[1]
    max_len = int(lengths.max())
    return _Varlen(tokens, tokens, _cu(lengths), _cu(lengths), max_len, max_len, causal,
                   _window(sliding_window, causal))


def _blind_call(m, rows):
    """The varlen call of the ``rows`` (bool (batch, seqlen): rows that see keys but not themselves): each
    attends, non-causally, to exactly the keys its mask row allows; rows of one batch element allowing the same
    keys share a sequence. SCATTERED_ROWS if those key sets together hold more keys than the layer: the
    gathered copies would then outweigh the dense call's memory."""
    batch, seqlen = rows.shape
    b, p = rows.nonzero(as_tuple=True)
    # The batch element (one-hot) is part of the pattern: equal rows of two elements see different tokens.
    patterns, group = torch.unique(torch.cat([torch.nn.functional.one_hot(b, batch).bool(), m[b, p]], 1), dim=0,
                                   return_inverse=True)
    owner, keys = patterns[:, :batch].nonzero()[:, 1], patterns[:, batch:]
    key_counts = keys.sum(1)
    if int(key_counts.sum()) > batch * seqlen:
        return SCATTERED_ROWS
    key_group, key_pos = keys.nonzero(as_tuple=True)
    q_counts = torch.bincount(group, minlength=len(patterns))
    queries = (b * seqlen + p)[torch.argsort(group, stable=True)]
    return _Varlen(queries, owner[key_group] * seqlen + key_pos, _cu(q_counts), _cu(key_counts),
                   int(q_counts.max()), int(key_counts.max()), False, None)


def _analyse(mask, causal: bool, position_ids, sliding_window):
    """The varlen calls that compute attention under the (batch, 1, s, s) bool ``mask`` exactly (see the module
    docstring), or why they cannot (a fallback reason)."""
    if not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3]):
        return NOT_VARLEN
    m = mask[:, 0]
    kept = m.diagonal(dim1=1, dim2=2)
    calls = []
    if kept.any():
        call = _kept_call(m, kept, causal, position_ids, sliding_window)
        if call is None:
            return NOT_VARLEN
        calls.append(call)
    rows = ~kept & m.any(-1)  # rows that see no key at all stay zero, as in SDPA
    if rows.any():
        call = _blind_call(m, rows)
        if isinstance(call, str):
            return call
        calls.append(call)
    return tuple(calls) if calls else NOT_VARLEN


# The last analysis: transformers passes the same mask (and position_ids) to every layer of one forward. Keyed on the
# tensors' identity and version counters, so a buffer reused with a pattern written in place is analysed again.
_plan_cache: list = [(), None, None]  # weak references to (mask, position_ids), (versions, flags), plan


def _unpad_plan(mask, causal: bool, position_ids, sliding_window):
    """``_analyse``'s answer, cached (see _plan_cache)."""
    tensors = (mask, position_ids)
    if any(t is not None and t.is_inference() for t in tensors):
        # Inference tensors keep no version counter: an in-place write in inference mode would go unseen.
        return _analyse(mask, causal, position_ids, sliding_window)
    key = (tuple(None if t is None else t._version for t in tensors), causal, sliding_window)
    refs, cached_key, plan = _plan_cache
    if cached_key == key and all((r() if r is not None else None) is t for r, t in zip(refs, tensors)):
        return plan
    plan = _analyse(mask, causal, position_ids, sliding_window)
    _plan_cache[:] = [tuple(None if t is None else weakref.ref(t) for t in tensors), key, plan]
    return plan


def fastlm_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                             **kwargs):
    """The AttentionInterface function: query/key/value (batch, heads, seqlen, headdim); returns
    ((batch, seqlen, heads, headdim), attention weights or None) like transformers' SDPA and eager functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    reason = _eager_only_reason(kwargs)
    if reason is not None:
        count_fallback(reason)
        return _eager_attention(module, query, key, value, attention_mask, causal, dropout=dropout, scaling=scaling,
                                **kwargs)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    packed = cu_q is not None and cu_k is not None
    reason = _fallback_reason(query, key, value, packed, kwargs)
    if reason is None and _sdpa_is_the_kernel(query, key, value, attention_mask, packed):
        reason = DENSE_TRAINING_ON_TORCH_BACKEND
    plan = None
    if reason is None and attention_mask is not None and not packed:
        plan = NOT_VARLEN
        if attention_mask.shape[0] == query.shape[0]:
            plan = _unpad_plan(attention_mask, causal, kwargs.get("position_ids"), kwargs.get("sliding_window"))
        if isinstance(plan, str):
            reason = plan
    if reason is not None:
        count_fallback(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    window = _window(kwargs.get("sliding_window"), causal)
    if packed:
        out = attention(q[0], k[0], v[0], causal=causal, softmax_scale=scaling, window=window, dropout_p=dropout,
                        cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
                        max_seqlen_q=kwargs.get("max_length_q"), max_seqlen_k=kwargs.get("max_length_k"))
        return out.unsqueeze(0), None
    if plan is not None:
        batch, seqlen, heads = q.shape[:3]
        q, k, v = (t.reshape(batch * seqlen, *t.shape[2:]) for t in (q, k, v))
        out = q.new_zeros(batch * seqlen, heads, v.shape[-1])
        for call in plan:
            part = attention(q.index_select(0, call.q_index), k.index_select(0, call.k_index),
                             v.index_select(0, call.k_index), causal=call.causal, softmax_scale=scaling,
                             window=call.window, dropout_p=dropout, cu_seqlens_q=call.cu_q, cu_seqlens_k=call.cu_k,
                             max_seqlen_q=call.max_q, max_seqlen_k=call.max_k)
            out = out.index_copy(0, call.q_index, part)
        return out.view(batch, seqlen, heads, -1), None
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
