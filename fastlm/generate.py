"""Text generation with a KV cache: ``fastlm.generate`` and the ``fastlm-generate`` command.

    import fastlm
    texts = fastlm.generate(model, tokenizer, ["KING.\\n", "To be"], max_new_tokens=50, temperature=0.8,
                            top_p=0.9, seed=0)

How a batch runs (``generate_ids``): the prompts are right-padded to a common length T and run
as one prefill that fills a ``KVCache`` (fastlm/models/transformer.py); the cache's per-row
lengths are then set to the true prompt lengths, so every row continues at its own position and
its pad slots are overwritten, never attended to. Each step then feeds one token per row
(``attention_with_kvcache`` appends it in place); on CPU that step runs in C++ for the models it
supports (``fastlm.models.decode`` states the rule; ``fastlm.use_backend("torch")`` turns it off).
Rows that reached EOS keep stepping (the batch stays rectangular) but their tokens are dropped; the
loop ends when every row is done or has ``max_new_tokens``.

Sampling: temperature 0 is greedy (argmax; top-k/top-p are then irrelevant); otherwise the
logits are divided by the temperature, cut to the ``top_k`` most likely tokens, then to the
smallest set whose probability reaches ``top_p`` (nucleus), and sampled from a
``torch.Generator`` seeded with ``seed``: the same seed, prompts and model give the same text.
"""

import math
from collections.abc import Callable, Sequence

import torch

from fastlm.models.decode import decode_step

# New tokens per prompt when max_new_tokens is None (fewer where the model's context has less room).
DEFAULT_NEW_TOKENS = 128


class GenerationError(ValueError):
    """A bad argument to ``generate``/``generate_ids`` (the CLI reports these as one line)."""


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``logits`` (B, V) with all but each row's ``k`` largest set to -inf (ties at the k-th value kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """``logits`` (B, V) with every token outside each row's nucleus set to -inf: the most likely
    tokens whose probabilities sum to at least ``p`` (always at least the top token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= p  # a token is needed while the mass above it is still short of p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row (B,) from fp32 logits (B, V)."""
    if temperature == 0:
        return logits.argmax(-1)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others to
    # -inf (sampling turns greedy) instead of overflowing to inf - inf = NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        logits = top_k_mask(logits, top_k)
    if top_p is not None:
        logits = top_p_mask(logits, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def _check_args(model, max_new_tokens, temperature, top_k, top_p) -> None:
    if not getattr(model, "cfg", None) or not model.cfg.causal:
        raise GenerationError("generate needs a causal fastlm Transformer (an MLM encoder does not generate "
                              "left to right)")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise GenerationError(f"max_new_tokens must be a positive integer or None, got {max_new_tokens!r}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise GenerationError(f"temperature must be finite and >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p!r}")


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                 eos_id: int | None = None, vocab_size: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Token-level generation: the new tokens of each prompt (token id lists), EOS excluded.

    ``max_new_tokens`` None: ``DEFAULT_NEW_TOKENS``, or as many as the model's context leaves after the
    longest prompt when that is fewer.
    ``vocab_size``: ids at or above it are never produced (the model's embedding is padded past
    the tokenizer's vocabulary). ``on_token(row, token)`` is called for every kept token as it is
    produced. The model runs in eval mode (restored afterwards) with its weights' dtype.
    """
    _check_args(model, max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("generate_ids: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    # The KV cache holds one context; a sliding-window model decodes within its window.
    context = min(model.cfg.max_seq_len, model.cfg.sliding_window or model.cfg.max_seq_len)
    room = context - longest + 1  # the last new token is never fed back: it needs no position
    if max_new_tokens is None:
        max_new_tokens = max(min(DEFAULT_NEW_TOKENS, room), 1)
    if max_new_tokens > room:
        raise GenerationError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                              f"context of {context} tokens; shorten the prompt or ask for fewer tokens")
    device = model.tok_emb.weight.device
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    ids = torch.zeros((B, longest), dtype=torch.long, device=device)  # (B, T), right-padded with token 0
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)

    was_training = model.training
    model.eval()
    try:
        step_fn = decode_step(model)  # after eval(): the rule looks at the mode
        # The last generated token is never fed back, so longest + max_new_tokens - 1 slots suffice.
        cache = model.new_kv_cache(B, longest + max_new_tokens - 1)
        h = model.hidden_states(ids, kv_cache=cache)  # (B, T, C): the prefill
        cache.set_lengths(lengths.to(torch.int32))
        logits = model.logits(h[torch.arange(B, device=device), lengths - 1])  # (B, V): after each last token
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(max_new_tokens):
            logits = logits.float()
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            tokens = next_tokens(logits, temperature, top_k, top_p, generator)  # (B,)
            for row, token in enumerate(tokens.tolist()):
                if done[row]:
                    continue
                if token == eos_id:
                    done[row] = True
                    continue
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
            if all(done) or step == max_new_tokens - 1:
                break
            logits = step_fn(tokens, cache)  # (B, V): one decode step
    finally:
        model.train(was_training)
    return out


class _Streamer:
    """Turns a row's tokens into text pieces as they come: decodes the row so far and emits what
    is new, holding back while the text ends in an incomplete UTF-8 character (a byte-level BPE
    token can carry part of one); ``finish`` emits what is held back when generation ends."""

    def __init__(self, tokenizer, rows: int, callback: Callable[[int, str], None]):
        self.tokenizer, self.callback = tokenizer, callback
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows

    def __call__(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        self._emit(row, final=False)

    def finish(self) -> None:
        for row in range(len(self.tokens)):
            self._emit(row, final=True)

    def _emit(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row])
        if (text.endswith("\ufffd") and not final) or len(text) <= self.sent[row]:
            return
        self.callback(row, text[self.sent[row]:])
        self.sent[row] = len(text)


def find_eos(tokenizer) -> int | None:
    """The tokenizer's end-of-text token id (by the names the trainer looks for), or None."""
    from fastlm.train import data  # the trainer's package: imported on use, not with fastlm

    return data.special_id(tokenizer, data.EOS_CANDIDATES, "end-of-text", required=False)


def generate(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, eos_id: int | None = None,
             stream: Callable[[int, str], None] | None = None) -> list[str]:
    """Continue each prompt; returns the generated texts (without the prompts), one per prompt.

    ``model``: a causal ``fastlm.models.Transformer``; ``tokenizer``: a ``tokenizers.Tokenizer``
    (the checkpoint's tokenizer.json). An empty prompt starts a new document (from the EOS token,
    which separates documents in training). ``max_new_tokens`` None: up to ``DEFAULT_NEW_TOKENS``, as
    many as the context leaves after the longest prompt. ``temperature`` 0 is greedy. ``seed``: None draws a
    fresh one. ``eos_id``: the token that ends a row (default: the tokenizer's end-of-text token;
    a row stops there, the EOS itself is not in the text). ``stream(index, text)``: called with
    each new piece of a prompt's text as soon as it is decoded.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("generate: prompts must be a string or a non-empty list of strings")
    if eos_id is None:
        eos_id = find_eos(tokenizer)
    ids = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
        if not tokens:
            if eos_id is None:
                raise GenerationError("generate: an empty prompt starts from the EOS token, but the tokenizer has none")
            tokens = [eos_id]
        ids.append(tokens)
    device = model.tok_emb.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    streamer = _Streamer(tokenizer, len(ids), stream) if stream is not None else None
    out = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, generator, eos_id,
                       tokenizer.get_vocab_size(), streamer)
    if streamer is not None:
        streamer.finish()
    return [tokenizer.decode(tokens) for tokens in out]
