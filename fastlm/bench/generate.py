"""Greedy generation end to end (prefill + decode): ``fastlm.generate``'s token loop with the KV
cache vs ``transformers``' ``generate`` on the same weights.

Providers: ``fastlm`` (``fastlm.generate.generate_ids``, greedy, no EOS: every row makes all its
tokens) and ``transformers`` (the model written by ``hf_convert.save_hf`` and loaded with
``AutoModelForCausalLM.from_pretrained``, SDPA attention, ``do_sample=False`` with
``min_new_tokens`` = ``max_new_tokens``; skipped with a note when transformers is not
importable). Both get the same random prompts of one length. CPU: fp32; CUDA: bf16 weights and
KV cache. Rows carry tokens/s = batch * new tokens / median time of one whole call.
"""

import importlib.util
import sys
import tempfile
from collections.abc import Iterator

import torch

from fastlm.bench.harness import Case
from fastlm.models import Transformer
from fastlm.train.config import resolve

# suite -> (preset, vocab, prompt tokens, new tokens, batches); "full" depends on the device
SIZES = {
    "quick": ("tiny", 2048, 8, 16, (1, 8)),
    "full-cpu": ("tiny", 2048, 16, 64, (1, 8)),
    "full-cuda": ("llama-1b", 32000, 128, 128, (1, 32)),
    "gpu": ("llama-1b", 32000, 128, 128, (1, 32)),
}


def transformers_model(model: Transformer, device: torch.device, dtype: torch.dtype):
    """The same weights as a transformers causal LM, or None (with the reason printed)."""
    if not importlib.util.find_spec("transformers"):
        print("  generate: transformers is not installed; skipping that provider", file=sys.stderr)
        return None
    import transformers

    from fastlm.models import hf_convert

    with tempfile.TemporaryDirectory() as tmp:
        hf_convert.save_hf(model, None, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval()


def cases(suite: str, device: torch.device) -> Iterator[Case]:
    from fastlm.generate import generate_ids

    preset, vocab, prompt_len, new, batches = SIZES[f"{suite}-{device.type}" if suite == "full" else suite]
    cfg = resolve(preset, None, []).model.replace(vocab_size=vocab, activation_checkpointing=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).eval()
    hf = transformers_model(model, device, dtype)
    for batch in batches:
        prompts = torch.randint(0, vocab, (batch, prompt_len), device=device)
        shape = f"{preset} b{batch} {prompt_len}+{new}"
        extra = {"tokens": batch * new, "batch": batch}
        ids = prompts.tolist()
        yield Case("generate", "fastlm", "greedy", shape, lambda ids=ids: generate_ids(model, ids, new, temperature=0),
                   size=batch, extra=dict(extra))
        if hf is not None:
            mask = torch.ones_like(prompts)

            def hf_generate(prompts=prompts, mask=mask):
                with torch.no_grad():
                    return hf.generate(prompts, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=0, eos_token_id=None)

            yield Case("generate", "transformers", "greedy", shape, hf_generate, size=batch, extra=dict(extra))
