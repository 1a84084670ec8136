"""fastlm.models.decode: the C++ decode step against the Python path (the reference) after a
ragged prefill, logits and caches, for every family it supports; greedy generation through it
against recomputing the whole sequence; the rule that picks it; and its input errors."""

import copy

import pytest
import torch

import fastlm
from fastlm.generate import generate_ids
from fastlm.models import ModelConfig, Transformer, layers
from fastlm.models.decode import _cpp_step, _plan, _python_step, cpp_unsupported, decode_step
from fastlm.ops import attention_ref
from fastlm.testing import assert_matches_reference
from tests.models.test_transformer import _float64_model

# init_std 0.2: logits far from uniform, so greedy picks are not near-ties that rounding could flip.
# Head dim 16, GQA 4 query heads on 2 key/value heads, an odd vocabulary.
SMALL = dict(vocab_size=97, d_model=64, n_layers=2, max_seq_len=40, init_std=0.2)
FAMILIES = {
    "llama-gqa": lambda: ModelConfig.llama(n_heads=4, n_kv_heads=2, **SMALL),
    "llama-gqa-tied": lambda: ModelConfig.llama(n_heads=4, n_kv_heads=2, tie_embeddings=True, **SMALL),
    "qwen2-qkv-bias": lambda: ModelConfig.llama(n_heads=4, n_kv_heads=2, qkv_bias=True, rope_theta=1e6, **SMALL),
    "gpt2": lambda: ModelConfig.gpt2(n_heads=4, **SMALL),
}
PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [12, 7], [33, 2, 71, 19]]
TOKENS = torch.tensor([7, 50, 91])  # the next token of each prompt
SLOTS = 12


def _model(family):
    torch.manual_seed(0)
    model = Transformer(FAMILIES[family]()).eval()
    if model.cfg.bias or model.cfg.qkv_bias:
        # Nonzero biases (they init to zero), so a bias the step dropped would show.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.2)
    return model


def _prefilled(model):
    """The KV cache after generate_ids' right-padded prefill of PROMPTS (each row at its own length)."""
    ids = torch.zeros((len(PROMPTS), max(map(len, PROMPTS))), dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        ids[row, :len(prompt)] = torch.tensor(prompt)
    cache = model.new_kv_cache(len(PROMPTS), SLOTS)
    model.hidden_states(ids, kv_cache=cache)
    cache.set_lengths(torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32))
    return cache


def _clone(cache):
    twin = copy.copy(cache)
    twin.k, twin.v = [t.clone() for t in cache.k], [t.clone() for t in cache.v]
    twin.seqlens = cache.seqlens.clone()
    return twin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_cpp_step_matches_the_python_path(family, dtype, monkeypatch):
    """One step from a ragged cache. Logits and the new keys/values of every layer: against the float64
    model's full forward over each prompt and its new token, within the FlashAttention rule of the Python
    path in ``dtype``. Layer 0's new keys/values also equal the Python path's bit for bit (the same matmul
    and rope kernel); later layers' inputs went through the two attentions, whose summation orders differ,
    and the processor's BLAS carries that rounding on (the rule, not a fixed ulp count, bounds it)."""
    model = _model(family).to(dtype)
    cache = _prefilled(model)
    base_cache, before = _clone(cache), _clone(cache)
    baseline = _python_step(model)(TOKENS, base_cache)
    out = _cpp_step(model)(TOKENS, cache)
    ref_model = _float64_model(model, monkeypatch)
    new_kv = []  # each layer's (keys, values) of the float64 forward, in order
    monkeypatch.setattr(layers, "attention", lambda q, k, v, **kw: new_kv.append((k, v)) or attention_ref(q, k, v, **kw))
    ref, truth = [], []
    for prompt, token in zip(PROMPTS, TOKENS.tolist()):
        new_kv.clear()
        ref.append(ref_model(torch.tensor([prompt + [token]]))[0, -1])
        truth.append([(k[0, -1], v[0, -1]) for k, v in new_kv])  # the new token's, per layer
    assert out.dtype == dtype
    assert_matches_reference("logits", out, torch.stack(ref), baseline, dtype)
    lengths = [len(p) + 1 for p in PROMPTS]
    assert cache.seqlens.tolist() == base_cache.seqlens.tolist() == lengths
    for layer in range(model.cfg.n_layers):
        for row, n in enumerate(lengths):
            for name, got, want, true in (("k", cache.k, base_cache.k, truth[row][layer][0]),
                                          ("v", cache.v, base_cache.v, truth[row][layer][1])):
                got, want = got[layer][row], want[layer][row]
                assert torch.equal(got[:n - 1], want[:n - 1])  # the prefill's slots are kept
                if layer == 0:
                    assert torch.equal(got[n - 1], want[n - 1])
                assert_matches_reference(f"layer {layer} {name} row {row}", got[n - 1], true, want[n - 1], dtype)
    # Slots past each row's new token (pad slots of the prefill) are left alone.
    for got, old in zip(cache.k + cache.v, before.k + before.v):
        for row, n in enumerate(lengths):
            torch.testing.assert_close(got[row, n:], old[row, n:], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_through_the_cpp_step_equals_recomputing_each_step(family):
    model = _model(family)
    with torch.no_grad():
        assert decode_step(model).backend == "cpp"
        out = generate_ids(model, PROMPTS, 6, temperature=0)
        for prompt, tokens in zip(PROMPTS, out):
            ids = torch.tensor([prompt])
            for _ in range(6):
                ids = torch.cat([ids, model(ids)[0, -1].argmax().view(1, 1)], dim=1)
            assert tokens == ids[0, len(prompt):].tolist()


@torch.no_grad()
def test_the_rule_picks_cpp_only_where_it_computes_the_same():
    model = _model("llama-gqa")
    assert decode_step(model).backend == "cpp"
    assert fastlm.backend_info()["ops"]["decode_step"]["cpu"]["backend"] == "cpp"
    with fastlm.use_backend("torch"):
        assert decode_step(model).backend == "torch"  # the torch backend stays plain PyTorch
    with torch.enable_grad():
        assert "grad" in cpp_unsupported(model)
    assert "training" in cpp_unsupported(model.train())
    model.eval()
    handle = model.blocks[0].mlp.register_forward_hook(lambda *args: None)
    assert "hooks" in cpp_unsupported(model)
    assert decode_step(model).backend == "torch"
    handle.remove()
    assert "float16" in cpp_unsupported(copy.deepcopy(model).half())
    model.blocks[1].attn.qkv = torch.nn.Sequential(model.blocks[1].attn.qkv)  # e.g. an adapter around it
    assert "Sequential" in cpp_unsupported(model)


@torch.no_grad()
def test_bad_inputs_raise_clear_errors():
    model = _model("gpt2")
    step, cache = _cpp_step(model), _prefilled(model)
    with pytest.raises(TypeError, match="tokens must be int64"):
        step(TOKENS.int(), cache)
    with pytest.raises(ValueError, match=r"tokens must be a 1-D CPU tensor .* got shape \[3, 1\]"):
        step(TOKENS[:, None], cache)
    with pytest.raises(ValueError, match=r"seqlens must be a contiguous CPU tensor of shape \(2\)"):
        step(TOKENS[:2], cache)
    short = _clone(cache)
    short.k = short.k[:1]
    with pytest.raises(ValueError, match="expected 2 key and value caches, got 1 and 2"):
        step(TOKENS, short)
    wrong = _clone(cache)
    wrong.v = [t.double() for t in wrong.v]
    with pytest.raises(TypeError, match="caches must have the weights' dtype Float, got Double"):
        step(TOKENS, wrong)
    full = _clone(cache)
    full.seqlens[1] = SLOTS
    with pytest.raises(ValueError, match=f"row 1's cache length {SLOTS} leaves no free slot"):
        step(TOKENS, full)
    long = _clone(cache)  # a cache longer than the model's 40 positions (a KVCache refuses to be)
    long.k, long.v = [torch.zeros(3, 48, 4, 16) for _ in range(2)], [torch.zeros(3, 48, 4, 16) for _ in range(2)]
    long.seqlens[2] = 40
    with pytest.raises(ValueError, match="row 2's position 40 is past the model's 40 positions"):
        step(TOKENS, long)
    assert torch.equal(cache.seqlens, torch.tensor([len(p) for p in PROMPTS], dtype=torch.int32))
    model.blocks[0].attn.proj.weight = torch.nn.Parameter(torch.zeros(64, 40))
    with pytest.raises(ValueError, match=r"proj weight must have shape \[64, 64\], got \[64, 40\]"):
        _plan(model)
