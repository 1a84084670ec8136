"""fastlm.generate: greedy decoding through the KV cache equals greedy decoding that recomputes
the whole sequence each step, a ragged batch equals each prompt alone, EOS ends a row, the
top-k / top-p masks, seeded sampling, streaming, and the argument errors."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import fastlm
from fastlm.generate import GenerationError, generate_ids, next_tokens, top_k_mask, top_p_mask
from fastlm.models import ModelConfig, Transformer

# init_std 0.2: logits far from uniform, so greedy picks are not near-ties that rounding could flip.
FAMILIES = {
    "llama-gqa": lambda **kw: ModelConfig.llama(n_heads=4, n_kv_heads=2, **kw),
    "gpt2": lambda **kw: ModelConfig.gpt2(n_heads=4, **kw),
}
SMALL = dict(vocab_size=96, d_model=32, n_layers=2, max_seq_len=40, init_std=0.2)
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7], [33, 2, 71, 19]]


def _model(family="llama-gqa", **overrides):
    torch.manual_seed(0)
    return Transformer(FAMILIES[family](**{**SMALL, **overrides})).eval()


def _greedy_recomputed(model, prompt, n):
    """The reference: the plain forward over the whole sequence for every new token."""
    ids = torch.tensor([prompt], device=model.tok_emb.weight.device)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE (as fastlm-train builds) trained on a few lines, with an end-of-text token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["To be, or not to be, that is the question.", "KING. Now is the winter of our discontent.",
            "Caf\u00e9 na\u00efve \u00fcber \u4e16\u754c"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_with_cache_equals_recomputing_each_step(family):
    """One ragged batch through the cache; every row equals its greedy decode by the plain forward."""
    model = _model(family)
    out = generate_ids(model, PROMPTS, 9, temperature=0)
    for prompt, tokens in zip(PROMPTS, out):
        assert tokens == _greedy_recomputed(model, prompt, 9)


def test_sliding_window_models_decode_within_their_window():
    """Within the window the cache needs no window of its own; past it, generation refuses. 5 + 8 new
    tokens take 12 positions (the last new token is never fed back)."""
    model, prompt = _model(sliding_window=12), [4, 8, 15, 16, 23]
    assert generate_ids(model, [prompt], 8, temperature=0)[0] == _greedy_recomputed(model, prompt, 8)
    with pytest.raises(GenerationError, match="context of 12 tokens"):
        generate_ids(model, [prompt], 9, temperature=0)


def test_ragged_batch_equals_each_prompt_alone():
    model = _model()
    batch = generate_ids(model, PROMPTS, 12, temperature=0)
    assert batch == [generate_ids(model, [p], 12, temperature=0)[0] for p in PROMPTS]


def test_eos_ends_its_row_only():
    model = _model()
    free = generate_ids(model, PROMPTS, 8, temperature=0)
    eos = free[0][3]  # row 0 produces it at step 3
    out = generate_ids(model, PROMPTS, 8, temperature=0, eos_id=eos)
    for tokens, unstopped in zip(out, free):
        cut = unstopped.index(eos) if eos in unstopped else len(unstopped)
        assert tokens == unstopped[:cut]  # up to its first EOS, which is not returned
    assert len(out[0]) <= 3


def test_generation_stops_when_every_row_is_done(monkeypatch):
    model = _model()
    firsts = [tokens[0] for tokens in generate_ids(model, PROMPTS[:1], 1, temperature=0)]
    calls = []
    original = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    assert generate_ids(model, PROMPTS[:1], 20, temperature=0, eos_id=firsts[0]) == [[]]
    assert len(calls) == 1, "decoding went on after the only row produced EOS"


def test_top_k_mask_keeps_the_k_largest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    masked = top_k_mask(logits, 7)
    kept = torch.isfinite(masked)
    assert kept.sum(-1).tolist() == [7] * 4
    expected = torch.zeros_like(kept).scatter_(-1, logits.topk(7, dim=-1).indices, True)
    assert torch.equal(kept, expected)
    assert torch.equal(masked[kept], logits[kept])
    assert torch.equal(top_k_mask(logits, 50), logits)


def test_top_p_mask_keeps_the_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_mask(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.75) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.75
    assert kept(0.85) == [True, True, False, True]  # 0.8 does not: 0.15 joins
    assert kept(0.1) == [False, True, False, False]  # the top token always stays
    assert kept(1.0) == [True] * 4
    # Random rows against a direct reading of the definition.
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    masked = top_p_mask(logits, 0.7)
    for row, out in zip(logits, masked):
        order = row.softmax(-1).sort(descending=True)
        n = int((order.values.cumsum(0) < 0.7).sum()) + 1  # the fewest top tokens with mass >= 0.7
        assert set(torch.isfinite(out).nonzero()[:, 0].tolist()) == set(order.indices[:n].tolist())


def test_sampling_respects_the_masks():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(next_tokens(logits, 1.5, 1, None, gen), logits.argmax(-1))  # top-k 1 is greedy
        token = next_tokens(logits, 1.0, 5, 0.5, gen)
        allowed = torch.isfinite(top_p_mask(top_k_mask(logits, 5), 0.5))
        assert allowed[torch.arange(3), token].all()


def test_sampling_is_reproducible_from_the_seed(tokenizer):
    model = _model(vocab_size=320)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    first = fastlm.generate(model, tokenizer, ["To be", "KING."], seed=7, **kw)
    assert first == fastlm.generate(model, tokenizer, ["To be", "KING."], seed=7, **kw)
    assert first != fastlm.generate(model, tokenizer, ["To be", "KING."], seed=8, **kw)


def test_text_api_streams_what_it_returns(tokenizer):
    """Streamed pieces add up to the returned text, row by row; the ids past the tokenizer's
    vocabulary (the padded embedding rows) are never produced."""
    model = _model(vocab_size=320)
    pieces = {0: [], 1: []}
    texts = fastlm.generate(model, tokenizer, ["Caf\u00e9", "To be"], max_new_tokens=15, temperature=1.0, seed=0,
                            stream=lambda row, text: pieces[row].append(text))
    assert ["".join(pieces[0]), "".join(pieces[1])] == texts
    ids = generate_ids(model, [[1, 2]], 30, temperature=1.0, generator=torch.Generator().manual_seed(0),
                       vocab_size=tokenizer.get_vocab_size())[0]
    assert max(ids) < tokenizer.get_vocab_size()


def test_text_api_matches_the_token_api(tokenizer):
    """A string prompt is its tokens; an empty prompt starts from EOS (a new document)."""
    model = _model(vocab_size=320)
    eos = tokenizer.token_to_id("<|endoftext|>")
    prompt = tokenizer.encode("KING.", add_special_tokens=False).ids
    texts = fastlm.generate(model, tokenizer, ["KING.", ""], max_new_tokens=10, temperature=0)
    ids = generate_ids(model, [prompt, [eos]], 10, temperature=0, eos_id=eos, vocab_size=tokenizer.get_vocab_size())
    assert texts == [tokenizer.decode(t) for t in ids]
    assert fastlm.generate(model, tokenizer, "KING.", max_new_tokens=10, temperature=0) == texts[:1]


def test_restores_training_mode():
    model = _model().train()
    generate_ids(model, PROMPTS, 2, temperature=0)
    assert model.training


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(temperature=-0.5), "temperature must be finite and >= 0"),
    (dict(temperature=float("inf")), "temperature must be finite and >= 0"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=35), "exceeds the model's context of 40 tokens"),  # 7 + 35 - 1 positions
], ids=["no-tokens", "temperature", "temperature-inf", "top-k", "top-p-zero", "top-p-above-one", "too-long"])
def test_bad_arguments_raise(kwargs, message):
    model = _model()
    with pytest.raises(GenerationError, match=message):
        generate_ids(model, PROMPTS, **{"max_new_tokens": 4, **kwargs})


def test_the_whole_context_is_used_and_is_the_default_when_short():
    """A prompt of 7 tokens in a 40-token context leaves room for 34 new ones (the last is never fed
    back); max_new_tokens None takes them all when fewer than DEFAULT_NEW_TOKENS."""
    model = _model()
    prompt = PROMPTS[0]
    assert generate_ids(model, [prompt], 34, temperature=0) == [_greedy_recomputed(model, prompt, 34)]
    assert generate_ids(model, [prompt], None, temperature=0) == [_greedy_recomputed(model, prompt, 34)]


def test_a_tiny_temperature_samples_greedily():
    model = _model()
    greedy = generate_ids(model, PROMPTS, 6, temperature=0)
    assert generate_ids(model, PROMPTS, 6, temperature=1e-40, generator=torch.Generator().manual_seed(0)) == greedy


def test_bad_prompts_and_models_raise(tokenizer):
    with pytest.raises(GenerationError, match="every prompt needs at least one token"):
        generate_ids(_model(), [[1, 2], []], 4)
    with pytest.raises(GenerationError, match="needs a causal"):
        generate_ids(Transformer(ModelConfig.bert(n_heads=4, **SMALL)), [[1]], 4)
    with pytest.raises(TypeError, match="prompts must be a string or a non-empty list of strings"):
        fastlm.generate(_model(vocab_size=320), tokenizer, [[1, 2]])
