"""Rotary embeddings against float64 references, on every backend that runs here."""

import pytest
import torch

import fastlm
from fastlm.ops.rope import rope, rope_ref
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params

TABLE_LEN = 50


def tables(rotary_dim: int, positions: int = TABLE_LEN, base: float = 10000.0):
    """fp32 cos/sin tables (positions, rotary_dim / 2), angles computed in fp64."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def rotate_half_plain(x, cos, sin, position_ids, interleaved):
    """What a user writes in plain PyTorch (HF's rotate_half), in x's dtype: the baseline."""
    batch, seqlen, _, headdim = x.shape
    half = cos.shape[1]
    pos = torch.arange(seqlen) if position_ids is None else position_ids
    c = cos[pos].to(x.dtype).expand(batch, seqlen, half)[:, :, None]
    s = sin[pos].to(x.dtype).expand(batch, seqlen, half)[:, :, None]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        swapped = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        swapped = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * c + swapped * s, rest), dim=-1)


def plain_pair(q, k, cos, sin, position_ids, interleaved):
    return tuple(rotate_half_plain(t, cos, sin, position_ids, interleaved) for t in (q, k))


def make_positions(kind, batch, seqlen, generator=None):
    if kind == "none":
        return None
    if kind == "offset":  # KV-cache decode: the new tokens follow 11 cached ones
        return torch.arange(11, 11 + seqlen)
    # Packed sequences: every row restarts its positions at random boundaries.
    return torch.randint(0, TABLE_LEN, (batch, seqlen), generator=generator)


def forward_backward(fn, inputs, grads_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    sum((o.double() * g).sum() for o, g in zip(outs, grads_out)).backward()
    return outs, [t.grad for t in leaves]


# (batch, seqlen, heads_q, heads_k, headdim, rotary_dim)
SHAPES = [
    (1, 1, 1, 1, 2, 2),  # decode step, smallest head
    (2, 37, 3, 1, 16, 16),  # MQA, full rotary
    (2, 13, 4, 2, 18, 8),  # GQA, partial rotary, odd pass-through width
    (1, 7, 5, 5, 128, 64),  # large head, half rotary (GPT-NeoX)
]


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}s{}hq{}hk{}d{}r{}".format(*s))
@pytest.mark.parametrize("positions", ["none", "offset", "per-token"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_matches_float64_reference(backend, dtype, shape, positions, interleaved):
    batch, seqlen, hq, hk, headdim, rotary_dim = shape
    q = random_tensor(batch, seqlen, hq, headdim, dtype=dtype)
    k = random_tensor(batch, seqlen, hk, headdim, dtype=dtype)
    cos, sin = tables(rotary_dim)
    pos = make_positions(positions, batch, seqlen)
    grads_out = [random_tensor(*t.shape, dtype=torch.float64) for t in (q, k)]

    ref, ref_grads = forward_backward(
        lambda q, k: rope_ref(q, k, cos, sin, pos, interleaved), [q.double(), k.double()], grads_out
    )
    base, base_grads = forward_backward(lambda q, k: plain_pair(q, k, cos, sin, pos, interleaved), [q, k], grads_out)
    with fastlm.use_backend(backend), poison_outputs():
        outs, grads = forward_backward(lambda q, k: rope(q, k, cos, sin, pos, interleaved), [q, k], grads_out)
    for name, out, r, b in zip(["q", "k"], outs, ref, base):
        assert out.dtype == dtype and out.is_contiguous()
        assert_matches_reference(name, out, r, b, dtype)
    for name, g, r, b in zip(["dq", "dk"], grads, ref_grads, base_grads):
        assert_matches_reference(name, g, r, b, dtype, grad=True)
    # The pass-through features are copied exactly.
    torch.testing.assert_close(outs[0][..., rotary_dim:], q[..., rotary_dim:], atol=0, rtol=0)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_strided_qk_from_a_packed_projection(backend, dtype, interleaved):
    batch, seqlen, hq, hk, d = 2, 9, 4, 2, 12
    qkv = random_tensor(batch, seqlen, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[..., : hq * d].view(batch, seqlen, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(batch, seqlen, hk, d)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = tables(d)
    with fastlm.use_backend(backend):
        out = rope(q, k, cos, sin)
    for o, r in zip(out, rope_ref(q.contiguous(), k.contiguous(), cos, sin)):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
def test_offset_positions_match_a_slice_of_the_full_sequence(backend, dtype):
    """Decoding token t with position_ids=[t] gives row t of rotating the whole sequence."""
    q = random_tensor(1, 20, 2, 8, dtype=dtype)
    k = random_tensor(1, 20, 1, 8, dtype=dtype)
    cos, sin = tables(8)
    with fastlm.use_backend(backend):
        full_q, full_k = rope(q, k, cos, sin)
        step_q, step_k = rope(q[:, 13:14], k[:, 13:14], cos, sin, torch.tensor([13]))
    torch.testing.assert_close(step_q, full_q[:, 13:14], atol=0, rtol=0)
    torch.testing.assert_close(step_k, full_k[:, 13:14], atol=0, rtol=0)


def test_rotation_preserves_norm_and_is_a_relative_position_code():
    """<rope(q, m), rope(k, n)> depends on m - n only: the property RoPE is built for."""
    q = random_tensor(1, 1, 1, 32, dtype=torch.float64).float()
    k = random_tensor(1, 1, 1, 32, dtype=torch.float64).float()
    cos, sin = tables(32)
    dots = []
    for m, n in [(5, 2), (20, 17), (40, 37)]:
        qm, _ = rope(q, k, cos, sin, torch.tensor([m]))
        _, kn = rope(q, k, cos, sin, torch.tensor([n]))
        torch.testing.assert_close(qm.norm(), q.norm())
        dots.append((qm * kn).sum())
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])


def test_positions_int32_and_empty():
    q, k = random_tensor(2, 3, 2, 8), random_tensor(2, 3, 1, 8)
    cos, sin = tables(8)
    pos = torch.tensor([[4, 5, 6], [0, 1, 2]])
    torch.testing.assert_close(rope(q, k, cos, sin, pos.int()), rope(q, k, cos, sin, pos))
    out_q, out_k = rope(q[:, :0], k[:, :0], cos, sin)
    assert out_q.shape == (2, 0, 2, 8) and out_k.shape == (2, 0, 1, 8)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda q, k, c, s: rope(q[0], k, c, s), ValueError, "q must be 4-D"),
        (lambda q, k, c, s: rope(q, k[:, :2], c, s), ValueError, "k must be 4-D .* with q's batch, seqlen"),
        (lambda q, k, c, s: rope(q, k.half(), c, s), TypeError, "k must have q's dtype"),
        (lambda q, k, c, s: rope(q.double(), k.double(), c, s), TypeError, "q must be float32"),
        (lambda q, k, c, s: rope(q, k, c[:, :3], s), ValueError, "sin must have cos's shape"),
        (lambda q, k, c, s: rope(q, k, torch.ones(50, 5), torch.ones(50, 5)), ValueError, "rotary_dim = 2"),
        (lambda q, k, c, s: rope(q, k, c.long(), s), TypeError, "cos must be a floating-point"),
        (lambda q, k, c, s: rope(q, k, c[0], s[0]), ValueError, "cos must be 2-D"),
        (lambda q, k, c, s: rope(q, k, c.to("meta"), s.to("meta")), ValueError, "cos is on meta"),
        (lambda q, k, c, s: rope(q, k, c[:3], s[:3]), ValueError, "seqlen 5 exceeds the 3 positions"),
        (lambda q, k, c, s: rope(q, k, c, s, torch.arange(5) + 46), ValueError, r"must be in \[0, 50\).*\[46, 50\]"),
        (lambda q, k, c, s: rope(q, k, c, s, torch.arange(5) - 1), ValueError, r"must be in \[0, 50\)"),
        (lambda q, k, c, s: rope(q, k, c, s, torch.arange(4)), ValueError, r"position_ids must have shape \(5,\)"),
        (lambda q, k, c, s: rope(q, k, c, s, torch.arange(5.0)), TypeError, "position_ids must be int32 or int64"),
        (lambda q, k, c, s: rope(q, k, c.requires_grad_(), s), ValueError, "cos gets no gradient"),
        (lambda q, k, c, s: rope(q, k.tolist(), c, s), TypeError, "k must be a torch.Tensor"),
    ],
    ids=["q-rank", "k-shape", "k-dtype", "float64", "sin-shape", "rotary-too-wide", "int-cos", "cos-rank",
         "cos-device", "table-too-short", "positions-too-large", "negative-positions", "positions-shape",
         "float-positions", "cos-requires-grad", "list-k"],
)
def test_bad_input_raises_before_launch(call, error, match):
    cos, sin = tables(8)
    with pytest.raises(error, match=match):
        call(random_tensor(2, 5, 3, 8), random_tensor(2, 5, 1, 8), cos.clone(), sin.clone())


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("with_positions", [False, True], ids=["arange", "positions"])
def test_opcheck(backend, dtype, with_positions):
    # q transposed from (batch, heads, seqlen, headdim): the outputs are contiguous, as the fake says.
    q = random_tensor(2, 3, 5, 10, dtype=dtype).transpose(1, 2).requires_grad_()
    k = random_tensor(2, 5, 1, 10, dtype=dtype).requires_grad_()
    cos, sin = tables(6)
    pos = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]) if with_positions else None
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.rope.default, (q, k, cos, sin, pos, True, False))


def test_rotary_embedding_module():
    module = fastlm.nn.RotaryEmbedding(8, max_seq_len=TABLE_LEN, base=500.0, interleaved=True)
    cos, sin = tables(8, base=500.0)
    torch.testing.assert_close(module.cos, cos, atol=0, rtol=0)
    assert module.state_dict() == {}
    module.to(torch.bfloat16)
    assert module.cos.dtype == torch.float32, "a model cast must not round the tables"
    q, k = random_tensor(2, 6, 4, 12), random_tensor(2, 6, 2, 12)
    pos = torch.arange(3, 9)
    for out, ref in zip(module(q, k, pos), rope_ref(q, k, cos, sin, pos, interleaved=True)):
        torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="dim must be a positive even int"):
        fastlm.nn.RotaryEmbedding(7, 16)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module = fastlm.nn.RotaryEmbedding(8, max_seq_len=16)
    proj = torch.nn.Linear(8, 8)
    x = random_tensor(1, 5, 1, 8)

    def block(x):
        return module(proj(x), x)[0]

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))
    compiled(x).sum().backward()
    assert proj.weight.grad is not None


def test_torch_compile_fullgraph_with_position_ids():
    # The positions are range-checked inside the op, where they are real even under torch.compile:
    # the compiled call matches eager bit for bit and still raises for a position past the table.
    torch._dynamo.reset()
    q, k = random_tensor(2, 5, 3, 8).requires_grad_(), random_tensor(2, 5, 1, 8).requires_grad_()
    cos, sin = tables(8)

    def step(q, k, pos):
        out_q, out_k = rope(q, k, cos, sin, pos)
        return (out_q * out_q).sum() + (out_k * out_k * out_k).sum()

    pos = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, pos)
    expected = step(q, k, pos)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(loss, (q, k)), torch.autograd.grad(expected, (q, k))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"must be in \[0, 50\).*\[42, 50\]"):
        compiled(q, k, pos + 41)
