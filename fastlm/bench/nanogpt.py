"""A nanoGPT-style GPT-2: the baseline issue #6 measures fastlm's training step against on the GPU.

What a researcher writes from the PyTorch docs for speed, without fastlm: ``nn.Linear`` /
``nn.LayerNorm`` / ``nn.GELU`` modules, ``F.scaled_dot_product_attention`` (flash or cuDNN on
the GPU), full logits and ``F.cross_entropy`` for the loss, ``torch.compile`` over the model
and fused AdamW (``fastlm.bench.train.step_fn``). Written for fastlm after nanoGPT's design,
not copied from it.

It computes the same function as ``fastlm.models.Transformer`` for a GPT-2 config (pre-norm
blocks, learned positions, tanh GELU, biases, tied embeddings, no dropout): ``from_fastlm``
copies a fastlm model's weights in, and tests/bench/test_nanogpt.py checks loss and
gradients against it, so the two providers time the same math.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fastlm.models import ModelConfig, Transformer


def supports(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` is a GPT-2 family config this baseline reproduces."""
    return (cfg.norm == "layernorm" and cfg.position == "learned" and cfg.mlp == "gelu" and cfg.bias
            and cfg.causal and cfg.tie_embeddings and cfg.sliding_window is None
            and cfg.n_kv_heads == cfg.n_heads)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) x3
        # (B, H, T, D): SDPA's layout
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not supports(cfg):
            raise ValueError("nanogpt.GPT: a GPT-2 config is needed (layernorm, learned positions, gelu, biases, "
                             "causal, tied embeddings, no GQA or sliding window)")
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, idx, targets):
        """Mean cross-entropy of next-token ``targets`` (B, T) given ``idx`` (B, T)."""
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V): the tied head
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def from_fastlm(model: Transformer) -> GPT:
    """A GPT holding copies of ``model``'s weights (same dtype and device)."""
    gpt = GPT(model.cfg).to(device=model.tok_emb.weight.device, dtype=model.tok_emb.weight.dtype)
    pairs = [(gpt.wte, model.tok_emb), (gpt.wpe, model.pos_emb), (gpt.ln_f, model.norm_f)]
    for ours, theirs in zip(gpt.blocks, model.blocks):
        # fastlm's qkv rows are [q | k | v], as c_attn's split expects.
        pairs += [(ours.ln_1, theirs.norm1), (ours.attn.c_attn, theirs.attn.qkv), (ours.attn.c_proj, theirs.attn.proj),
                  (ours.ln_2, theirs.norm2), (ours.mlp[0], theirs.mlp.fc1), (ours.mlp[2], theirs.mlp.fc2)]
    with torch.no_grad():
        for dst, src in pairs:
            for name, p in dst.named_parameters():
                p.copy_(getattr(src, name))
    return gpt
