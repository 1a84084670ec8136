"""LayerNorm / RMSNorm against float64 references, on every backend that runs here."""

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params

# Last-dim sizes: tiny, odd, not powers of two, and the multi-tile path (65536).
WIDTHS = [1, 7, 123, 1151, 4096, 65536]


def leading_shape(n: int) -> tuple[int, ...]:
    # Several leading dims for small rows; fewer rows where each row is long.
    return (2, 5) if n <= 1151 else (3,) if n <= 4096 else (2,)


def run_norm(kind, x, weight, bias, residual, eps):
    if kind == "layer":
        return layer_norm(x, weight, bias, eps=eps, residual=residual)
    return rms_norm(x, weight, eps=eps, residual=residual)


def run_ref(kind, x, weight, bias, residual, eps):
    if kind == "layer":
        return layer_norm_ref(x, weight, bias, eps=eps, residual=residual)
    return rms_norm_ref(x, weight, eps=eps, residual=residual)


def run_plain_torch(kind, x, weight, bias, residual, eps):
    """What a user gets from torch in the same dtype: the FlashAttention-rule baseline."""
    r = x + residual if residual is not None else x
    n = x.shape[-1]
    y = F.layer_norm(r, (n,), weight, bias, eps) if kind == "layer" else F.rms_norm(r, (n,), weight, eps)
    return (y, r) if residual is not None else y


def make_inputs(kind, shape, dtype, affine, with_residual, device="cpu"):
    n = shape[-1]
    x = random_tensor(*shape, dtype=dtype, device=device, scale=2.0, offset=0.5)
    weight = random_tensor(n, dtype=dtype, device=device, offset=1.0) if affine else None
    bias = random_tensor(n, dtype=dtype, device=device) if affine and kind == "layer" else None
    residual = random_tensor(*shape, dtype=dtype, device=device) if with_residual else None
    return x, weight, bias, residual


def forward_backward(fn, inputs, grads_out):
    """Run fn on fresh leaf copies of inputs; return outputs and input gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads_out))
    loss.backward()
    return outs, [t.grad if t is not None else None for t in leaves]


def check_against_reference(backend, dtype, n, kind, with_residual, affine, device="cpu"):
    """Outputs and every gradient of fastlm's norm vs float64, judged against plain torch in dtype."""
    shape = leading_shape(n) + (n,)
    eps = 1e-5
    inputs = make_inputs(kind, shape, dtype, affine, with_residual, device)
    n_out = 2 if with_residual else 1
    grads_out = [random_tensor(*shape, dtype=torch.float64, device=device) for _ in range(n_out)]

    ref_outs, ref_grads = forward_backward(
        lambda *a: run_ref(kind, *a, eps), [t.double() if t is not None else None for t in inputs], grads_out
    )
    base_outs, base_grads = forward_backward(lambda *a: run_plain_torch(kind, *a, eps), inputs, grads_out)
    with fastlm.use_backend(backend), poison_outputs():
        outs, grads = forward_backward(lambda *a: run_norm(kind, *a, eps), inputs, grads_out)

    for name, out, ref, base in zip(["y", "r"], outs, ref_outs, base_outs):
        assert out.dtype == dtype
        assert_matches_reference(name, out, ref, base, dtype)
    # dx = rstd * (g - xhat * mean(g * xhat) [- mean(g)]) with g = dy * w cancels terms of
    # size |g| * rstd (almost entirely for one-column rows): its rounding error scales with them.
    x64, w64 = inputs[0].double(), inputs[1].double() if affine else 1.0
    r64 = x64 + inputs[3].double() if with_residual else x64
    centred = r64 - r64.mean(-1, keepdim=True) if kind == "layer" else r64
    rstd = torch.rsqrt((centred * centred).mean(-1) + eps)
    dx_scale = ((grads_out[0] * w64).abs().amax(-1) * rstd).max().item()
    for name, g, ref, base in zip(["dx", "dweight", "dbias", "dresidual"], grads, ref_grads, base_grads):
        if ref is None:
            assert g is None, f"{name} should not exist"
            continue
        scale = dx_scale if name in ("dx", "dresidual") else None
        assert_matches_reference(name, g, ref, base, dtype, grad=True, scale=scale)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("n", WIDTHS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_matches_float64_reference(backend, dtype, n, kind, with_residual, affine):
    check_against_reference(backend, dtype, n, kind, with_residual, affine)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("n", [123, 65536], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_weight_grads_are_deterministic(backend, dtype, n, kind):
    rows = 300 if n < 4096 else 5
    inputs = make_inputs(kind, (rows, n), dtype, affine=True, with_residual=False)
    grads_out = [random_tensor(rows, n, dtype=torch.float64)]
    with fastlm.use_backend(backend):
        _, first = forward_backward(lambda *a: run_norm(kind, *a, 1e-5), inputs, grads_out)
        _, second = forward_backward(lambda *a: run_norm(kind, *a, 1e-5), inputs, grads_out)
    for a, b in zip(first, second):
        if a is not None:
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
def test_non_contiguous_input_and_empty_batch(backend, dtype):
    x = random_tensor(64, 6).t()  # (6, 64), not contiguous
    w = random_tensor(64)
    with fastlm.use_backend(backend):
        torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w))
        empty = torch.empty(0, 64)
        assert layer_norm(empty, w, w).shape == (0, 64)


def test_weight_in_float32_with_low_precision_input():
    x = random_tensor(4, 96, dtype=torch.bfloat16)
    w = random_tensor(96, offset=1.0).requires_grad_()
    y = rms_norm(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), rms_norm_ref(x, w).float(), atol=0, rtol=0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, w: rms_norm(x.int(), None), TypeError, "x must be float32"),
        (lambda x, w: rms_norm(x.double(), None), TypeError, "x must be float32"),
        (lambda x, w: rms_norm(x, w[:-1]), ValueError, r"weight must have shape \(16,\)"),
        (lambda x, w: layer_norm(x, w, w.int()), TypeError, "bias must be a floating-point"),
        (lambda x, w: rms_norm(x, w, residual=x[:, :8]), ValueError, "residual must have x's shape"),
        (lambda x, w: rms_norm(x, w, residual=x.half()), TypeError, "residual must have x's dtype"),
        (lambda x, w: rms_norm(x, w, residual=x.to("meta")), ValueError, "residual is on meta"),
        (lambda x, w: rms_norm(x, w.to("meta")), ValueError, "weight is on meta"),
        (lambda x, w: rms_norm(torch.zeros(2, 65537), None), ValueError, r"last dim of x must be in \[1, 65536\]"),
        (lambda x, w: rms_norm(x, w, eps=-1.0), ValueError, "eps must be a non-negative"),
        (lambda x, w: rms_norm(x.sum(), None), ValueError, "at least one dimension"),
        (lambda x, w: rms_norm(x.tolist(), None), TypeError, "x must be a torch.Tensor"),
    ],
    ids=[
        "int-x", "float64-x", "weight-shape", "int-bias", "residual-shape", "residual-dtype",
        "residual-device", "weight-device", "too-wide", "negative-eps", "scalar-x", "list-x",
    ],
)
def test_bad_input_raises_before_launch(call, error, match):
    x = random_tensor(4, 16)
    w = random_tensor(16)
    with pytest.raises(error, match=match):
        call(x, w)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(backend, dtype, kind, with_residual, transposed):
    # Transposed x and residual: the ops return contiguous tensors, and their fakes must say so.
    def activation():
        return random_tensor(40, 5, dtype=dtype).t() if transposed else random_tensor(5, 40, dtype=dtype)

    x = activation().requires_grad_()
    w = random_tensor(40, dtype=dtype).requires_grad_()
    b = random_tensor(40, dtype=dtype).requires_grad_() if kind == "layer" else None
    res = activation().requires_grad_() if with_residual else None
    is_rms = kind == "rms"
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.norm_fwd.default, (x, w, b, res, 1e-5, is_rms))
        _, _, mean, rstd = torch.ops.fastlm.norm_fwd(x.detach(), w.detach(), None, None, 1e-5, is_rms)
        dr = activation() if with_residual else None
        torch.library.opcheck(
            torch.ops.fastlm.norm_bwd.default, (activation(), dr, x.detach(), w.detach(), b is not None, mean, rstd, is_rms)
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    block = torch.nn.Sequential(torch.nn.Linear(32, 32), fastlm.nn.RMSNorm(32), torch.nn.Linear(32, 8))
    x = random_tensor(6, 32)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), block(x))
    compiled(x).sum().backward()
    assert block[1].weight.grad is not None


def test_inductor_on_transposed_input():
    # Inductor (unlike aot_eager) lays out buffers from the fakes' strides and asserts the real ones:
    # a transposed input, whose transpose is taken inside the graph, catches a fake that keeps it.
    torch._dynamo.reset()
    x, residual = random_tensor(24, 6).requires_grad_(), random_tensor(24, 6).requires_grad_()
    w, b = random_tensor(24).requires_grad_(), random_tensor(24).requires_grad_()

    def block(x, residual):
        y, r = layer_norm(x.t(), w, b, residual=residual.t())
        return (y * r).sum()

    expected = torch.autograd.grad(block(x, residual), (x, residual, w, b))
    # Without the graph caches, whose keys do not cover a custom op's fake: a graph compiled against
    # an older fake would be reused.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        got = torch.autograd.grad(torch.compile(block, fullgraph=True)(x, residual), (x, residual, w, b))
    # The norm runs the same kernel in both; inductor fuses only the product and the sum around it,
    # whose fp32 rounding may differ: a few ulps of these O(1) gradients.
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (fastlm.nn.LayerNorm, torch.nn.LayerNorm, {}),
        (fastlm.nn.LayerNorm, torch.nn.LayerNorm, {"bias": False}),
        (fastlm.nn.LayerNorm, torch.nn.LayerNorm, {"elementwise_affine": False}),
        (fastlm.nn.RMSNorm, torch.nn.RMSNorm, {"eps": 1e-6}),
        (fastlm.nn.RMSNorm, torch.nn.RMSNorm, {}),
    ],
    ids=["layer", "layer-nobias", "layer-noaffine", "rms", "rms-default-eps"],
)
def test_modules_are_drop_ins(ours, theirs, kwargs):
    ref = theirs(48, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(random_tensor(*p.shape))
    mod = ours(48, **kwargs)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    mod.load_state_dict(ref.state_dict())
    x = random_tensor(3, 7, 48)
    torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-5)
    residual = random_tensor(3, 7, 48)
    y, r = mod(x, residual)
    torch.testing.assert_close(r, x + residual)
    torch.testing.assert_close(y, ref(x + residual), atol=1e-5, rtol=1e-5)
