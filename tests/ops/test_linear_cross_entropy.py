"""linear_cross_entropy against float64 references, on every backend that runs here."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.linear_cross_entropy import default_chunk_size, linear_cross_entropy, linear_cross_entropy_ref
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params
from tests.ops.test_cross_entropy import IGNORE, option_id, plain_torch

# (tokens, dim, vocab, chunk_size): chunk sizes that do not divide the tokens, the default
# rule (None), and vocabularies 2 .. 50257. The 50257 case keeps its 5 tokens in one chunk:
# PyTorch's CPU matmul sums a 50257-long dot product less accurately for 1-3 rows than for
# more (a different kernel), which is not ours to test.
# The last, (300, 64, 1151), is large enough for the CPU matmuls to run oneDNN (fastlm.ops.gemm),
# including its weight-gradient accumulation (the narrow-output rule).
SHAPES = [(1, 16, 5003, None), (37, 24, 1000, 10), (1023, 8, 2, 100), (5, 32, 50257, None), (300, 64, 1151, 128)]
# (reduction, label_smoothing, z_loss, bias): every reduction, each option alone and together;
# the bias on the pre-scaled (mean) and the recomputing (none) backward paths.
OPTIONS = [("mean", 0.0, 0.0, True), ("sum", 0.1, 0.0, False), ("none", 0.0, 1e-3, True), ("mean", 0.2, 1e-2, False)]
FP32_PARAMS = [p for p in cpu_backend_params() if p.values[1] == torch.float32]


def make_inputs(tokens, dim, vocab, dtype, with_bias=True, ignore_frac=0.25):
    hidden = random_tensor(tokens, dim, dtype=dtype)
    weight = random_tensor(vocab, dim, dtype=dtype, scale=dim**-0.5 * 2)
    bias = random_tensor(vocab, dtype=dtype) if with_bias else None
    target = torch.randint(0, vocab, (tokens,))
    target[torch.rand(tokens) < ignore_frac] = IGNORE
    return hidden, weight, bias, target


def plain_torch_linear(hidden, weight, target, bias=None, chunk_size=None, **kwargs):
    return plain_torch(F.linear(hidden, weight, bias), target, **kwargs)


def forward_backward(fn, hidden, weight, bias, target, grad_out=None, **kwargs):
    """(loss, [d hidden, d weight, d bias]) of sum(loss * grad_out), on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, bias=leaves[2], **kwargs)
    if grad_out is None:
        grad_out = torch.ones_like(loss, dtype=torch.float64)
    (loss.double() * grad_out).sum().backward()
    return loss, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("tokens,dim,vocab,chunk", SHAPES, ids=[f"t{t}-d{d}-v{v}-c{c}" for t, d, v, c in SHAPES])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: option_id(o[:3]) + ("-bias" if o[3] else "-nobias"))
def test_matches_float64_reference(backend, dtype, tokens, dim, vocab, chunk, options):
    reduction, ls, z, with_bias = options
    hidden, weight, bias, target = make_inputs(tokens, dim, vocab, dtype, with_bias)
    kwargs = dict(reduction=reduction, label_smoothing=ls, z_loss=z)
    grad_out = random_tensor(tokens, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7).double()
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]

    ref, ref_grads = forward_backward(linear_cross_entropy_ref, *as64, target, grad_out, **kwargs)
    base, base_grads = forward_backward(plain_torch_linear, hidden, weight, bias, target, grad_out, **kwargs)
    with fastlm.use_backend(backend), poison_outputs():
        loss, grads = forward_backward(
            linear_cross_entropy, hidden, weight, bias, target, grad_out, chunk_size=chunk, **kwargs
        )

    assert loss.dtype == torch.float32
    assert_matches_reference("loss", loss, ref, base, dtype)
    for name, g, r, b in zip(["dhidden", "dweight", "dbias"], grads, ref_grads, base_grads):
        if r is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_matches_reference(name, g, r, b, dtype, grad=True)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_not_nan(backend, dtype, reduction):
    hidden, weight, bias, _ = make_inputs(9, 12, 300, dtype)
    target = torch.full((9,), IGNORE)
    grad_out = random_tensor(9, dtype=torch.float64) if reduction == "none" else None
    with fastlm.use_backend(backend), poison_outputs():
        loss, grads = forward_backward(linear_cross_entropy, hidden, weight, bias, target, grad_out,
                                       reduction=reduction, chunk_size=4, label_smoothing=0.1, z_loss=1e-2)
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
def test_num_items_makes_micro_batches_accumulate_to_the_batch_mean(backend, dtype):
    # Gradient accumulation: two micro-batches normalised by the global target count give
    # the big batch's mean loss and the same accumulated gradients.
    hidden, weight, bias, target = make_inputs(40, 16, 257, dtype, ignore_frac=0.3)
    with fastlm.use_backend(backend):
        full_loss, full_grads = forward_backward(linear_cross_entropy, hidden, weight, bias, target, chunk_size=7)
    count = int((target != IGNORE).sum())
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    total = 0.0
    hidden_grads = []
    with fastlm.use_backend(backend):
        for s in (slice(0, 15), slice(15, 40)):
            h = hidden[s].clone().requires_grad_()
            loss = linear_cross_entropy(h, w, target[s], b, num_items=count, chunk_size=7)
            loss.backward()
            total = total + loss.detach()
            hidden_grads.append(h.grad)
    torch.testing.assert_close(total, full_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(hidden_grads), full_grads[0], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(w.grad, full_grads[1], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(b.grad, full_grads[2], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("num_items", [0, torch.tensor(-3)], ids=["int0", "tensor-3"])
def test_num_items_below_one_with_targets_raises(num_items):
    hidden, weight, bias, target = make_inputs(5, 8, 30, torch.float32, ignore_frac=0.0)
    with pytest.raises(ValueError, match="num_items .* must be >= 1"):
        linear_cross_entropy(hidden, weight, target, bias, num_items=num_items)
    # With every target ignored there is nothing to count: 0 is the natural count, and the loss is 0.
    loss = linear_cross_entropy(hidden, weight, torch.full_like(target, IGNORE), bias, num_items=0)
    assert torch.equal(loss, torch.zeros_like(loss))


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
def test_frozen_weight_leading_dims_and_int32_target(backend, dtype):
    hidden, weight, _, target = make_inputs(12, 10, 90, dtype, with_bias=False)
    h = hidden.reshape(3, 4, 10).clone().requires_grad_()
    with fastlm.use_backend(backend):
        loss = linear_cross_entropy(h, weight, target.reshape(3, 4).int(), chunk_size=5, reduction="none")
        loss.sum().backward()
    h64 = hidden.double().reshape(3, 4, 10).requires_grad_()
    ref = linear_cross_entropy_ref(h64, weight.double(), target.reshape(3, 4), reduction="none")
    ref.sum().backward()
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=1e-6, rtol=1e-5)


def test_default_chunk_size_rule():
    # A chunk of logits ~ the size of hidden (tokens * dim elements), at least 256 tokens.
    assert default_chunk_size(8192, 131072, 4096) == 256
    assert default_chunk_size(65536, 131072, 4096) == 2048
    assert default_chunk_size(100, 50257, 768) == 100
    assert default_chunk_size(5000, 1000, 4096) == 5000


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
def test_target_out_of_range_raises(backend, dtype):
    hidden, weight, bias, target = make_inputs(8, 6, 64, dtype)
    target[2] = 64
    with fastlm.use_backend(backend), pytest.raises(ValueError, match=r"target values must be in \[0, 64\)"):
        linear_cross_entropy(hidden, weight, target, bias)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda h, w, b, t: linear_cross_entropy(h.double(), w, t), TypeError, "hidden must be float32"),
        (lambda h, w, b, t: linear_cross_entropy(h[0], w, t[0]), ValueError, r"hidden must be \(tokens, dim\)"),
        (lambda h, w, b, t: linear_cross_entropy(h, w.half(), t), TypeError, "weight must have hidden's dtype"),
        (lambda h, w, b, t: linear_cross_entropy(h, w[:, :5], t), ValueError, r"weight must have shape \(vocab, 8\)"),
        (lambda h, w, b, t: linear_cross_entropy(h, w.tolist(), t), TypeError, "weight must be a torch.Tensor"),
        (lambda h, w, b, t: linear_cross_entropy(h, w.to("meta"), t), ValueError, "weight is on meta"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, b[:-1]), ValueError, r"bias must have shape \(30,\)"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, b.half()), TypeError, "bias must have hidden's dtype"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t.float()), TypeError, "target must be int64 or int32"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t[:2]), ValueError, r"target must have shape \(5,\)"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, chunk_size=0), ValueError, "chunk_size must be > 0"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, chunk_size=2.0), TypeError, "chunk_size must be an int"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, z_loss=-1), ValueError, "z_loss must be a non-negative"),
        (lambda h, w, b, t: linear_cross_entropy(h, w, t, reduction="none", num_items=3), ValueError,
         "needs reduction='mean'"),
    ],
    ids=[
        "float64-hidden", "1d-hidden", "weight-dtype", "weight-shape", "list-weight", "weight-device", "bias-shape",
        "bias-dtype", "float-target", "target-shape", "zero-chunk", "float-chunk", "bad-reduction",
        "label-smoothing-range", "negative-z-loss", "num-items-with-none",
    ],
)
def test_bad_input_raises_before_launch(call, error, match):
    hidden, weight, bias, target = make_inputs(5, 8, 30, torch.float32, ignore_frac=0.0)
    with pytest.raises(error, match=match):
        call(hidden, weight, bias, target)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(backend, dtype, reduction, transposed):
    hidden, weight, bias, target = make_inputs(7, 6, 50, dtype)
    if transposed:  # the gradients are contiguous whatever the inputs' strides, and the fakes must say so
        hidden, weight = hidden.t().contiguous().t(), weight.t().contiguous().t()
    for t in (hidden, weight, bias):
        t.requires_grad_()
    with fastlm.use_backend(backend):
        torch.library.opcheck(
            torch.ops.fastlm.linear_cross_entropy_fwd.default,
            (hidden, weight, bias, target, None, -1, IGNORE, reduction, 0.1, 1e-3, 3, True, True, True),
        )
        torch.library.opcheck(
            torch.ops.fastlm.linear_cross_entropy_bwd.default,
            (random_tensor(7), hidden.detach(), weight.detach(), None, target, IGNORE, 0.0, 1e-3, 4, True, True, False),
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    proj = torch.nn.Linear(16, 16)
    head = torch.nn.Linear(16, 200)
    x = random_tensor(2, 9, 16)
    target = torch.randint(0, 200, (2, 9))
    target[1, 2] = IGNORE

    def step(x, target):
        return linear_cross_entropy(proj(x), head.weight, target, head.bias, z_loss=1e-3, chunk_size=5)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, target)
    torch.testing.assert_close(loss, step(x, target))
    loss.backward()
    compiled_grads = [p.grad.clone() for p in (proj.weight, head.weight, head.bias)]
    for p in (proj.weight, head.weight, head.bias):
        p.grad = None
    step(x, target).backward()
    for got, p in zip(compiled_grads, (proj.weight, head.weight, head.bias)):
        torch.testing.assert_close(got, p.grad)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("factor", [0.5, 1.0], ids=["grad0.5", "grad1"])
def test_backward_twice_with_retained_graph(backend, dtype, reduction, factor):
    # The backward never modifies the stored gradients (a product is out of place; a unit grad_loss
    # returns them as they are), so a second backward gives the same, and .backward() twice accumulates twice.
    leaves = [t.requires_grad_() for t in make_inputs(6, 8, 40, dtype)[:3]]
    target = torch.randint(0, 40, (6,))
    with fastlm.use_backend(backend):
        loss = linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], reduction=reduction).sum() * factor
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves, retain_graph=True)
        loss.backward(retain_graph=True)
        loss.backward()
    for a, b, leaf in zip(first, second, leaves):
        assert torch.equal(a, b)
        torch.testing.assert_close(leaf.grad, 2 * a, rtol=0, atol=0)


@pytest.mark.parametrize("custom_ops", [False, True], ids=["eager", "custom-op"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises(reduction, custom_ops):
    # mean and sum store their gradients in the forward; none recomputes them in a backward op that
    # has no autograd formula itself. Either way the second backward is an error, not a wrong result.
    leaves = [t.requires_grad_() for t in make_inputs(6, 8, 40, torch.float32)[:3]]
    target = torch.randint(0, 40, (6,))
    with fastlm.eager.use_custom_ops() if custom_ops else contextlib.nullcontext():
        loss = linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], reduction=reduction).sum()
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    match = "linear_cross_entropy: double backward .* is not supported|no autograd formula"
    for grad in grads:
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(grad.pow(2).sum(), leaves)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unit_grad_loss_returns_the_stored_gradients(backend, dtype, reduction):
    # loss.backward() on the loss itself (grad_loss exactly 1): on the CPU the backward returns the
    # gradients the forward stored, without a product by 1 (a copy of the weight's size).
    hidden, weight, bias, target = make_inputs(37, 24, 101, dtype, True)
    one = torch.tensor(1.0, dtype=torch.float64)
    as64 = [t.double() for t in (hidden, weight, bias)]
    ref, ref_grads = forward_backward(linear_cross_entropy_ref, *as64, target, one, reduction=reduction)
    base, base_grads = forward_backward(plain_torch_linear, hidden, weight, bias, target, one, reduction=reduction)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with fastlm.use_backend(backend), poison_outputs():
        loss = linear_cross_entropy(leaves[0], leaves[1], target, leaves[2], reduction=reduction)
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
    for name, leaf, r, b in zip(["dhidden", "dweight", "dbias"], leaves, ref_grads, base_grads):
        assert_matches_reference(name, leaf.grad, r, b, dtype, grad=True)
    shapes = [list(t.shape) for t in (hidden, weight, bias)]
    products = [e.input_shapes for e in prof.events()
                if e.name in ("aten::mul", "aten::mul_") and any(s in e.input_shapes for s in shapes)]
    assert products == []


class _Outputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op, numel, dtype) of every new tensor an op returns while active (views of an input,
    such as the detach that unpacks a saved tensor, are not new memory and are left out)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), t.numel(), t.dtype))
        return result


def test_backward_allocates_no_zeros_for_the_stored_gradients():
    """The op's stored-gradient outputs never receive a gradient; autograd must not materialize zeros for
    them (for the weight an fp32 tensor of its size: on the GPU, 256 MiB at vocab 64k x 1024)."""
    hidden = random_tensor(37, 24, dtype=torch.bfloat16).requires_grad_()
    weight = random_tensor(101, 24, dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, 101, (37,))
    loss = linear_cross_entropy(hidden, weight, target)
    with _Outputs() as mode:
        loss.backward()
    fp32_weight_sized = [op for op, numel, dtype in mode.seen if numel == weight.numel() and dtype == torch.float32]
    assert fp32_weight_sized == [], fp32_weight_sized
    assert hidden.grad is not None and weight.grad.dtype == torch.bfloat16
