"""A Transformer built on fastlm's fused ops: Llama-, GPT-2- and BERT-style in one readable file.

    from fastlm.models import ModelConfig, Transformer
    model = Transformer(ModelConfig.llama(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8))
    loss = model(input_ids, targets)                          # causal LM: targets = inputs shifted by one
    loss = model(input_ids, targets, cu_seqlens, max_seqlen)  # packed documents (varlen attention)

Shapes: B batch rows, T tokens per row, C = d_model, H query heads, K key/value heads,
D = C / H head dim, V vocab, F MLP width, N = B * T.

Blocks are pre-norm, and every norm also performs the residual add before it in the same pass
(``norm(x, residual) -> (norm(x + residual), x + residual)``), so a block is

    h, r = norm1(x, r)                # r: the residual stream; x: the previous branch's output
    x = dropout(attn(h))
    h, r = norm2(x, r)
    x = dropout(mlp(h))               # added to r by the next block's norm1 (or the final norm)

The loss goes through ``linear_cross_entropy`` so the (N, V) logits are never kept for backward
once the fused op is in (see ``fastlm/models/layers.py``, the seams to the fused ops).

Decoding (``fastlm.generate`` drives it): a ``KVCache`` holds every layer's keys and values;
``hidden_states(ids, kv_cache=cache)`` runs the new tokens only, appends their keys/values in place
(``attention_with_kvcache``) and advances the cache, so the prompt is one call (the prefill) and
each generated token one more.

Initialization: embeddings and linear weights ~ N(0, init_std); the two projections that write
into the residual stream in each block (attention output, MLP down) ~ N(0, init_std / sqrt(2 L))
so the residual variance stays O(1) with depth (GPT-2); biases 0; norm weights 1.
"""

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastlm.models import layers
from fastlm.models.config import ModelConfig
from fastlm.nn import LayerNorm, Linear, RMSNorm


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Preallocated keys and values of every layer, for decoding one token at a time.

    ``k[l]``, ``v[l]``: (B, S, K, D) for layer l, S = ``max_len`` slots per row.
    ``seqlens`` (B,) int32: the slots of row b that hold its tokens; a forward with the cache
    writes its T new keys/values of row b at slots seqlens[b] .. seqlens[b] + T - 1, attends over
    slots 0 .. seqlens[b] + T - 1 (causally), rotates/places them at those positions, and then
    advances ``seqlens`` by T.

    Ragged prompts in one batch are right-padded: the prefill runs the padded (B, T) block, then
    the caller sets ``seqlens`` to the true lengths (``set_lengths``). A pad slot lies past its
    row's length, so it is never attended to and the row's next token overwrites it; each row's
    positions are its own token indices, exactly as if it ran alone (no left-pad offsets).
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"KVCache: max_len ({max_len}) exceeds the model's max_seq_len ({cfg.max_seq_len})")
        if cfg.sliding_window is not None and max_len > cfg.sliding_window:
            # Within the window every token sees all earlier ones, so the cache needs no window of its own.
            raise ValueError(f"KVCache: max_len ({max_len}) exceeds the model's sliding_window ({cfg.sliding_window}); "
                             "decoding past the window is not supported")
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)  # (B, S, K, D)
        # Uninitialized: attention reads only slots below seqlens, which were written first.
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # (B,)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, seqlens) for block ``index``."""
        return self.k[index], self.v[index], self.seqlens

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Rows' true lengths after a right-padded prefill (pad slots past them are free again)."""
        self.seqlens.copy_(lengths)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
                          bias=cfg.bias or cfg.qkv_bias)
        # Sliding window: a query sees itself and window - 1 keys before it.
        self.window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
        self.proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.proj.residual_projection = True

    def forward(self, x, rope_cache, position_ids, cu_seqlens, max_seqlen, kv_cache=None):
        """``kv_cache``: this layer's (k, v, seqlens) from ``KVCache.layer`` when decoding."""
        cfg = self.cfg
        B, T, C = x.shape
        H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)  # (B, T, H*D), (B, T, K*D), (B, T, K*D)
        q, k, v = q.view(B, T, H, D), k.view(B, T, K, D), v.view(B, T, K, D)
        if rope_cache is not None:
            q, k = layers.rope(q, k, *rope_cache, position_ids=position_ids)  # (B, T, H, D), (B, T, K, D)
        dropout_p = cfg.attn_dropout if self.training else 0.0
        if kv_cache is not None:
            k_cache, v_cache, seqlens = kv_cache  # (B, S, K, D) x2, (B,)
            # Appends k, v to the caches in place at each row's length, then attends over all of the row's keys
            # (no window needed: a KVCache is never longer than the sliding window).
            y = layers.attention_with_kvcache(q, k_cache, v_cache, seqlens, k, v, causal=cfg.causal)  # (B, T, H, D)
        elif cu_seqlens is None:
            y = layers.attention(q, k, v, causal=cfg.causal, window=self.window, dropout_p=dropout_p)  # (B, T, H, D)
        else:
            y = layers.attention(
                q.reshape(B * T, H, D), k.reshape(B * T, K, D), v.reshape(B * T, K, D), causal=cfg.causal,
                window=self.window, dropout_p=dropout_p, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
            )  # (N, H, D)
        return self.proj(y.reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp == "swiglu"
        # SwiGLU: one matmul computes gate and up together: (C) -> (2F).
        self.fc1 = Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_ff, bias=cfg.bias)
        self.fc2 = Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.fc2.residual_projection = True

    def forward(self, x):
        # fc1 (C -> 2F or F), the activation (-> F), fc2 (-> C) in one autograd node that keeps
        # only x and fc1's output for backward and recomputes the activation there.
        return layers.fused_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                                "silu" if self.gated else "gelu_tanh", self.gated)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = _norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x, residual, rope_cache, position_ids, cu_seqlens, max_seqlen, kv_cache=None):
        """x: the previous branch's output (B, T, C), not yet added to ``residual`` (None in block 0)."""
        if residual is None:
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1(x.to(residual.dtype), residual)  # (B, T, C) x2; fused add + norm
        x = self.dropout(self.attn(h, rope_cache, position_ids, cu_seqlens, max_seqlen, kv_cache))  # (B, T, C)
        h, residual = self.norm2(x.to(residual.dtype), residual)
        x = self.dropout(self.mlp(h))  # (B, T, C)
        return x, residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.dropout = nn.Dropout(cfg.embd_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = _norm(cfg)
        if cfg.causal:
            self.mlm_dense = self.mlm_norm = None
        else:
            # BERT's MLM head: dense + GELU + norm before the (tied) decoder, which has a bias.
            self.mlm_dense = Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
            self.mlm_norm = _norm(cfg)
        self.head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head_bias = None if cfg.causal else nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.position == "rope":
            cos, sin = layers.rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta, scaling=cfg.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, D/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.reset_parameters()

    def reset_parameters(self):
        """The documented init (module docstring): N(0, std), residual projections N(0, std / sqrt(2L))."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(module, "residual_projection", False) else 1
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, (LayerNorm, RMSNorm)):
                module.reset_parameters()
        if self.head_bias is not None:
            nn.init.zeros_(self.head_bias)

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, C): the LM / MLM decoder matrix (the token embedding when tied)."""
        return self.tok_emb.weight if self.head is None else self.head.weight

    def hidden_states(self, input_ids, cu_seqlens=None, max_seqlen=None, position_ids=None, kv_cache=None):
        """Final normed hidden states (B, T, C).

        Packed rows: ``cu_seqlens`` (int32) marks the documents in the flattened (B*T) tokens;
        attention stays within each, positions restart at each (unless ``position_ids`` is given).
        Decoding: with a ``KVCache``, ``input_ids`` are the tokens that follow each row's cached
        ones (positions continue from ``kv_cache.seqlens``); their keys/values join the cache.
        """
        B, T = input_ids.shape
        if kv_cache is not None and (cu_seqlens is not None or self.cfg.activation_checkpointing and self.training):
            raise ValueError("hidden_states: kv_cache is for inference on unpacked rows (no cu_seqlens, no "
                             "activation checkpointing in training mode)")
        longest = T if cu_seqlens is None else max_seqlen
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"input has sequences of {longest} tokens but model.max_seq_len is {self.cfg.max_seq_len}")
        if position_ids is None:
            if kv_cache is not None:
                steps = torch.arange(T, device=input_ids.device)
                position_ids = kv_cache.seqlens.long()[:, None] + steps  # (B, T): each row continues its own
            elif cu_seqlens is None:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
            else:
                tokens = torch.arange(B * T, device=input_ids.device)
                doc = torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True)
                position_ids = (tokens - cu_seqlens.long()[doc]).view(B, T)  # (B, T), restarting per document
        x = self.tok_emb(input_ids)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)  # (B, T, C)
        x = self.dropout(x)
        rope_cache = (self.rope_cos, self.rope_sin) if self.rope_cos is not None else None
        residual = None
        for i, block in enumerate(self.blocks):
            if self.cfg.activation_checkpointing and self.training:
                x, residual = checkpoint(block, x, residual, rope_cache, position_ids, cu_seqlens, max_seqlen,
                                         use_reentrant=False)
            else:
                layer_cache = kv_cache.layer(i) if kv_cache is not None else None
                x, residual = block(x, residual, rope_cache, position_ids, cu_seqlens, max_seqlen, layer_cache)
        if kv_cache is not None:
            kv_cache.seqlens += T  # every layer has appended its T keys/values
        h, _ = self.norm_f(x.to(residual.dtype), residual)  # (B, T, C)
        return h

    def logits(self, h):
        """Hidden states (..., C) -> logits (..., V) through the LM / MLM head."""
        return layers.linear(self._head_input(h), self.output_weight, self.head_bias)

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty ``KVCache`` for ``batch`` rows of up to ``max_len`` tokens, in the weights' dtype and device."""
        if not self.cfg.causal:
            raise ValueError("a KV cache needs a causal model (an MLM encoder does not decode left to right)")
        weight = self.tok_emb.weight
        return KVCache(self.cfg, batch, max_len, weight.dtype, weight.device)

    def _head_input(self, h):
        if self.mlm_dense is None:
            return h
        return self.mlm_norm(layers.gelu(self.mlm_dense(h)))

    def forward(self, input_ids, targets=None, cu_seqlens=None, max_seqlen=None, position_ids=None,
                ignore_index=-100, num_items=None):
        """With ``targets`` (B, T): the mean cross-entropy over targets != ignore_index (a scalar;
        ``num_items`` overrides the count). Without: the logits (B, T, V)."""
        h = self.hidden_states(input_ids, cu_seqlens, max_seqlen, position_ids)  # (B, T, C)
        if targets is None:
            return self.logits(h)  # (B, T, V)
        h, targets = h.flatten(0, 1), targets.flatten()  # (N, C), (N,)
        if not self.cfg.causal:
            # MLM: only the ~15% selected positions need the head at all.
            keep = targets != ignore_index
            h, targets = h[keep], targets[keep]  # (M, C), (M,)
        return layers.linear_cross_entropy(self._head_input(h), self.output_weight, targets, bias=self.head_bias,
                                           ignore_index=ignore_index, num_items=num_items)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor once; optionally without the token and position tables
        (a tied output head is the token table, so it goes too)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            for table in (self.tok_emb, self.pos_emb):
                if table is not None:
                    params.pop(id(table.weight))
        return sum(p.numel() for p in params.values())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), for MFU: 6 per weight of every matmul
        (blocks and output head; embedding lookups are free) plus 12 * L * C * T for the attention
        scores and values (the PaLM paper's count, which ignores causal masking)."""
        cfg = self.cfg
        seq_len = seq_len or cfg.max_seq_len
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        matmul += 0 if self.head is not None else self.tok_emb.weight.numel()
        return 6 * matmul + 12 * cfg.n_layers * cfg.d_model * seq_len
