"""gemm / linear against float64 references, on every CPU backend; oneDNN really runs where chosen."""

import sys

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend
from fastlm.extension import cpu_extension
from fastlm.ops.gemm import addmm_, gemm, gemm_ref, linear, mm, onednn_available
from fastlm.testing import assert_matches_reference, random_tensor
from tests.backends import cpu_backend_params

CPU = torch.device("cpu")
ONEDNN = pytest.mark.skipif(not onednn_available(), reason="torch was built without oneDNN")
gemm_module = sys.modules[gemm.__module__]
pytestmark = pytest.mark.usefixtures("onednn_gemm")
# How a profile names fastlm's gemm op: registered (traced, or inside use_custom_ops) or eager.
GEMM_OP_EVENTS = {"fastlm::gemm", "_gemm_op_eager"}

# (m, k, n): odd sizes below and above the oneDNN thresholds, long reductions, and a narrow output
# (n <= 256 < m) that the transposed-operand rule computes the other way round.
SHAPES = [(1, 7, 1), (7, 40, 123), (123, 96, 1151), (1151, 80, 40), (300, 1151, 257), (96, 2048, 128),
          (768, 512, 128)]


def _operand(rows, cols, layout, dtype, generator):
    """A (rows, cols) operand stored row-major, transposed (a .t() view) or as a strided column slice."""
    if layout == "transposed":
        return random_tensor(cols, rows, dtype=dtype, generator=generator).t()
    if layout == "strided":
        return random_tensor(rows, 2 * cols + 3, dtype=dtype, generator=generator)[:, 1 : 2 * cols + 1 : 2]
    return random_tensor(rows, cols, dtype=dtype, generator=generator)


def _dot_scale(terms: int, *factors: torch.Tensor) -> float:
    """The floor's scale for results that are sums of ``terms`` products of the factors' elements.

    oneDNN accumulates a dot product in one float32 chain where MKL (torch's CPU matmul) sums blocks,
    so on long reductions its error is a few times MKL's, and the 2x rule alone fails on correct
    results. The floor therefore scales with sqrt(terms) * prod(max|factor|), the size of a sum of
    that many random terms: with 4 ulps of it the floor stays ~100x below float32's worst-case
    bound for such a sum (terms * ulp * sum|products|), and a wrong element still misses by O(1).
    """
    scale = terms**0.5
    for f in factors:
        scale *= f.abs().max().item()
    return scale


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``t`` with its strides (``clone`` would make a strided slice contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t).requires_grad_()


def _forward_backward(fn, inputs, grad_out):
    leaves = [_leaf(t) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("backend,dtype", cpu_backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}k{}n{}".format(*s))
@pytest.mark.parametrize("layout_a,layout_b", [("rows", "rows"), ("rows", "transposed"), ("transposed", "rows"),
                                               ("strided", "transposed")], ids=lambda v: v)
@pytest.mark.parametrize("bias_layout", [None, "contiguous", "strided"], ids=["nobias", "bias", "strided_bias"])
def test_matches_float64_reference(backend, dtype, shape, layout_a, layout_b, bias_layout):
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    a, b = _operand(m, k, layout_a, dtype, g), _operand(k, n, layout_b, dtype, g)
    bias = None
    if bias_layout == "contiguous":
        bias = random_tensor(n, dtype=dtype, generator=g)
    elif bias_layout == "strided":  # every other element of a longer vector (oneDNN needs it copied)
        bias = random_tensor(2 * n, dtype=dtype, generator=g)[::2]
    grad_out = random_tensor(m, n, generator=g)
    with fastlm.use_backend(backend):
        out, grads = _forward_backward(gemm, [a, b, bias], grad_out)
    assert out.shape == (m, n) and out.is_contiguous()
    ref, ref_grads = _forward_backward(gemm_ref, [t.double() if t is not None else None for t in (a, b, bias)],
                                       grad_out.double())
    plain, plain_grads = _forward_backward(gemm_ref, [a, b, bias], grad_out)
    assert_matches_reference("gemm", out, ref, plain, dtype, scale=_dot_scale(k, a, b))
    scales = (_dot_scale(n, grad_out, b), _dot_scale(m, a, grad_out), _dot_scale(m, grad_out))
    for name, got, want, base, scale in zip(("grad_a", "grad_b", "grad_bias"), grads, ref_grads, plain_grads, scales):
        if want is not None:
            assert_matches_reference(f"gemm {name}", got, want, base, dtype, grad=True, scale=scale)


@ONEDNN
def test_cpp_backend_runs_onednn_above_the_threshold_and_torch_below():
    def kernels(a, b):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            gemm(a, b)
        return {e.name for e in prof.events()}

    big_a, big_b = random_tensor(256, 128), random_tensor(128, 256)
    assert 256 * 128 * 256 >= gemm_module.ONEDNN_MIN_MACS
    assert backend.chosen("gemm", CPU) == "cpp"
    assert "mkldnn::_linear_pointwise" in kernels(big_a, big_b)
    assert "mkldnn::_linear_pointwise" in kernels(big_b.t(), big_a.t())  # the transposed-operand rule
    assert "mkldnn::_linear_pointwise" not in kernels(random_tensor(8, 128), big_b)  # 8 rows: torch.mm
    assert "mkldnn::_linear_pointwise" not in kernels(big_a.bfloat16(), big_b.bfloat16())  # not float32
    with fastlm.use_backend("torch"):
        assert "mkldnn::_linear_pointwise" not in kernels(big_a, big_b)


@ONEDNN
def test_products_below_the_threshold_skip_the_custom_op(monkeypatch):
    """Below ONEDNN_MIN_MACS linear, mm and addmm_ are torch's own calls: the custom op's dispatch alone
    cost more than oneDNN gained there (the module docstring's Zen 4 figures)."""
    def ops(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events()}

    x, w = random_tensor(300, 128).requires_grad_(), random_tensor(256, 128).requires_grad_()
    macs = 300 * 128 * 256
    for threshold, custom in ((macs + 1, False), (macs, True)):
        monkeypatch.setattr(gemm_module, "ONEDNN_MIN_MACS", threshold)
        names = ops(lambda: linear(x, w).sum().backward())
        names |= ops(lambda: mm(x.detach(), w.detach().t()))
        names |= ops(lambda: addmm_(random_tensor(128, 256), x.detach().t(), random_tensor(300, 256)))
        assert bool(GEMM_OP_EVENTS & names) == custom, (threshold, names)
        assert ("mkldnn::_linear_pointwise" in names) == custom, (threshold, names)


@ONEDNN
def test_wide_products_run_onednn_from_the_full_width_threshold(monkeypatch):
    """On a half-width processor a wide product (an LM head's chunk of logits) still runs oneDNN from
    FULL_WIDTH_MIN_MACS on; a narrow one of the same size does not."""
    monkeypatch.setattr(gemm_module, "ONEDNN_MIN_MACS", gemm_module.HALF_WIDTH_MIN_MACS)
    wide = gemm_module.WIDE_OUTPUT
    hidden = random_tensor(64, 128)
    assert gemm_module.FULL_WIDTH_MIN_MACS <= 64 * 128 * wide < gemm_module.HALF_WIDTH_MIN_MACS
    for out_features, onednn in ((wide, True), (wide - 1, False)):
        weight = random_tensor(out_features, 128)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            logits = linear(hidden, weight)
        assert ("mkldnn::_linear_pointwise" in {e.name for e in prof.events()}) == onednn, out_features
        assert_matches_reference("gemm", logits, gemm_ref(hidden.double(), weight.t().double()),
                                 gemm_ref(hidden, weight.t()), torch.float32, scale=_dot_scale(128, hidden, weight))


@pytest.mark.parametrize(
    "vendor,family,capability,expected",
    [("AuthenticAMD", 26, "AVX512", "full"), ("AuthenticAMD", 25, "AVX512", "half"), ("AuthenticAMD", None, "AVX512",
     "half"), ("AuthenticAMD", 25, "AVX2", None), ("GenuineIntel", 6, "AVX512", None)],
    ids=["zen5", "zen4", "amd-unknown-family", "zen3-avx2", "intel"],
)
def test_the_threshold_follows_the_avx512_datapath(vendor, family, capability, expected):
    """Full-width AVX-512 (AMD family 26, Zen 5, on) takes products from 2M multiply-adds; Zen 4, which splits
    512-bit instructions in halves, and an unknown family from 67M; no AMD AVX-512, no oneDNN."""
    cpuinfo = f"processor\t: 0\nvendor_id\t: {vendor}\n" + (f"cpu family\t: {family}\nmodel\t\t: 17\n" if family else "")
    found = gemm_module._amd_avx512_family(cpuinfo * 2, capability)
    assert (found is not None) == (expected is not None)
    if expected is not None:
        want = {"full": gemm_module.FULL_WIDTH_MIN_MACS, "half": gemm_module.HALF_WIDTH_MIN_MACS}[expected]
        assert gemm_module._onednn_min_macs(found) == want


def test_where_onednn_is_not_faster_every_matmul_is_torchs(monkeypatch):
    monkeypatch.setattr(gemm_module, "ONEDNN_FASTER", False)
    x, w, bias = random_tensor(300, 128).requires_grad_(), random_tensor(256, 128), random_tensor(256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = linear(x, w, bias)
        y.sum().backward()
        product = gemm(x.detach(), w.t())
    names = {e.name for e in prof.events()}
    assert not ({"mkldnn::_linear_pointwise"} | GEMM_OP_EVENTS) & names, names
    assert torch.equal(y, F.linear(x, w, bias)) and torch.equal(product, x.detach() @ w.t())


@ONEDNN
def test_onednn_reads_transposed_operands_without_torch_copies():
    """A weight gradient's transposed operands reach oneDNN with no torch copy: the left one through
    fastlm's C++ transpose, the right one as oneDNN reads it (column-major)."""
    x, dy = random_tensor(2048, 128), random_tensor(2048, 384)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        grad_w = gemm(dy.t(), x)
    names = [e.name for e in prof.events()]
    assert "mkldnn::_linear_pointwise" in names
    assert not {"aten::copy_", "aten::clone", "aten::contiguous"} & set(names), names
    assert_matches_reference("gemm", grad_w, gemm_ref(dy.t().double(), x.double()), gemm_ref(dy.t(), x),
                             torch.float32, scale=_dot_scale(2048, dy, x))


@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 7), (7, 1), (8, 8), (13, 40), (123, 1151), (1151, 123), (257, 130)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("row_stride", ["contiguous", "padded"])
def test_cpp_transpose(rows, cols, row_stride):
    """The C++ transpose behind gemm's oneDNN operands, on whole 8 x 8 blocks, edges and rows longer than
    the tile, from contiguous rows or rows with a larger stride (a slice of a wider matrix)."""
    src = random_tensor(rows, cols + (5 if row_stride == "padded" else 0))[:, :cols]
    dst = torch.full((cols, rows), float("nan"))
    cpu_extension().transpose(src, dst)
    assert torch.equal(dst, src.t())
    with pytest.raises(RuntimeError, match="dst must be a contiguous float32"):
        cpu_extension().transpose(src, torch.empty(rows, cols + 1))
    with pytest.raises(RuntimeError, match="src must be a 2-D float32"):
        cpu_extension().transpose(src.double(), dst)


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
def test_linear_matches_f_linear_on_3d_input(backend, dtype):
    g = torch.Generator().manual_seed(3)
    x, w, bias = random_tensor(3, 123, 96, generator=g), random_tensor(200, 96, generator=g), random_tensor(200)
    grad_out = random_tensor(3, 123, 200, generator=g)
    with fastlm.use_backend(backend):
        out, grads = _forward_backward(linear, [x, w, bias], grad_out)
    ref, ref_grads = _forward_backward(F.linear, [x.double(), w.double(), bias.double()], grad_out.double())
    plain, plain_grads = _forward_backward(F.linear, [x, w, bias], grad_out)
    assert_matches_reference("linear", out, ref, plain, dtype, scale=_dot_scale(96, x, w))
    scales = (_dot_scale(200, grad_out, w), _dot_scale(3 * 123, grad_out, x), _dot_scale(3 * 123, grad_out))
    for name, got, want, base, scale in zip(("grad_x", "grad_weight", "grad_bias"), grads, ref_grads, plain_grads,
                                            scales):
        assert_matches_reference(f"linear {name}", got, want, base, dtype, grad=True, scale=scale)
    assert grads[1].is_contiguous(), "a weight gradient must keep the weight's layout (fused AdamW reads it flat)"


def test_linear_module_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    ours = fastlm.nn.Linear(48, 300)
    theirs = torch.nn.Linear(48, 300)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    x = random_tensor(5, 64, 48)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_mm_out_and_addmm_accumulate_through_the_chosen_kernel():
    a, b = random_tensor(300, 128), random_tensor(128, 257)
    buffer = torch.full((400, 257), float("nan"))
    mm(a, b, out=buffer[50:350])
    ref = a.double() @ b.double()
    torch.testing.assert_close(buffer[50:350].double(), ref, rtol=1e-5, atol=1e-4)
    assert buffer[:50].isnan().all() and buffer[350:].isnan().all(), "rows outside out were written"
    c, d = random_tensor(257, 96), random_tensor(128, 96)
    expected = c.double() + b.double().t() @ d.double()
    addmm_(c, b.t(), d)
    torch.testing.assert_close(c.double(), expected, rtol=1e-5, atol=1e-4)


def test_autocast_keeps_f_linear_semantics():
    x, w = random_tensor(64, 96), random_tensor(80, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x, w)
        assert out.dtype == F.linear(x, w).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: gemm(random_tensor(3, 4), random_tensor(5, 2)), ValueError, r"a's columns \(4\) must equal b's rows"),
        (lambda: gemm(random_tensor(3, 4, 1), random_tensor(4, 2)), ValueError, "a must be 2-D"),
        (lambda: gemm(random_tensor(3, 4), random_tensor(4, 2, dtype=torch.float64)), TypeError, "share one"),
        (lambda: gemm(random_tensor(3, 4), [[1.0]]), TypeError, "b must be a torch.Tensor"),
        (lambda: gemm(random_tensor(3, 4), random_tensor(4, 2), random_tensor(3)), ValueError, r"bias .* \(2,\)"),
        (lambda: gemm(torch.ones(3, 4, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64)), TypeError,
         "floating dtype"),
        (lambda: linear(random_tensor(3, 5), random_tensor(2, 4)), ValueError, "must agree on in"),
        (lambda: linear(random_tensor(3, 4), random_tensor(2, 4, dtype=torch.float64)), TypeError,
         "x and weight.T must share one floating dtype"),
    ],
    ids=["inner-dims", "not-2d", "dtypes", "not-a-tensor", "bias-shape", "integer", "linear-in-features",
         "linear-dtypes"],
)
def test_bad_input_raises_before_launch(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend,dtype", [p for p in cpu_backend_params() if p.values[1] == torch.float32])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(backend, dtype, with_bias):
    a = random_tensor(64, 96).requires_grad_()
    b = random_tensor(257, 96).t().requires_grad_()
    bias = random_tensor(257).requires_grad_() if with_bias else None
    with fastlm.use_backend(backend):
        torch.library.opcheck(torch.ops.fastlm.gemm.default, (a, b, bias))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layer = fastlm.nn.Linear(96, 300)
    x = random_tensor(2, 64, 96)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.weight.grad is not None
