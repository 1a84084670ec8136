"""One training step (forward, backward, AdamW step): fastlm's Transformer vs the same model on
the torch reference ops vs the same architecture from Hugging Face ``transformers`` (when importable).

Providers: ``fastlm`` (default backends: Triton on GPU, C++ on CPU), ``torch`` (the same model
with every op forced to its PyTorch implementation, forward and backward: the baseline of the
speed-up), ``nanogpt+compile`` for GPT-2 presets (``fastlm/bench/nanogpt.py``: plain PyTorch
modules, SDPA, full logits, ``torch.compile``; eager and named ``nanogpt`` on the CPU) and
``transformers`` (LlamaForCausalLM for rmsnorm/rope/swiglu presets, GPT2LMHeadModel for
layernorm/learned/gelu ones, same dims; skipped with a note when ``transformers`` is not
importable). Every provider steps fused AdamW. On CUDA the step runs under bf16 autocast on fp32
weights. Rows carry tokens/s (batch * seq / median step time); TFLOP/s counts
``Transformer.flops_per_token``.
"""

import contextlib
import importlib.util
import sys
from collections.abc import Iterator

import torch

import fastlm
from fastlm.bench import nanogpt
from fastlm.bench.harness import Case
from fastlm.models import Transformer
from fastlm.train.config import resolve
from fastlm.train.metrics import peak_bf16_flops

# suite -> (preset, batch, seq, vocab override or None for the preset's); "full" depends on the device
SIZES = {
    "quick": ("tiny", 2, 64, 2048),
    "full-cpu": ("tiny", 16, 128, 2048),
    "full-cuda": ("gpt2-124m", 8, 1024, None),
    "gpu": ("gpt2-124m", 8, 1024, None),
}


def transformers_model(cfg):
    """The same architecture in transformers, or None (with the reason printed) if unavailable."""
    if not importlib.util.find_spec("transformers"):
        print("  train: transformers is not installed; skipping that provider", file=sys.stderr)
        return None
    import transformers

    if cfg.norm == "rmsnorm" and cfg.position == "rope" and cfg.mlp == "swiglu" and not cfg.bias:
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False))
    if cfg.norm == "layernorm" and cfg.position == "learned" and cfg.mlp == "gelu" and cfg.bias:
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings))
    print("  train: no transformers equivalent of this architecture; skipping that provider", file=sys.stderr)
    return None


def step_fn(model, loss_fn, device, backend=None):
    """One optimizer step; ``backend`` (if given) is forced over the forward AND the backward."""
    # fused AdamW for every provider: fastlm-train's optimizer and the Hugging Face Trainer's default.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    forced = (lambda: fastlm.use_backend(backend)) if backend else contextlib.nullcontext

    def step():
        with forced():
            with autocast:
                loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    """Built lazily: one model (and its optimizer state) at a time."""
    preset, batch, seq, vocab = SIZES[f"{suite}-{device.type}" if suite == "full" else suite]
    cfg = resolve(preset, None, []).model
    cfg = cfg.replace(vocab_size=vocab or cfg.vocab_size, max_seq_len=max(seq, cfg.max_seq_len))
    inputs = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    targets = torch.roll(inputs, -1, dims=1)
    shape = f"{preset} {batch}x{seq}"
    extra = {"tokens": batch * seq}
    peak = peak_bf16_flops(device)
    if peak:  # MFU against the datasheet peak (issue #6's GPU target: >= 50%)
        extra["peak_flops"] = peak
    flops = None
    for provider, backend in (("fastlm", None), ("torch", "torch")):
        model = Transformer(cfg).to(device)
        flops = model.flops_per_token(seq) * batch * seq
        extra["params"] = model.num_params()
        yield Case("train_step", provider, "step", shape, step_fn(model, lambda m=model: m(inputs, targets), device,
                                                                 backend), size=seq, flops=flops, extra=dict(extra))
    if nanogpt.supports(cfg):
        # The GPU target's baseline is compiled; on the CPU (no such target) it runs eager.
        gpt = nanogpt.GPT(cfg).to(device)
        run = torch.compile(gpt) if device.type == "cuda" else gpt
        yield Case("train_step", "nanogpt+compile" if device.type == "cuda" else "nanogpt", "step", shape,
                   step_fn(gpt, lambda: run(inputs, targets), device), size=seq, flops=flops,
                   extra=dict(extra, params=sum(p.numel() for p in gpt.parameters())))
    hf = transformers_model(cfg)
    if hf is not None:
        hf = hf.to(device)
        yield Case("train_step", "transformers", "step", shape,
                   step_fn(hf, lambda: hf(input_ids=inputs, labels=inputs).loss, device), size=seq, flops=flops,
                   extra=dict(extra, params=hf.num_parameters()))
