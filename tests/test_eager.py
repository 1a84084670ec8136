"""The eager fast path (fastlm.eager): bit-identical to the registered custom ops, taken in plain eager
mode, and not taken where something traces (torch.compile, make_fx, functorch, tensor subclasses)."""

import contextlib
from dataclasses import dataclass
from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.profiler import ProfilerActivity, profile

import fastlm
from fastlm import eager
from fastlm.nn.mlp import fused_mlp
from fastlm.ops.norm import _norm_fwd_op
from fastlm.testing import poison_outputs, random_tensor
from tests.backends import cpu_backend_params


@dataclass(frozen=True)
class Case:
    op: str  # the backend op it runs (fastlm.backend), to skip the backends it lacks
    make: Callable[[], tuple]  # fresh inputs; float tensors are leaves that require grad
    run: Callable[..., object]  # the public call


def _leaf(*shape, scale=1.0):
    return random_tensor(*shape, scale=scale).requires_grad_()


def _rope_tables(seqlen, half):
    angles = torch.arange(seqlen)[:, None] * torch.rand(half)[None, :]
    return angles.cos(), angles.sin()


def _targets(shape, vocab):
    target = torch.randint(0, vocab, shape)
    target.view(-1)[::4] = -100  # some ignored rows
    return target


# Odd, small shapes: the fast path's routing does not depend on size, and the Triton interpreter is slow.
CASES = {
    "layer_norm-residual": Case(
        "norm_fwd",
        lambda: (_leaf(3, 5, 37), _leaf(37), _leaf(37), _leaf(3, 5, 37)),
        lambda x, w, b, r: fastlm.layer_norm(x, w, b, residual=r),
    ),
    "rms_norm": Case("norm_fwd", lambda: (_leaf(3, 37), _leaf(37)), lambda x, w: fastlm.rms_norm(x, w)),
    "rope-positions": Case(
        "rope",
        lambda: (_leaf(2, 7, 3, 16), _leaf(2, 7, 1, 16), *_rope_tables(11, 8), torch.randint(0, 11, (2, 7))),
        lambda q, k, cos, sin, pos: fastlm.rope(q, k, cos, sin, pos),
    ),
    "swiglu": Case("act_fwd", lambda: (_leaf(3, 5, 29), _leaf(3, 5, 29)), fastlm.swiglu),
    "geglu": Case("act_fwd", lambda: (_leaf(3, 29), _leaf(3, 29)), fastlm.geglu),
    "gelu": Case("act_fwd", lambda: (_leaf(4, 29),), fastlm.gelu),
    "fused_mlp": Case(
        "act_fwd",
        lambda: (_leaf(3, 5, 16), _leaf(58, 16, scale=0.2), _leaf(16, 29, scale=0.2)),
        lambda x, w_in, w_out: fused_mlp(x, w_in, None, w_out, None, "silu", gated=True),
    ),
    "cross_entropy": Case(
        "cross_entropy_fwd",
        lambda: (_leaf(2, 5, 33), _targets((2, 5), 33)),
        lambda logits, target: fastlm.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-3),
    ),
    "cross_entropy-none": Case(
        "cross_entropy_fwd",
        lambda: (_leaf(7, 33), _targets((7,), 33)),
        lambda logits, target: fastlm.cross_entropy(logits, target, reduction="none"),
    ),
    "linear_cross_entropy": Case(
        "cross_entropy_fwd",
        lambda: (_leaf(2, 9, 16), _leaf(41, 16, scale=0.3), _leaf(41), _targets((2, 9), 41)),
        lambda h, w, b, target: fastlm.linear_cross_entropy(h, w, target, bias=b, chunk_size=5),
    ),
    "linear_cross_entropy-none": Case(
        "cross_entropy_fwd",
        lambda: (_leaf(9, 16), _leaf(41, 16, scale=0.3), _targets((9,), 41)),
        lambda h, w, target: fastlm.linear_cross_entropy(h, w, target, reduction="none", chunk_size=4),
    ),
    # Large enough for the cpp backend's oneDNN path (fastlm.ops.gemm's thresholds).
    "gemm-bias": Case(
        "gemm",
        lambda: (_leaf(64, 96), _leaf(400, 96, scale=0.1), _leaf(400)),
        lambda a, w, b: fastlm.ops.gemm(a, w.t(), b),
    ),
    "linear-3d": Case(
        "gemm",
        lambda: (_leaf(2, 37, 96), _leaf(300, 96, scale=0.1)),
        lambda x, w: fastlm.ops.linear(x, w),
    ),
    "attention-causal-gqa": Case(
        "attention_fwd",
        lambda: (_leaf(2, 9, 4, 16), _leaf(2, 9, 2, 16), _leaf(2, 9, 2, 16)),
        lambda q, k, v: fastlm.attention(q, k, v, causal=True),
    ),
    "attention-atomic-dq": Case(
        "attention_fwd",
        lambda: (_leaf(2, 9, 4, 16), _leaf(2, 9, 2, 16), _leaf(2, 9, 2, 16)),
        lambda q, k, v: fastlm.attention(q, k, v, causal=True, deterministic=False),
    ),
    "attention-varlen-dropout": Case(
        "attention_fwd",
        lambda: (_leaf(12, 2, 16), _leaf(12, 2, 16), _leaf(12, 2, 16), torch.tensor([0, 5, 12], dtype=torch.int32)),
        lambda q, k, v, cu: fastlm.attention(q, k, v, dropout_p=0.2, cu_seqlens_q=cu, cu_seqlens_k=cu),
    ),
}
# The gemm cases need the custom op, which runs only where the matmuls run oneDNN.
pytestmark = pytest.mark.usefixtures("onednn_gemm")
# Triton runs under the interpreter here: one dtype is enough to check the routing (bf16 is wrong there).
BACKENDS = [p for p in cpu_backend_params() if p.values[1] == torch.float32]


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def forward_backward(case: Case, route: str):
    """(outputs, input gradients) of one call and a backward with random cotangents, all seeded."""
    torch.manual_seed(0)
    inputs = case.make()
    leaves = [t for t in inputs if t.requires_grad]
    with eager.use_custom_ops() if route == "custom_op" else contextlib.nullcontext(), poison_outputs():
        outs = _outputs(case.run(*inputs))
        cotangents = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, cotangents, allow_unused=True)
    return outs, grads


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name", CASES)
def test_fast_path_is_bit_identical_to_the_custom_op(name, backend, dtype):
    if backend not in fastlm.backend._registry[CASES[name].op]:
        pytest.skip(f"{CASES[name].op} has no {backend} backend")
    with fastlm.use_backend(backend):
        fast_out, fast_grads = forward_backward(CASES[name], "eager")
        op_out, op_grads = forward_backward(CASES[name], "custom_op")
    assert len(fast_out) == len(op_out) and len(fast_grads) == len(op_grads)
    for i, (a, b) in enumerate(zip(fast_out + list(fast_grads), op_out + list(op_grads))):
        assert (a is None) == (b is None), f"tensor {i}: only one route produced it"
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f"tensor {i}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
            assert torch.equal(a, b), f"tensor {i} differs: max |diff| {(a - b).abs().max().item():.3e}"


def _custom_op_calls(fn) -> set[str]:
    """Names of the fastlm:: custom ops the dispatcher ran while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fastlm::")}


@pytest.mark.parametrize("name", CASES)
def test_eager_calls_skip_the_dispatcher(name):
    case = CASES[name]
    assert _custom_op_calls(lambda: forward_backward(case, "eager")) == set()
    # The check can fail: the same calls through the registered ops show up in the profile.
    assert _custom_op_calls(lambda: forward_backward(case, "custom_op"))


def test_no_grad_and_inference_mode_take_the_fast_path():
    x, w = random_tensor(3, 37).requires_grad_(), random_tensor(37)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert _custom_op_calls(lambda: fastlm.rms_norm(x, w)) == set()
            y = fastlm.rms_norm(x, w)
        assert not y.requires_grad
        with eager.use_custom_ops(), mode():
            assert torch.equal(y, fastlm.rms_norm(x, w))


def _graph_ops(gm: torch.fx.GraphModule) -> set:
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


def test_torch_compile_traces_the_registered_op():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, w = random_tensor(3, 37), random_tensor(37)
    compiled = torch.compile(lambda x, w: fastlm.rms_norm(x, w) * 2, backend=capture, fullgraph=True)
    torch.testing.assert_close(compiled(x, w), fastlm.rms_norm(x, w) * 2, rtol=0, atol=0)
    assert len(graphs) == 1 and torch.ops.fastlm.norm_fwd.default in _graph_ops(graphs[0])


def test_make_fx_traces_the_registered_op():
    # make_fx traces under a TorchDispatchMode: a direct call would trace the kernel's internals instead.
    gm = make_fx(lambda x, w: fastlm.rms_norm(x, w))(random_tensor(3, 37), random_tensor(37))
    assert torch.ops.fastlm.norm_fwd.default in _graph_ops(gm)


def test_functorch_transforms_go_through_the_registered_op():
    # The kernels cannot read functorch's wrapped tensors: under a transform the registered op answers (with
    # torch 2.13 it refuses torch.func.grad, as it did before the fast path existed; a torch that supports
    # it returns the gradient). Either way the dispatcher must have seen the op.
    x, w = random_tensor(3, 37), random_tensor(37)

    def transformed():
        with contextlib.suppress(RuntimeError):
            torch.func.grad(lambda x: fastlm.rms_norm(x, w).sum())(x)

    assert "fastlm::norm_fwd" in _custom_op_calls(transformed)


class _Subclass(torch.Tensor):
    pass


def test_tensor_subclass_goes_through_the_registered_op():
    x, w = random_tensor(3, 37).as_subclass(_Subclass), random_tensor(37)
    assert _custom_op_calls(lambda: fastlm.rms_norm(x, w)) == {"fastlm::norm_fwd"}


def test_keyword_arguments_are_bound_like_the_custom_op():
    x, w = random_tensor(3, 37), random_tensor(37)
    by_keyword = _norm_fwd_op(x, w, bias=None, residual=None, eps=1e-6, is_rms=True)
    positional = _norm_fwd_op(x, w, None, None, 1e-6, True)
    for a, b in zip(by_keyword, positional):
        assert torch.equal(a, b)


def test_kvcache_mutation_bumps_the_version_counter():
    batch, seqlen, kv_heads, head_dim = 2, 6, 1, 16
    k_cache, v_cache = random_tensor(batch, seqlen, kv_heads, head_dim), random_tensor(batch, seqlen, kv_heads, head_dim)
    q, k_new, v_new = (random_tensor(batch, 1, h, head_dim) for h in (2, kv_heads, kv_heads))
    versions = k_cache._version, v_cache._version
    fastlm.attention_with_kvcache(q, k_cache, v_cache, torch.tensor([2, 3], dtype=torch.int32), k_new, v_new)
    assert k_cache._version > versions[0] and v_cache._version > versions[1]
    torch.testing.assert_close(k_cache[0, 2], k_new[0, 0], rtol=0, atol=0)


@pytest.mark.parametrize("route", ["eager", "custom_op"])
def test_double_backward_reports_the_missing_formula(route):
    # norm_bwd has no autograd formula: a gradient through it goes to the registered op, which says so.
    x, w = random_tensor(3, 37).requires_grad_(), random_tensor(37).requires_grad_()
    with eager.use_custom_ops() if route == "custom_op" else contextlib.nullcontext():
        (dx,) = torch.autograd.grad(fastlm.rms_norm(x, w).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula was registered"):
            dx.sum().backward()
