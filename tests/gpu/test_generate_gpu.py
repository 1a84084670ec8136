"""Generation on CUDA: the KV cache through the compiled flash-decoding kernel gives the greedy
tokens of recomputing the whole sequence (fp32), and a bf16 batch of ragged prompts decodes."""

import pytest
import torch

from fastlm.generate import generate_ids
from tests.test_generate import PROMPTS, _greedy_recomputed, _model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["llama-gqa", "gpt2"])
def test_greedy_with_cache_equals_recomputing_each_step_on_cuda(family):
    model = _model(family).cuda()
    out = generate_ids(model, PROMPTS, 9, temperature=0)
    assert out == [_greedy_recomputed(model, p, 9) for p in PROMPTS]


def test_bf16_ragged_batch_decodes():
    model = _model(vocab_size=96).to("cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = generate_ids(model, PROMPTS, 12, temperature=0.8, top_p=0.9, generator=gen)
    assert [len(tokens) for tokens in out] == [12, 12, 12]
    assert all(0 <= t < 96 for tokens in out for t in tokens)
