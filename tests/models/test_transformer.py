"""fastlm.models: the Transformer on the fused ops against itself on the torch backend and on
the float64 references, packing, init, parameter and FLOP counts, and that it learns."""

import math

import pytest
import torch

import fastlm
from fastlm.models import ModelConfig, Transformer, layers
from fastlm.nn.mlp import fused_mlp_ref
from fastlm.ops import attention_ref, gelu_ref, linear_cross_entropy_ref, rope_ref
from fastlm.ops.norm import layer_norm_ref, rms_norm_ref
from fastlm.testing import assert_matches_reference

FAMILIES = {
    "llama-gqa": lambda **kw: ModelConfig.llama(n_heads=4, n_kv_heads=2, **kw),
    "gpt2": lambda **kw: ModelConfig.gpt2(n_heads=4, **kw),
    "bert": lambda **kw: ModelConfig.bert(n_heads=4, **kw),
}
# Head dim 8: fastlm.attention takes multiples of 8.
SMALL = dict(vocab_size=97, d_model=32, n_layers=2, max_seq_len=32)


def _batch(B=3, T=13, V=97):
    inputs = torch.randint(0, V, (B, T))
    targets = torch.randint(0, V, (B, T))
    targets[:, ::4] = -100  # ignored positions (MLM unselected, padding)
    cu_seqlens = torch.tensor([0, 5, 13, 20, 26, 39], dtype=torch.int32)  # 5 documents, boundaries inside rows
    return inputs, targets, cu_seqlens, 13


def _loss_and_grads(model, inputs, targets, cu_seqlens, max_seqlen):
    model.zero_grad()
    loss = model(inputs, targets, cu_seqlens, max_seqlen)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _float64_model(model, monkeypatch):
    """``model`` in float64 on the reference ops (the fused ops take no float64)."""
    ref_model = Transformer(model.cfg).double().train(model.training)
    ref_model.load_state_dict(model.state_dict())
    monkeypatch.setattr(fastlm.nn.norm, "layer_norm", layer_norm_ref)
    monkeypatch.setattr(fastlm.nn.norm, "rms_norm", rms_norm_ref)
    monkeypatch.setattr(layers, "attention", attention_ref)
    monkeypatch.setattr(layers, "fused_mlp", fused_mlp_ref)
    monkeypatch.setattr(layers, "gelu", lambda x: gelu_ref(x, approximate="tanh"))
    monkeypatch.setattr(layers, "rope", rope_ref)
    monkeypatch.setattr(layers, "linear_cross_entropy", linear_cross_entropy_ref)
    return ref_model


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_matches_torch_reference_ops(family, packed, monkeypatch):
    """The model on fastlm's default backend (the C++ kernels on CPU) vs the same model on the
    torch backend, both fp32, against the float64 model (FlashAttention rule). The fused ops
    take no float64, so the float64 model runs their references."""
    model = Transformer(FAMILIES[family](**SMALL))
    inputs, targets, cu, max_seqlen = _batch()
    if not packed:
        cu = max_seqlen = None
    loss, grads = _loss_and_grads(model, inputs, targets, cu, max_seqlen)
    with fastlm.use_backend("torch"):
        base_loss, base_grads = _loss_and_grads(model, inputs, targets, cu, max_seqlen)
    ref_model = _float64_model(model, monkeypatch)
    ref_loss, ref_grads = _loss_and_grads(ref_model, inputs, targets, cu, max_seqlen)
    assert_matches_reference("loss", loss, ref_loss, base_loss, torch.float32)
    for name in grads:
        assert_matches_reference(f"grad {name}", grads[name], ref_grads[name], base_grads[name], torch.float32,
                                 grad=True)


def test_model_matches_torch_reference_ops_where_its_matmuls_run_onednn(monkeypatch, onednn_gemm):
    """The same comparison at a size where the CPU matmuls run oneDNN (fastlm.ops.gemm), forward and backward."""
    from fastlm.ops.gemm import onednn_available

    model = Transformer(FAMILIES["llama-gqa"](vocab_size=1151, d_model=128, n_layers=2, max_seq_len=64))
    inputs, targets = torch.randint(0, 1151, (4, 64)), torch.randint(0, 1151, (4, 64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, grads = _loss_and_grads(model, inputs, targets, None, None)
    if onednn_available():
        assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
    with fastlm.use_backend("torch"):
        base_loss, base_grads = _loss_and_grads(model, inputs, targets, None, None)
    ref_loss, ref_grads = _loss_and_grads(_float64_model(model, monkeypatch), inputs, targets, None, None)
    assert_matches_reference("loss", loss, ref_loss, base_loss, torch.float32)
    for name in grads:
        assert_matches_reference(f"grad {name}", grads[name], ref_grads[name], base_grads[name], torch.float32,
                                 grad=True)


def test_packed_positions_restart_at_each_document():
    """A document packed after another gives the same hidden states as the document alone."""
    for family in FAMILIES:
        model = Transformer(FAMILIES[family](**SMALL)).eval()
        doc_a, doc_b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 10))
        packed = torch.cat([doc_a, doc_b], dim=1)  # (1, 16)
        cu = torch.tensor([0, 6, 16], dtype=torch.int32)
        h_packed = model.hidden_states(packed, cu, 10)
        torch.testing.assert_close(h_packed[:, 6:], model.hidden_states(doc_b), atol=1e-5, rtol=1e-5)


def test_init_scales_residual_projections_and_counts():
    cfg = ModelConfig.gpt2(vocab_size=512, d_model=128, n_layers=8, n_heads=4, max_seq_len=64)
    model = Transformer(cfg)
    std = model.blocks[0].mlp.fc2.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.1 * 0.02 / math.sqrt(16)
    assert abs(model.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    C, F, L, V = 128, 512, 8, 512
    per_block = (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C) + 4 * C
    assert model.num_params() == V * C + 64 * C + L * per_block + 2 * C
    assert model.num_params(exclude_embeddings=True) == L * per_block + 2 * C
    matmul = L * (C * 3 * C + C * C + C * F + F * C) + V * C
    assert model.flops_per_token(64) == 6 * matmul + 12 * L * C * 64
    untied = Transformer(ModelConfig.llama(vocab_size=512, d_model=128, n_layers=2, n_heads=4))
    assert untied.num_params() - untied.num_params(exclude_embeddings=True) == 512 * 128


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = FAMILIES["llama-gqa"](**SMALL, resid_dropout=0.1)
    model = Transformer(cfg)
    inputs, targets, cu, max_seqlen = _batch()
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, inputs, targets, cu, max_seqlen)
    model.cfg.activation_checkpointing = True
    torch.manual_seed(1)
    loss_ckpt, grads_ckpt = _loss_and_grads(model, inputs, targets, cu, max_seqlen)
    torch.testing.assert_close(loss_ckpt, loss)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name])


@pytest.mark.parametrize("family", ["llama-gqa", "bert"])
def test_loss_decreases_on_a_tiny_corpus(family):
    """A few dozen AdamW steps on a repeating sequence drive the loss well below ln(V)."""
    model = Transformer(FAMILIES[family](**SMALL))
    text = torch.arange(32).repeat(4) % 17 + 3  # (128,) a periodic "corpus"
    rows = text.view(4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        if model.cfg.causal:
            loss = model(rows[:, :-1], rows[:, 1:])
        else:
            masked = rows.clone()
            targets = torch.full_like(rows, -100)
            pick = torch.rand(rows.shape) < 0.3
            targets[pick], masked[pick] = rows[pick], 1
            loss = model(masked, targets)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.8 * math.log(97)
    assert loss.item() < 0.5 * first


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by model.n_heads"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="multiple of model.n_kv_heads"):
        ModelConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="model.norm must be one of"):
        ModelConfig(norm="batchnorm")
    assert ModelConfig.llama(d_model=96, n_heads=4).d_ff == 256  # 8/3 * 96 rounded up to 64


@pytest.mark.parametrize("family", list(FAMILIES))
def test_runs_under_bf16_autocast(family):
    """The GPU training path's dtype plumbing (bf16 branches joining an fp32 residual stream, fused
    norms on mixed dtypes), exercised with CPU autocast."""
    model = Transformer(FAMILIES[family](**SMALL))
    inputs, targets, cu, max_seqlen = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, targets, cu, max_seqlen)
    loss.backward()
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_kv_cache_decoding_matches_the_full_forward(family, monkeypatch):
    """Ragged rows right-padded into one prefill, then three one-token steps through the KV cache:
    each step's logits are the full forward's logits at that position (every row at its own
    length), fp32 against the float64 model with the fp32 full forward as the baseline."""
    model = Transformer(FAMILIES[family](**SMALL, init_std=0.2)).eval()
    lengths = [7, 3, 5]
    full = torch.randint(0, 97, (3, 7 + 3))  # row b: its prompt is full[b, :lengths[b]], then 3 more tokens
    cache = model.new_kv_cache(3, 10)
    prompt = full[:, :7].clone()
    for row, n in enumerate(lengths):
        prompt[row, n:] = 0  # padding: never attended to, overwritten by the next tokens
    with torch.no_grad():
        h = model.hidden_states(prompt, kv_cache=cache)  # (3, 7, C)
        cache.set_lengths(torch.tensor(lengths, dtype=torch.int32))
        cached = [model.logits(h[torch.arange(3), torch.tensor(lengths) - 1])]  # (3, V) per step
        for step in range(3):
            nxt = full[torch.arange(3), torch.tensor(lengths) + step]  # (3,)
            cached.append(model.logits(model.hidden_states(nxt[:, None], kv_cache=cache)[:, 0]))
        assert cache.seqlens.tolist() == [n + 3 for n in lengths]
        rows = [torch.cat([full[b, :n], full[b, n:n + 3]]) for b, n in enumerate(lengths)]
        baseline = [model(r[None])[0] for r in rows]  # (n + 3, V): the plain forward of each row alone
        ref_model = _float64_model(model, monkeypatch)
        ref = [ref_model(r[None])[0] for r in rows]
    for step in range(4):
        at = [n - 1 + step for n in lengths]
        assert_matches_reference(
            f"logits at step {step}", cached[step], torch.stack([r[i] for r, i in zip(ref, at)]),
            torch.stack([r[i] for r, i in zip(baseline, at)]), torch.float32)


def test_kv_cache_rejects_encoders_and_long_caches():
    with pytest.raises(ValueError, match="needs a causal model"):
        Transformer(FAMILIES["bert"](**SMALL)).new_kv_cache(1, 8)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        Transformer(FAMILIES["gpt2"](**SMALL)).new_kv_cache(1, 33)
    model = Transformer(FAMILIES["gpt2"](**SMALL))
    with pytest.raises(ValueError, match="cache_seqlens \\+ seqlen_new must lie"):
        model.hidden_states(torch.zeros(1, 9, dtype=torch.long), kv_cache=model.new_kv_cache(1, 8))
