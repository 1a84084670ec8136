"""cross_entropy against float64 references, on every backend that runs here."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.ops.cross_entropy import cross_entropy, cross_entropy_ref
from fastlm.testing import assert_matches_reference, poison_outputs, random_tensor
from tests.backends import cpu_backend_params

IGNORE = -100
# (tokens, vocab): one token of a mid vocabulary, odd sizes, many tokens of a tiny vocabulary,
# and GPT-2's 50257 (13 blocks of the Triton kernel's loop) with few tokens for the interpreter.
SHAPES = [(1, 5003), (37, 1000), (1023, 2), (3, 50257)]
# (reduction, label_smoothing, z_loss): every reduction, each option alone and together.
OPTIONS = [("mean", 0.0, 0.0), ("sum", 0.1, 0.0), ("none", 0.0, 1e-3), ("mean", 0.2, 1e-2)]
FP32_PARAMS = [p for p in cpu_backend_params() if p.values[1] == torch.float32]


def option_id(o):
    reduction, ls, z = o
    return f"{reduction}" + (f"-ls{ls}" if ls else "") + (f"-z{z}" if z else "")


def make_inputs(tokens, vocab, dtype, ignore_frac=0.25, leading=None):
    logits = random_tensor(tokens, vocab, dtype=dtype, scale=3.0)
    target = torch.randint(0, vocab, (tokens,))
    target[torch.rand(tokens) < ignore_frac] = IGNORE
    if leading is not None:
        logits, target = logits.reshape(*leading, vocab), target.reshape(leading)
    return logits, target


def plain_torch(logits, target, ignore_index=IGNORE, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                num_items=None):
    """What a user gets from torch in logits' dtype: the FlashAttention-rule baseline."""
    x = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1)
    valid = t != ignore_index
    rows = F.cross_entropy(x, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(x, -1) ** 2, 0.0)
    if reduction == "none":
        return rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum()
    count = valid.sum() if num_items is None else torch.as_tensor(num_items)
    return rows.sum() / count.clamp_min(1)


def forward_backward(fn, logits, target, grad_out=None, **kwargs):
    """(loss, d(sum(loss * grad_out))/d logits) on a fresh leaf copy of logits."""
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, target, **kwargs)
    if grad_out is None:
        grad_out = torch.ones_like(loss, dtype=torch.float64)
    (loss.double() * grad_out).sum().backward()
    return loss, leaf.grad


def grad_for(loss_shape):
    return random_tensor(*loss_shape, dtype=torch.float64) if loss_shape else torch.tensor(0.7, dtype=torch.float64)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("tokens,vocab", SHAPES, ids=[f"t{t}-v{v}" for t, v in SHAPES])
@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
def test_matches_float64_reference(backend, dtype, tokens, vocab, options):
    reduction, ls, z = options
    logits, target = make_inputs(tokens, vocab, dtype)
    kwargs = dict(reduction=reduction, label_smoothing=ls, z_loss=z)
    grad_out = grad_for(target.shape if reduction == "none" else ())

    ref, ref_grad = forward_backward(cross_entropy_ref, logits.double(), target, grad_out, **kwargs)
    base, base_grad = forward_backward(plain_torch, logits, target, grad_out, **kwargs)
    with fastlm.use_backend(backend), poison_outputs():
        loss, grad = forward_backward(cross_entropy, logits, target, grad_out, **kwargs)

    assert loss.dtype == torch.float32
    assert grad.dtype == dtype
    assert_matches_reference("loss", loss, ref, base, dtype)
    assert_matches_reference("dlogits", grad, ref_grad, base_grad, dtype, grad=True)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
def test_leading_dims_and_int32_target(backend, dtype):
    logits, target = make_inputs(2 * 3 * 5, 130, dtype, leading=(2, 3, 5))
    with fastlm.use_backend(backend):
        for reduction in ("mean", "none"):
            loss, grad = forward_backward(cross_entropy, logits, target.int(), reduction=reduction)
            ref, ref_grad = forward_backward(cross_entropy_ref, logits.double(), target, reduction=reduction)
            assert loss.shape == ref.shape
            torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_not_nan(backend, dtype, reduction):
    logits, _ = make_inputs(9, 300, dtype)
    target = torch.full((9,), IGNORE)
    with fastlm.use_backend(backend), poison_outputs():
        loss, grad = forward_backward(
            cross_entropy, logits, target, grad_for((9,) if reduction == "none" else ()), reduction=reduction,
            label_smoothing=0.1, z_loss=1e-2,
        )
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_makes_micro_batches_add_up_to_the_batch_mean(backend, dtype, as_tensor):
    logits, target = make_inputs(40, 257, dtype, ignore_frac=0.3)
    count = int((target != IGNORE).sum())
    num_items = torch.tensor(count) if as_tensor else count
    with fastlm.use_backend(backend):
        full_loss, full_grad = forward_backward(cross_entropy, logits, target, z_loss=1e-3)
        parts = [forward_backward(cross_entropy, logits[s], target[s], num_items=num_items, z_loss=1e-3)
                 for s in (slice(0, 15), slice(15, 40))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, atol=1e-7, rtol=1e-6)
    ref = cross_entropy_ref(logits[:15].double(), target[:15], num_items=count, z_loss=1e-3)
    torch.testing.assert_close(parts[0][0].double(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_items", [0, torch.tensor(0), torch.tensor(-3), torch.tensor(0.5)],
                         ids=["int0", "tensor0", "tensor-3", "tensor0.5"])
def test_num_items_below_one_with_targets_raises(num_items):
    # The mean's denominator is clamped to 1 (so an all-ignored batch is 0, not NaN): a count below 1
    # with targets to count would silently make the mean the sum. Ints and CPU tensors are checked.
    logits, target = make_inputs(5, 16, torch.float32, ignore_frac=0.0)
    with pytest.raises(ValueError, match="num_items .* must be >= 1"):
        cross_entropy(logits, target, num_items=num_items)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_zero_with_every_target_ignored_is_a_zero_loss(backend, dtype, as_tensor):
    logits, _ = make_inputs(5, 16, dtype)
    target = torch.full((5,), IGNORE)
    with fastlm.use_backend(backend):
        loss, grad = forward_backward(cross_entropy, logits, target, num_items=torch.tensor(0) if as_tensor else 0)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_num_items_checked_when_compiled():
    # The count is read where the op runs on real tensors, so a compiled call checks it too.
    torch._dynamo.reset()
    logits, target = make_inputs(5, 16, torch.float32, ignore_frac=0.0)
    compiled = torch.compile(lambda x, n: cross_entropy(x, target, num_items=n), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, torch.tensor(4)), cross_entropy(logits, target, num_items=4))
    with pytest.raises(ValueError, match="num_items .* must be >= 1"):
        compiled(logits, torch.tensor(0))


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
def test_vocab_256k_and_masked_logits(backend, dtype):
    # 262144 columns: 64 blocks of the Triton loop. Row 0 has its whole first block at -inf
    # (a masked vocabulary), which must not turn the online logsumexp into NaN.
    logits, _ = make_inputs(2, 262144, dtype)
    logits[0, :4096] = -float("inf")
    target = torch.tensor([5000, 17])
    with fastlm.use_backend(backend), poison_outputs():
        loss, grad = forward_backward(cross_entropy, logits, target, z_loss=1e-4)
    ref, ref_grad = forward_backward(cross_entropy_ref, logits.double(), target, z_loss=1e-4)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-8, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_is_torch_definition(reduction):
    # cross_entropy_ref's formula (lse - (1-ls) x_t - ls mean(x)) is F.cross_entropy's.
    logits, target = make_inputs(50, 33, torch.float64)
    ours = cross_entropy_ref(logits, target, reduction=reduction, label_smoothing=0.15)
    theirs = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.15)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
def test_non_contiguous_logits_empty_batch_and_no_grad(backend, dtype):
    logits = random_tensor(64, 30).t()  # (30, 64), not contiguous
    target = torch.randint(0, 64, (30,))
    with fastlm.use_backend(backend):
        torch.testing.assert_close(
            cross_entropy(logits, target).double(), cross_entropy_ref(logits.double(), target), atol=1e-5, rtol=1e-5
        )
        with torch.no_grad():
            torch.testing.assert_close(cross_entropy(logits, target, reduction="sum"),
                                       cross_entropy_ref(logits, target, reduction="sum"))
        empty = cross_entropy(torch.empty(0, 64), torch.empty(0, dtype=torch.long))
        assert empty.item() == 0.0


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("bad", [64, -1, -101], ids=["too-big", "negative", "negative-not-ignore"])
def test_target_out_of_range_raises(backend, dtype, bad):
    logits, target = make_inputs(8, 64, dtype)
    target[5] = bad
    match = rf"target values must be in \[0, 64\).*got {bad}"
    with fastlm.use_backend(backend), pytest.raises(ValueError, match=match):
        cross_entropy(logits, target)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda x, t: cross_entropy(x.int(), t), TypeError, "logits must be float32"),
        (lambda x, t: cross_entropy(x.double(), t), TypeError, "logits must be float32"),
        (lambda x, t: cross_entropy(x.tolist(), t), TypeError, "logits must be a torch.Tensor"),
        (lambda x, t: cross_entropy(x[0], t[0]), ValueError, r"logits must be \(tokens, vocab\)"),
        (lambda x, t: cross_entropy(x[:, :0], t), ValueError, "vocab .* must be >= 1"),
        (lambda x, t: cross_entropy(x, t.float()), TypeError, "target must be int64 or int32"),
        (lambda x, t: cross_entropy(x, t[:3]), ValueError, r"target must have shape \(4,\)"),
        (lambda x, t: cross_entropy(x, t.to("meta")), ValueError, "target is on meta"),
        (lambda x, t: cross_entropy(x, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda x, t: cross_entropy(x, t, label_smoothing=1.5), ValueError, r"label_smoothing must be .* in \[0, 1\]"),
        (lambda x, t: cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss must be a non-negative"),
        (lambda x, t: cross_entropy(x, t, ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (lambda x, t: cross_entropy(x, t, reduction="sum", num_items=3), ValueError, "needs reduction='mean'"),
        (lambda x, t: cross_entropy(x, t, num_items=-2), ValueError, "num_items must be >= 0"),
        (lambda x, t: cross_entropy(x, t, num_items=2.5), TypeError, "num_items must be an int"),
        (lambda x, t: cross_entropy(x, t, num_items=torch.ones(2)), ValueError, "num_items must be an int or a 0-d"),
    ],
    ids=[
        "int-logits", "float64-logits", "list-logits", "1d-logits", "empty-vocab", "float-target", "target-shape",
        "target-device", "bad-reduction", "label-smoothing-range", "negative-z-loss", "float-ignore-index",
        "num-items-with-sum", "negative-num-items", "float-num-items", "num-items-shape",
    ],
)
def test_bad_input_raises_before_launch(call, error, match):
    logits, target = make_inputs(4, 16, torch.float32, ignore_frac=0.0)
    with pytest.raises(error, match=match):
        call(logits, target)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_opcheck(backend, dtype, reduction, transposed):
    logits, target = make_inputs(6, 70, dtype)
    if transposed:  # the stored gradient is contiguous whatever the logits' strides, and the fake must say so
        logits = logits.t().contiguous().t()
    logits.requires_grad_()
    with fastlm.use_backend(backend):
        torch.library.opcheck(
            torch.ops.fastlm.cross_entropy_fwd.default, (logits, target, None, -1, IGNORE, reduction, 0.1, 1e-3, True)
        )
        torch.library.opcheck(
            torch.ops.fastlm.cross_entropy_fwd.default,
            (logits, target, torch.tensor(4), -1, IGNORE, "mean", 0.0, 0.0, True) if reduction == "mean"
            else (logits.detach(), target, None, 5, IGNORE, "mean", 0.0, 0.0, False),
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    head = torch.nn.Linear(24, 300)
    x = random_tensor(2, 7, 24)
    target = torch.randint(0, 300, (2, 7))
    target[0, 3] = IGNORE

    def step(x, target):
        return cross_entropy(head(x), target, label_smoothing=0.1, z_loss=1e-3, num_items=torch.tensor(11))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, target)
    torch.testing.assert_close(loss, step(x, target))
    loss.backward()
    compiled_grad = head.weight.grad.clone()
    head.weight.grad = None
    step(x, target).backward()
    torch.testing.assert_close(compiled_grad, head.weight.grad)


def test_inductor_on_transposed_logits():
    # Inductor (unlike aot_eager) lays out buffers from the fakes' strides and asserts the real ones.
    torch._dynamo.reset()
    logits_t, target = random_tensor(300, 9).requires_grad_(), torch.randint(0, 300, (9,))

    def step(logits_t):
        return cross_entropy(logits_t.t(), target, label_smoothing=0.1)

    expected = torch.autograd.grad(step(logits_t), logits_t)[0]
    # Without the graph caches, whose keys do not cover a custom op's fake: a graph compiled against
    # an older fake would be reused.
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        loss = torch.compile(step, fullgraph=True)(logits_t)
        got = torch.autograd.grad(loss, logits_t)[0]
    # The same kernel computes the loss and the stored gradient in both; the backward's product by
    # grad_loss = 1 is exact.
    torch.testing.assert_close(loss, step(logits_t), rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype", FP32_PARAMS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("factor", [0.5, 1.0], ids=["grad0.5", "grad1"])
def test_backward_twice_with_retained_graph(backend, dtype, reduction, factor):
    # The backward never modifies the stored gradient (a product is out of place; a unit grad_loss
    # returns it as is), so a second backward gives the same, and .backward() twice accumulates twice.
    logits, target = make_inputs(6, 50, dtype)
    leaf = logits.clone().requires_grad_()
    with fastlm.use_backend(backend):
        loss = cross_entropy(leaf, target, reduction=reduction).sum() * factor
        first = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
        second = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
        loss.backward(retain_graph=True)
        loss.backward()
    assert torch.equal(first, second)
    torch.testing.assert_close(leaf.grad, 2 * first, rtol=0, atol=0)


@pytest.mark.parametrize("custom_ops", [False, True], ids=["eager", "custom-op"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_raises(reduction, custom_ops):
    # The backward scales a gradient the forward stored, so differentiating it again has no formula to
    # follow: an error naming the op, not a wrong Hessian or an AttributeError.
    leaf = make_inputs(6, 50, torch.float32)[0].requires_grad_()
    target = torch.randint(0, 50, (6,))
    with fastlm.eager.use_custom_ops() if custom_ops else contextlib.nullcontext():
        loss = cross_entropy(leaf, target, reduction=reduction).sum()
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    torch.testing.assert_close(grad, torch.autograd.grad(loss, leaf, retain_graph=True)[0], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cross_entropy: double backward .* is not supported"):
        torch.autograd.grad(grad.pow(2).sum(), leaf)


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_unit_grad_loss_returns_the_stored_gradient(backend, dtype, reduction):
    # loss.backward() on the loss itself (grad_loss exactly 1): on the CPU the backward returns the
    # gradient the forward stored, without a product by 1 (a copy the size of the logits).
    logits, target = make_inputs(37, 1000, dtype)
    one = torch.tensor(1.0, dtype=torch.float64)
    ref, ref_grad = forward_backward(cross_entropy_ref, logits.double(), target, one, reduction=reduction)
    base, base_grad = forward_backward(plain_torch, logits, target, one, reduction=reduction)
    leaf = logits.clone().requires_grad_()
    with fastlm.use_backend(backend), poison_outputs():
        loss = cross_entropy(leaf, target, reduction=reduction)
        with torch.profiler.profile(record_shapes=True) as prof:
            loss.backward()
    assert_matches_reference("dlogits", leaf.grad, ref_grad, base_grad, dtype, grad=True)
    logits_sized = [e.name for e in prof.events() if e.name == "aten::mul" and list(logits.shape) in e.input_shapes]
    assert logits_sized == []
    # A second graph's gradient accumulates into the first (which is now the stored buffer itself).
    with fastlm.use_backend(backend):
        leaf = logits.clone().requires_grad_()
        cross_entropy(leaf, target, reduction=reduction).backward()
        first = leaf.grad.clone()
        cross_entropy(leaf * 0.5, target, reduction=reduction).backward()
        second = torch.autograd.grad(cross_entropy(leaf * 0.5, target, reduction=reduction), leaf)[0]
    torch.testing.assert_close(leaf.grad, first + second, rtol=0, atol=0)
