"""One training step (forward, backward, AdamW step): fastlm's Transformer vs the same architecture
from Hugging Face ``transformers`` (when installed) and vs fastlm's model on the torch reference ops.

    python benchmarks/bench_train.py                 # CPU: the tiny preset, 16 x 128 tokens
    python benchmarks/bench_train.py --preset gpt2-124m --batch 8 --seq 1024   # GPU: bf16 autocast
    python benchmarks/bench_train.py --quick         # small, proves the script runs

Providers: ``fastlm`` (default backends: Triton on GPU, C++ on CPU), ``torch`` (the same model
with ``use_backend("torch")``: the baseline of the speed-up column) and ``transformers``
(LlamaForCausalLM for rmsnorm/rope/swiglu presets, GPT2LMHeadModel for layernorm/learned/gelu
ones, matching dims; skipped with a note when ``transformers`` is not importable). Each step
is timed after one warm-up step; tokens/s is batch * seq / median step time.
"""

import contextlib
import sys

import torch

import fastlm
from fastlm.benchmark import Case, parser, run_cases
from fastlm.models import Transformer
from fastlm.train.config import resolve


def transformers_model(cfg):
    """The same architecture in transformers, or None (with the reason printed) if unavailable."""
    try:
        import transformers
    except ImportError:
        print("bench_train: transformers is not installed; skipping that provider", file=sys.stderr)
        return None
    if cfg.norm == "rmsnorm" and cfg.position == "rope" and cfg.mlp == "swiglu" and not cfg.bias:
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
        return transformers.LlamaForCausalLM(hf_cfg)
    if cfg.norm == "layernorm" and cfg.position == "learned" and cfg.mlp == "gelu" and cfg.bias:
        hf_cfg = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings)
        return transformers.GPT2LMHeadModel(hf_cfg)
    print("bench_train: no transformers equivalent of this architecture; skipping that provider", file=sys.stderr)
    return None


def step_fn(model, loss_fn, device, backend=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    forced = (lambda: fastlm.use_backend(backend)) if backend else contextlib.nullcontext

    def step():
        with forced(), autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    p = parser(__doc__)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default: the preset's data.seq_len)")
    p.add_argument("--vocab", type=int, default=2048)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = resolve(args.preset, None, [])
    seq = args.seq or cfg.data.seq_len
    batch = args.batch
    if args.quick:
        batch, seq = 2, min(seq, 64)
    model_cfg = cfg.model.replace(vocab_size=args.vocab, max_seq_len=max(seq, cfg.model.max_seq_len))
    inputs = torch.randint(0, args.vocab, (batch, seq), device=device)
    targets = torch.roll(inputs, -1, dims=1)
    ours = Transformer(model_cfg).to(device)
    cases = []
    shape = f"{args.preset} {batch}x{seq}"
    flops = ours.flops_per_token(seq) * batch * seq
    for provider, backend in (("fastlm", None), ("torch", "torch")):
        model = Transformer(model_cfg).to(device)
        fn = step_fn(model, lambda model=model: model(inputs, targets), device, backend)
        cases.append(Case("train_step", provider, "fwd+bwd+adamw", shape, fn, flops=flops))
    hf = transformers_model(model_cfg)
    if hf is not None:
        hf = hf.to(device)
        fn = step_fn(hf, lambda: hf(input_ids=inputs, labels=inputs).loss, device)
        cases.append(Case("train_step", "transformers", "fwd+bwd+adamw", shape, fn, flops=flops))
    print(f"{ours.num_params() / 1e6:.2f}M parameters, {flops / 1e9:.1f} GFLOP per step", file=sys.stderr)
    rows = run_cases(cases, device, args.out, min_run_time=0.5 if args.quick else 3.0)
    for row in rows:
        print(f"{row['provider']:14s} {batch * seq / row['median_ms'] * 1e3:10.0f} tokens/s")


if __name__ == "__main__":
    main()
