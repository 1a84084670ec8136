"""SwiGLUMLP / GELUMLP against plain PyTorch MLPs with the same weights."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params

DIM, HIDDEN = 16, 37  # odd hidden width: the gate/up halves start mid-row


def plain_forward(kind, module, x, params):
    """The MLP written out in plain PyTorch from the module's parameters (any dtype)."""
    w_in, b_in, w_out, b_out = params
    pre = F.linear(x, w_in, b_in)
    if kind == "swiglu":
        gate, up = pre.chunk(2, dim=-1)
        hidden = F.silu(gate) * up
    else:
        hidden = F.gelu(pre, approximate=module.approximate)
    return F.linear(hidden, w_out, b_out)


def make_module(kind, bias, dtype, approximate="tanh"):
    if kind == "swiglu":
        module = fastlm.nn.SwiGLUMLP(DIM, HIDDEN, bias=bias, dtype=dtype)
        linears = (module.gate_up_proj, module.down_proj)
    else:
        module = fastlm.nn.GELUMLP(DIM, HIDDEN, bias=bias, approximate=approximate, dtype=dtype)
        linears = (module.up_proj, module.down_proj)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(random_tensor(*p.shape, scale=0.5))
    params = [linears[0].weight, linears[0].bias, linears[1].weight, linears[1].bias]
    return module, params


def grads_of(out, grad_out, tensors):
    grads = torch.autograd.grad((out.double() * grad_out).sum(), [t for t in tensors if t is not None])
    it = iter(grads)
    return [next(it) if t is not None else None for t in tensors]


def check_mlp(kind, bias, approximate, dtype, backend, device="cpu"):
    """Module forward and every gradient vs the plain MLP in float64, FlashAttention rule."""
    module, params = make_module(kind, bias, dtype, approximate)
    module.to(device)
    x = random_tensor(3, 13, DIM, dtype=dtype, device=device).requires_grad_()
    grad_out = random_tensor(3, 13, DIM, dtype=torch.float64, device=device)

    params64 = [p.detach().double().requires_grad_() if p is not None else None for p in params]
    x64 = x.detach().double().requires_grad_()
    ref = plain_forward(kind, module, x64, params64)
    ref_grads = grads_of(ref, grad_out, [x64] + params64)
    base = plain_forward(kind, module, x, params)
    base_grads = grads_of(base, grad_out, [x] + params)
    with fastlm.use_backend(backend), poison_outputs():
        out = module(x)
        grads = grads_of(out, grad_out, [x] + params)

    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_reference("out", out, ref, base, dtype)
    for name, g, r, b in zip(["dx", "dw_in", "db_in", "dw_out", "db_out"], grads, ref_grads, base_grads):
        if r is None:
            continue
        assert g.dtype == dtype, name
        assert_matches_reference(name, g, r, b, dtype, grad=True)


MLP_VARIANTS = pytest.mark.parametrize(
    "kind,bias,approximate",
    [("swiglu", False, "tanh"), ("swiglu", True, "tanh"), ("gelu", True, "tanh"), ("gelu", False, "none")],
    ids=["swiglu", "swiglu-bias", "gelu-tanh", "gelu-none-nobias"],
)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@MLP_VARIANTS
def test_matches_plain_torch_mlp(backend, dtype, kind, bias, approximate):
    check_mlp(kind, bias, approximate, dtype, backend)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_saves_only_x_and_the_pre_activation(kind):
    module, params = make_module(kind, True, torch.float32)
    x = random_tensor(5, 7, DIM).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(x)
    parameter_ptrs = {p.data_ptr() for p in params if p is not None}
    activations = [t for t in saved if t.data_ptr() not in parameter_ptrs]
    width = 2 * HIDDEN if kind == "swiglu" else HIDDEN
    assert sorted(t.numel() for t in activations) == sorted([x.numel(), 35 * width])


def test_frozen_input_and_frozen_weights():
    module, params = make_module("swiglu", False, torch.float32)
    x = random_tensor(4, DIM)
    module(x).sum().backward()  # x needs no grad
    assert all(p.grad is not None for p in params if p is not None)
    module.requires_grad_(False)
    x.requires_grad_()
    module(x).sum().backward()  # only x needs grad
    expected = torch.autograd.grad(plain_forward("swiglu", module, x, params).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module, _ = make_module("swiglu", True, torch.float32)
    x = random_tensor(6, DIM)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), module(x))
    compiled(x).sum().backward()
    assert module.gate_up_proj.weight.grad is not None


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fastlm.nn.SwiGLUMLP(DIM, 8)(random_tensor(3, DIM + 1)), ValueError, "x's last dim must be dim=16"),
        (lambda: fastlm.nn.SwiGLUMLP(DIM, 8)(random_tensor(3, DIM).double()), TypeError, "x must have the parameters'"),
        (lambda: fastlm.nn.GELUMLP(DIM, 8)(random_tensor(3, DIM).to("meta")), ValueError, "x is on meta"),
        (lambda: fastlm.nn.GELUMLP(DIM, 8)([1.0] * DIM), TypeError, "x must be a torch.Tensor"),
        (lambda: fastlm.nn.SwiGLUMLP(DIM, 0), ValueError, "hidden_dim must be a positive int"),
        (lambda: fastlm.nn.GELUMLP(DIM, 8, approximate="erf"), ValueError, "approximate must be 'tanh' or 'none'"),
    ],
    ids=["x-width", "x-dtype", "x-device", "x-list", "hidden-zero", "approximate"],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", False)], ids=["swiglu", "gelu"])
def test_fused_mlp_under_autocast_matches_its_reference(activation, gated):
    """The functional form under bf16 autocast (the GPU training path, here CPU autocast): bf16 compute
    like F.linear's, gradients in each parameter's and the input's own fp32 dtype."""
    from fastlm.nn.mlp import fused_mlp, fused_mlp_ref

    w_in = random_tensor(2 * HIDDEN if gated else HIDDEN, DIM, scale=0.5).requires_grad_()
    b_in = random_tensor(w_in.shape[0], scale=0.5).requires_grad_()
    w_out = random_tensor(DIM, HIDDEN, scale=0.5).requires_grad_()
    b_out = random_tensor(DIM, scale=0.5).requires_grad_()
    x = random_tensor(3, 13, DIM).requires_grad_()
    grad_out = random_tensor(3, 13, DIM, dtype=torch.float64)
    leaves = [x, w_in, b_in, w_out, b_out]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_mlp(*leaves, activation, gated)
    ours = grads_of(out, grad_out, leaves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = fused_mlp_ref(*leaves, activation, gated)
    base_grads = grads_of(base, grad_out, leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = fused_mlp_ref(*leaves64, activation, gated)
    ref_grads = grads_of(ref, grad_out, leaves64)
    assert out.dtype == torch.bfloat16
    assert_matches_reference("out", out, ref, base, torch.bfloat16)
    for name, g, r, b, leaf in zip(("dx", "dw_in", "db_in", "dw_out", "db_out"), ours, ref_grads, base_grads, leaves):
        assert g.dtype == leaf.dtype == torch.float32, name
        assert_matches_reference(name, g, r, b, torch.bfloat16, grad=True)


def test_fused_mlp_rejects_unknown_activation():
    from fastlm.nn.mlp import fused_mlp

    x, w = torch.randn(2, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_mlp(x, w, None, torch.randn(4, 3), None, "relu", True)
