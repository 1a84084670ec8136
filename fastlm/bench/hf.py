"""A Llama-style training step (forward with labels + backward): transformers with SDPA vs the same model
after ``fastlm.patch_hf`` (fused norms, SwiGLU, rope, fastlm attention, linear cross-entropy).

The "gpu" suite is a ~1B Llama-style config at seq 4096 in bf16 (the issue's H200 target). FLOPs are the
usual 6 x parameters x tokens estimate plus causal attention (6 x layers x tokens x seqlen x hidden).
"""

import copy
import importlib.util
import sys

import torch

from fastlm.bench.harness import Case

# (hidden, layers, heads, kv heads, ffn, vocab, batch, seqlen), dtype
SIZES = {
    "quick": ((128, 2, 4, 2, 352, 2048, 2, 128), torch.float32),
    "full": ((512, 4, 8, 4, 1408, 32000, 2, 512), torch.float32),
    "gpu": ((2048, 16, 16, 8, 5632, 32000, 1, 4096), torch.bfloat16),
}


def _model(dims, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv_heads, ffn, vocab, _, seqlen = dims
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=seqlen, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def cases(suite: str, device: torch.device) -> list[Case]:
    if importlib.util.find_spec("transformers") is None:
        print("fastlm-bench: skipping the hf suite: transformers is not installed (pip install fastlm[hf])",
              file=sys.stderr)
        return []
    import fastlm.hf

    dims, dtype = SIZES[suite]
    hidden, layers, *_, vocab, batch, seqlen = dims
    base = _model(dims, dtype, device)
    patched = copy.deepcopy(base)
    fastlm.hf.patch_hf(patched)
    ids = torch.randint(0, vocab, (batch, seqlen), device=device)
    tokens = batch * seqlen
    params = sum(p.numel() for p in base.parameters())
    flops = 6 * params * tokens + 6 * layers * tokens * seqlen * hidden
    shape = f"{layers}x{hidden} b{batch} s{seqlen} {str(dtype).removeprefix('torch.')}"
    out = []
    for name, model in (("transformers-sdpa", base), ("fastlm", patched)):
        def step(model=model):
            model(input_ids=ids, labels=ids).loss.backward()
            for p in model.parameters():
                p.grad = None

        out.append(Case("llama_train", name, "step", shape, step, size=seqlen, flops=flops,
                        extra={"params": params}))
    return out
