"""SwiGLU / GeGLU / GELU against float64 references, on every backend that runs here."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.activation import geglu, geglu_ref, gelu, gelu_ref, swiglu, swiglu_ref
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params

# (tokens, hidden): one token, odd widths, rows spanning several blocks; 1023 tokens with the
# narrower widths keeps the float64 references quick on a shared 2-core CI machine.
SHAPES = [(1, 1), (1, 1151), (37, 7), (37, 1151), (1023, 1), (1023, 123)]

# name -> (fastlm function, float64 reference, plain torch in the input dtype, gated)
ACTIVATIONS = {
    "swiglu": (swiglu, swiglu_ref, lambda g, u: F.silu(g) * u, True),
    "geglu-tanh": (
        lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_ref(g, u, "tanh"),
        lambda g, u: F.gelu(g, approximate="tanh") * u, True,
    ),
    "geglu-none": (
        lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_ref(g, u, "none"), lambda g, u: F.gelu(g) * u, True,
    ),
    "gelu-tanh": (
        lambda x: gelu(x, "tanh"), lambda x: gelu_ref(x, "tanh"), lambda x: F.gelu(x, approximate="tanh"), False,
    ),
    "gelu-none": (gelu, gelu_ref, F.gelu, False),
}


def forward_backward(fn, inputs, grad_out):
    """Run fn on fresh leaf copies of inputs; return the output and the input gradients."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out.double() * grad_out).sum().backward()
    return out, [t.grad for t in leaves]


def check_against_reference(name, inputs, dtype, backend):
    fn, ref_fn, plain_fn, _ = ACTIVATIONS[name]
    grad_out = random_tensor(*inputs[0].shape, dtype=torch.float64, device=inputs[0].device)
    ref, ref_grads = forward_backward(ref_fn, [t.double() for t in inputs], grad_out)
    base, base_grads = forward_backward(plain_fn, inputs, grad_out)
    with fastlm.use_backend(backend), poison_outputs():
        out, grads = forward_backward(fn, inputs, grad_out)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_matches_reference("y", out, ref, base, dtype)
    for grad_name, g, r, b in zip(["dgate", "dup"], grads, ref_grads, base_grads):
        assert g.dtype == dtype
        assert_matches_reference(grad_name, g, r, b, dtype, grad=True)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_matches_float64_reference(backend, dtype, shape, name):
    gated = ACTIVATIONS[name][3]
    # Scale 3: the activations' curved region and both tails (silu(-8) ~ 0, gelu's cubic term).
    inputs = [random_tensor(*shape, dtype=dtype, scale=3.0) for _ in range(2 if gated else 1)]
    check_against_reference(name, inputs, dtype, backend)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("name", ["swiglu", "geglu-none"])
def test_halves_of_a_packed_projection(backend, dtype, name):
    """gate and up as strided views (x.chunk(2, -1)) of a 3-D packed tensor: no copy, same result."""
    packed = random_tensor(3, 5, 2 * 37, dtype=dtype, scale=3.0)
    gate, up = packed.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    check_against_reference(name, [gate, up], dtype, backend)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu", True), ("gelu_tanh", False)],
                         ids=["swiglu", "geglu-none", "gelu-tanh"])
def test_packed_backward_matches_the_unpacked_one(backend, dtype, act, gated):
    """act_bwd_packed (the MLP's backward) writes [dgate | dup] into one buffer: every element, bit for
    bit what act_bwd computes on the separate halves (the same kernel), recomputed forward included."""
    width = 37
    pre = random_tensor(11, (2 if gated else 1) * width, dtype=dtype, scale=3.0)
    dy = random_tensor(11, width, dtype=dtype)
    gate, up = pre.split(width, dim=-1) if gated else (pre, None)
    with fastlm.use_backend(backend), poison_outputs():
        dgate, dup, y = torch.ops.fastlm.act_bwd(dy, gate.contiguous(), up.contiguous() if gated else None, act, True)
        dpre, y_packed = torch.ops.fastlm.act_bwd_packed(dy, pre, act, gated, True)
    assert dpre.shape == pre.shape and y_packed.shape == (11, width)
    torch.testing.assert_close(dpre, torch.cat([dgate, dup], dim=-1) if gated else dgate, rtol=0, atol=0)
    torch.testing.assert_close(y_packed, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_extreme_inputs_give_the_limits(backend, dtype, name):
    # Far tails: exp overflows inside sigmoid, gelu's cubic and its derivative's square overflow fp32 from
    # |g| ~ 1e13 and 2e19, and an exp clamped to stay finite leaves a residue that a huge g multiplies.
    # The results must still be the limits: act(g) -> g or 0, act'(g) -> 1 or 0, never NaN.
    fn, ref_fn, _, gated = ACTIVATIONS[name]
    tails = [1e4, 1e13, 1e38]
    g = torch.tensor([[-t for t in tails] + [-100.0, -30.0, 0.0, 30.0, 100.0] + tails], dtype=dtype)
    inputs = [g, torch.full_like(g, 2.0)] if gated else [g]
    grad_out = torch.ones_like(g, dtype=torch.float64)
    ref, ref_grads = forward_backward(ref_fn, [t.double() for t in inputs], grad_out)
    with fastlm.use_backend(backend):
        out, grads = forward_backward(fn, inputs, grad_out)
    # atol: past the saturation point the kernels return residues of the sigmoid there (|act|, |act'| below
    # 1e-35) where the true values are smaller still; every other value is exact to fp32 rounding.
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-30)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
def test_empty_and_high_rank(backend, dtype):
    with fastlm.use_backend(backend):
        empty = torch.empty(0, 8)
        assert swiglu(empty, empty).shape == (0, 8)
        g, u = random_tensor(2, 3, 4, 5), random_tensor(2, 3, 4, 5)
        torch.testing.assert_close(geglu(g, u), geglu_ref(g, u))


def test_backward_saves_only_the_inputs():
    gate = random_tensor(4, 6).requires_grad_()
    up = random_tensor(4, 6).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu(gate, up)
    assert len(saved) == 2
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda g, u: swiglu(g, u[:, :3]), ValueError, r"up must have gate's shape \(4, 6\)"),
        (lambda g, u: swiglu(g, u.half()), TypeError, "up must have gate's dtype"),
        (lambda g, u: swiglu(g, u.to("meta")), ValueError, "up is on meta"),
        (lambda g, u: swiglu(g.int(), u), TypeError, "gate must be float32"),
        (lambda g, u: swiglu(g.double(), u.double()), TypeError, "gate must be float32"),
        (lambda g, u: swiglu(g.tolist(), u), TypeError, "gate must be a torch.Tensor"),
        (lambda g, u: geglu(g, u, approximate="erf"), ValueError, "approximate must be 'tanh' or 'none'"),
        (lambda g, u: gelu(g, approximate=None), ValueError, "approximate must be 'tanh' or 'none'"),
        (lambda g, u: gelu(g.long()), TypeError, "x must be float32"),
    ],
    ids=["shape", "dtype", "device", "int-gate", "float64", "list", "geglu-approximate", "gelu-approximate",
         "gelu-int"],
)
def test_bad_input_raises_before_launch(call, error, match):
    with pytest.raises(error, match=match):
        call(random_tensor(4, 6), random_tensor(4, 6))


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu_tanh", True), ("gelu", False)])
def test_opcheck(backend, dtype, act, gated):
    # A transposed gate: the outputs are contiguous whatever its strides, as the fakes say.
    gate = random_tensor(40, 5, dtype=dtype).t().requires_grad_()
    up = random_tensor(5, 40, dtype=dtype).requires_grad_() if gated else None
    dy = random_tensor(5, 40, dtype=dtype)
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.act_fwd.default, (gate, up, act))
        # The backward op is not differentiable itself (no double backward): detached inputs.
        up_const = up.detach() if up is not None else None
        torch.library.opcheck(torch.ops.fastlm.act_bwd.default, (dy, gate.detach(), up_const, act, True))
        pre = torch.cat([gate.detach(), up_const], dim=-1) if gated else gate.detach()
        torch.library.opcheck(torch.ops.fastlm.act_bwd_packed.default, (dy, pre, act, gated, True))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    proj = torch.nn.Linear(16, 2 * 24)
    x = random_tensor(6, 16)

    def block(x):
        return swiglu(*proj(x).chunk(2, dim=-1))

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))
    compiled(x).sum().backward()
    assert proj.weight.grad is not None
