"""The nanoGPT-style baseline of the train bench computes what fastlm's GPT-2 computes."""

import pytest
import torch

import fastlm
from fastlm.bench import nanogpt, train
from fastlm.models import ModelConfig, Transformer
from fastlm.testing import random_tensor

# Odd widths and lengths; a vocab that is not a multiple of 64.
CFG = ModelConfig.gpt2(vocab_size=203, max_seq_len=37, d_model=48, n_layers=2, n_heads=3, d_ff=72)


def test_same_loss_and_gradients_as_fastlm():
    torch.manual_seed(0)
    model = Transformer(CFG)
    with torch.no_grad():  # biases and norm weights away from their 0 / 1 init, so a misplaced one shows
        for p in model.parameters():
            p.add_(random_tensor(*p.shape, scale=0.02))
    gpt = nanogpt.from_fastlm(model)
    idx = torch.randint(0, CFG.vocab_size, (3, 37))
    targets = torch.randint(0, CFG.vocab_size, (3, 37))
    with fastlm.use_backend("torch"):
        ours = model(idx, targets)
    theirs = gpt(idx, targets)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    ours.backward()
    theirs.backward()
    # fp32 with sums in different orders (fused norm and loss kernels vs torch's), through two blocks:
    # the gradients agree to ~1e-5 relative; 1e-4 leaves room without hiding a misplaced weight (~1e-1).
    torch.testing.assert_close(gpt.wte.weight.grad, model.tok_emb.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpt.blocks[0].attn.c_attn.weight.grad, model.blocks[0].attn.qkv.weight.grad,
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpt.blocks[1].mlp[0].bias.grad, model.blocks[1].mlp.fc1.bias.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("change", [dict(norm="rmsnorm"), dict(position="rope"), dict(mlp="swiglu"),
                                    dict(n_kv_heads=1), dict(sliding_window=8), dict(tie_embeddings=False)],
                         ids=["rmsnorm", "rope", "swiglu", "gqa", "window", "untied"])
def test_other_architectures_are_refused(change):
    cfg = CFG.replace(**change)
    assert not nanogpt.supports(cfg)
    with pytest.raises(ValueError, match="a GPT-2 config is needed"):
        nanogpt.GPT(cfg)


def test_train_bench_steps_every_provider_of_a_gpt2_preset(monkeypatch):
    """The bench's GPT-2 cases (shrunk: the real preset is 124M parameters) include the baseline, and each steps."""
    real_resolve = train.resolve

    def small(preset, config_file, overrides):
        cfg = real_resolve(preset, config_file, overrides)
        cfg.model = cfg.model.replace(d_model=48, n_layers=2, n_heads=3, n_kv_heads=3, d_ff=192)
        return cfg

    monkeypatch.setattr(train, "resolve", small)
    monkeypatch.setitem(train.SIZES, "quick", ("gpt2-124m", 2, 16, 211))
    cases = list(train.cases("quick", torch.device("cpu")))
    assert [c.provider for c in cases][:3] == ["fastlm", "torch", "nanogpt"]
    for case in cases:
        case.fn()
