"""The seams between the model and the fused ops: attention, the MLP activations, RoPE, the loss.

Each ``*_torch`` function here has exactly the signature of the fastlm op it stands for and
computes the same thing in plain PyTorch; the model calls the names bound at the end of this
file. Switching the model to a fused op is one line there (``attention = fastlm.attention``).
Layouts follow FlashAttention:
``(batch, seqlen, nheads, headdim)``, or packed ``(total_tokens, nheads, headdim)`` with
``cu_seqlens`` (int32, ``[0, len_0, len_0 + len_1, ..., total]``) marking the sequences.
"""

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- attention (seam: fastlm.attention)
def attention_torch(q, k, v, causal=False, softmax_scale=None, dropout_p=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
                    max_seqlen_q=None, max_seqlen_k=None):
    """Softmax attention; GQA when k/v have fewer heads than q (nheads must be a multiple of them).

    Dense: q (B, Tq, H, D), k/v (B, Tk, Hkv, D) -> (B, Tq, H, D).
    Varlen: q (total_q, H, D), k/v (total_k, Hkv, D) with cu_seqlens_q/k and max_seqlen_q/k;
    each sequence attends only within itself -> (total_q, H, D).
    dropout_p drops attention probabilities (model.attn_dropout; the model passes 0 in eval).
    """
    if cu_seqlens_q is None:
        return _sdpa(q, k, v, causal, softmax_scale, dropout_p, None)
    # Varlen: scatter the sequences into a padded (nseq, max_seqlen, H, D) batch, mask the
    # padding keys, attend, gather back. Memory is nseq * max_seqlen^2 per head, never total^2.
    qp, q_index = _pad(q, cu_seqlens_q, max_seqlen_q)
    kp, k_index = _pad(k, cu_seqlens_k, max_seqlen_k)
    vp, _ = _pad(v, cu_seqlens_k, max_seqlen_k)
    key_valid = torch.arange(max_seqlen_k, device=k.device)[None, :] < cu_seqlens_k.diff()[:, None]  # (nseq, Tk)
    mask = key_valid[:, None, None, :]  # (nseq, 1, 1, Tk)
    if causal:
        mask = mask & torch.ones(max_seqlen_q, max_seqlen_k, dtype=torch.bool, device=q.device).tril()
    out = _sdpa(qp, kp, vp, False, softmax_scale, dropout_p, mask)  # (nseq, Tq, H, D)
    return out[q_index]  # (total_q, H, D)


def _pad(x, cu_seqlens, max_seqlen):
    """(total, H, D) -> (nseq, max_seqlen, H, D) zero-padded, and the (seq, pos) index of each token."""
    total = x.shape[0]
    tokens = torch.arange(total, device=x.device)
    seq = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)  # (total,)
    pos = tokens - cu_seqlens.long()[seq]  # (total,)
    padded = x.new_zeros(cu_seqlens.numel() - 1, max_seqlen, *x.shape[1:])
    padded[seq, pos] = x
    return padded, (seq, pos)


def _sdpa(q, k, v, causal, softmax_scale, dropout_p, mask):
    """(B, T, H, D) layout around F.scaled_dot_product_attention's (B, H, T, D); repeats k/v heads for GQA."""
    groups = q.shape[-2] // k.shape[-2]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-2)
        v = v.repeat_interleave(groups, dim=-2)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p,
        is_causal=causal and mask is None, scale=softmax_scale,
    )
    return out.transpose(1, 2)


# ------------------------------------------------------ MLP activations (seams: fastlm.swiglu, GELU)
def swiglu_torch(gate, up):
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up


def gelu_torch(x):
    """GELU, tanh approximation (GPT-2's and BERT's)."""
    return F.gelu(x, approximate="tanh")


# ------------------------------------------------------------------------ RoPE (seam: fastlm.rope)
def rope_torch(q, k, cos, sin, position_ids=None, interleaved=False):
    """Rotate q (..., T, H, D) and k (..., T, Hkv, D) by their positions; returns (q, k).

    cos, sin: (max_seqlen, D // 2). Position t uses row ``position_ids[..., t]`` (shape
    q.shape[:-2]) when given, else t. Non-interleaved (GPT-NeoX / Llama) rotates the halves
    (x[:D/2], x[D/2:]); interleaved rotates the pairs (x[0::2], x[1::2]).
    """
    if position_ids is None:
        position_ids = torch.arange(q.shape[-3], device=q.device)
    c = cos[position_ids].unsqueeze(-2)  # (..., T, 1, D/2)
    s = sin[position_ids].unsqueeze(-2)
    return _rotate(q, c, s, interleaved), _rotate(k, c, s, interleaved)


def _rotate(x, c, s, interleaved):
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


def rope_cache(max_seqlen, head_dim, theta, device=None):
    """cos, sin tables (max_seqlen, head_dim // 2) in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seqlen, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


# --------------------------------------------------------- loss (seam: fastlm.linear_cross_entropy)
def linear_cross_entropy_torch(hidden, weight, target, bias=None, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, z_loss=0.0, num_items=None):
    """cross_entropy(hidden @ weight.T + bias, target): hidden (N, C), weight (V, C), target (N,).

    z_loss adds z_loss * logsumexp(logits)^2 per token (PaLM). num_items, when given, divides
    the summed loss instead of the count of non-ignored targets (for gradient accumulation).
    Here the logits are materialized in fp32; the fused op never materializes them.
    """
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)  # (N,)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (num_items if num_items is not None else valid.sum().clamp(min=1))


# ------------------------------------------------------------------------------------- the seams
# What the model calls. Each becomes the fused op, same signature, when that op lands.
attention = attention_torch  # -> fastlm.attention
swiglu = swiglu_torch  # -> fastlm.swiglu
gelu = gelu_torch  # -> the fused GELU of fastlm.nn.GELUMLP
rope = rope_torch  # -> fastlm.rope
linear_cross_entropy = linear_cross_entropy_torch  # -> fastlm.linear_cross_entropy
