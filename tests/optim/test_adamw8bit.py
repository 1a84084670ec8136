"""Block-wise 8-bit AdamW / Adam / Lion: kernels vs the PyTorch rule, and the optimizers vs fp32 ones."""

import copy
import io
import platform
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend
from fastlm.optim import Adam8bit, AdamW8bit, Lion8bit
from fastlm.optim import _rule as rule
from fastlm.optim import _code as code_tables
from fastlm.optim._code import dynamic_code, tables
from fastlm.optim.optim8bit import PATH_ENV, cpu_kernel_info, cpu_kernel_path, cpu_kernel_paths
from fastlm.testing import random_tensor

CPU = torch.device("cpu")
KINDS = {"adamw": rule.ADAMW, "adam": rule.ADAM, "lion": rule.LION}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU kernel's code paths, fastest first (csrc/cpu/optim8bit.h).
CPU_PATHS = ("avx512", "avx2", "generic")


@pytest.fixture(params=CPU_PATHS)
def cpu_path(request, monkeypatch):
    """Each of the CPU kernel's paths this machine runs, forced through the environment."""
    if request.param not in cpu_kernel_paths():
        pytest.skip(f"this CPU does not run the {request.param} path")
    monkeypatch.setenv(PATH_ENV, request.param)
    return request.param


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# ---- the code and quantization -----------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_code_is_the_dynamic_tree_code(signed):
    code = torch.from_numpy(dynamic_code(signed))
    assert code.numel() == 256 and torch.all(code[1:] > code[:-1])
    assert code.max().item() == 1.0 and (code == 0).sum().item() == 1
    assert code.min().item() < -0.99 if signed else code.min().item() == 0.0
    # Dense near 1, and reaching down to 1e-7 (the point of the non-linear code).
    positive = code[code > 0]
    assert positive.min().item() < 1e-6
    assert ((positive > 0.1) & (positive < 1)).sum().item() == (64 if signed else 128)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The fp32 midpoints between neighbouring code values."""
    return ((code[:-1].double() + code[1:].double()) / 2).float()


def near_a_midpoint(x: torch.Tensor, mid: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """x within a few fp32 ulps of a midpoint: there the closed form's rounding may pick either neighbour."""
    gap = (x.double()[:, None] - mid.double()[None, :]).abs().min(dim=1).values
    return gap <= ulps * torch.finfo(torch.float32).eps * x.abs().double()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_picks_the_nearest_code_value(signed):
    table = tables(signed, CPU)
    code = table[:256]
    mid = midpoints(code)
    lo = -1.0 if signed else 0.0
    gen = torch.Generator().manual_seed(11)
    sweep = torch.logspace(-9, 0, 3001)
    x = torch.cat([
        torch.empty(20000).uniform_(lo, 1.0, generator=gen),
        torch.cat([sweep, -sweep]) if signed else sweep,  # every decade, both signs
        code,  # every code value maps to itself
        mid, torch.nextafter(mid, torch.full_like(mid, 2.0)), torch.nextafter(mid, torch.full_like(mid, -2.0)),
    ])
    q = rule.quantize(x, table, signed).long()
    # Every code value maps to itself, except the unsigned code's 0: second moments are never
    # stored as 0 (fastlm/optim/_code.py), so its quantizer picks among the positive values only.
    itself = torch.arange(256) if signed else torch.arange(256).clamp_min(1)
    assert torch.equal(q[-3 * 255 - 256:-3 * 255], itself)
    dist = (x.double()[:, None] - code.double()[None, :]).abs()
    if not signed:
        dist[:, 0] = float("inf")
    chosen = dist.gather(1, q[:, None]).squeeze(1)
    # The chosen value is a nearest one: the closed form's fp32 rounding decides only within a few
    # ulps of a midpoint (the nextafter probes), where both neighbours are as near as makes no odds.
    slack = 4 * torch.finfo(torch.float32).eps * x.abs().double()
    assert torch.all(chosen <= dist.min(dim=1).values + slack)
    away = ~near_a_midpoint(x, mid)
    assert away[:20000].sum() > 19000  # the exact check below covers nearly all random points
    assert torch.equal(q[away], dist[away].argmin(dim=1))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_out_of_range_zero_and_non_finite(signed):
    """Normalized moments lie in [-1, 1] (unsigned: [0, 1]), but x * (1 / absmax) may round past 1
    and a diverged run may carry inf/NaN: every input gets a defined index."""
    table = tables(signed, CPU)
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, 1e-30, 1.0, 1.0000001, 3.0, 1e30, inf, nan])
    # The unsigned code stores no 0: its smallest positive value (index 1) stands for it.
    top, zero = 255, (127 if signed else 1)
    assert rule.quantize(x, table, signed).tolist() == [zero, zero, zero, top, top, top, top, top, top]
    if signed:
        # No -1 in the signed code: the largest negative magnitudes take its most negative value.
        assert rule.quantize(-x[2:8], table, signed).tolist() == [zero, 0, 0, 0, 0, 0]
        # The negative half mirrors the positive one (below the midpoint between the top mean and 1).
        mags = torch.empty(5000).uniform_(0, 0.99, generator=torch.Generator().manual_seed(3))
        negative, positive = rule.quantize(-mags, table, True).long(), rule.quantize(mags, table, True).long()
        assert torch.equal(table[negative], -table[positive])
    else:
        # Second moments are never negative: the sign bit is not masked, a negative input clamps to
        # the bottom segment, as 0 does.
        assert rule.quantize(torch.tensor([-0.5, -inf]), table, signed).tolist() == [1, 1]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantize_table_layout(signed):
    """The header's constants (csrc/common/optim8bit_rule.h kTable*) index this table: the code first,
    then per octave the boundary inside it and the segment below, then per segment the closed form."""
    table = tables(signed, CPU)
    assert table.dtype == torch.float32 and table.numel() == code_tables.TABLE_SIZE == 368
    assert torch.equal(table[:256], torch.from_numpy(dynamic_code(signed)))
    segments = table[code_tables.TABLE_SEGMENT:code_tables.TABLE_SCALE]
    assert torch.all(segments == segments.round()) and segments.min() >= 0 and segments.max() <= 8
    top = table[code_tables.TABLE_TOP:code_tables.TABLE_SIZE][:9]
    assert top[-1] == 255 and torch.all(top[1:] > top[:-1])
    # The closed form compares |x| with its own octave's boundary only: a boundary lies in its
    # octave's binade.
    boundaries = table[code_tables.TABLE_THRESHOLD:code_tables.TABLE_SEGMENT]
    finite = torch.isfinite(boundaries)
    exponents = (boundaries[finite].view(torch.int32) >> 23) & 0xFF
    octaves = torch.arange(32)[finite]
    assert finite.sum() >= 8 and torch.all((exponents >= 103) & (exponents <= 127) & (exponents % 32 == octaves))
    # What the CPU kernel's AVX2 quantizer relies on (its table_of checks them too): a boundary only
    # below segment 8, one per bottom segment, which lies above every octave of that bottom segment
    # without a boundary; segments 0 ("zero") and 8 ("one") have scale 0, and their indices are their
    # tops, which segment 8's offset and segment 1's y at 1 reach.
    assert torch.all(segments[finite] <= 7)
    upper = dict(zip(segments[finite].int().tolist(), boundaries[finite].tolist(), strict=True))
    assert len(upper) == int(finite.sum())
    for slot in range(7, 32):  # the biased exponents 103-127 that |x| is clamped to
        if not finite[slot] and segments[slot] < 8:
            assert upper[int(segments[slot])] >= 2.0 ** (slot + 96 - 126)
    scale = table[code_tables.TABLE_SCALE:code_tables.TABLE_OFFSET]
    offset = table[code_tables.TABLE_OFFSET:code_tables.TABLE_TOP]
    assert scale[0] == scale[8] == 0 and offset[0] == top[0] and offset[8] == top[8]
    assert scale[1] + offset[1] >= top[8]


# ---- kernels vs the PyTorch rule, bit for bit ---------------------------------------------------
def random_state(kind, n, block_size, gen):
    blocks = -(-n // block_size)
    s1 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    a1 = torch.rand(blocks, generator=gen)
    a1[0] = 0.0  # an all-zero block must survive requantization
    if kind == rule.LION:
        return [s1, a1, None, None]
    return [s1, a1, torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen), torch.rand(blocks, generator=gen)]


def run_steps(impl_name, kind, dtype, n, block_size, stochastic, steps=3):
    gen = torch.Generator().manual_seed(n + block_size + kind)
    param = random_tensor(n, dtype=dtype, generator=gen)
    states = random_state(kind, n, block_size, gen)
    grads = [random_tensor(n, dtype=dtype, generator=gen, scale=0.1) for _ in range(steps)]
    tables1 = tables(True, CPU)
    tables2 = tables(False, CPU) if kind != rule.LION else None
    with fastlm.use_backend(impl_name):
        impl = backend.select("optim8bit_step", CPU)
        for step, grad in enumerate(grads, start=1):
            hyper = rule.make_hyper(kind, 3e-2, 0.9, 0.99, 1e-6, 0.1, step)
            impl(kind, param, grad, *states, tables1, tables2, block_size, hyper, 7, step, stochastic)
    return [param] + [s for s in states if s is not None]


CASES = [
    pytest.param(kind, dtype, stochastic, id=f"{kname}-{dname}" + ("-sr" if stochastic else ""))
    for kname, kind in KINDS.items()
    for dname, dtype in DTYPES.items()
    for stochastic in ([False, True] if dtype == torch.bfloat16 else [False])
]


@pytest.mark.parametrize("n,block_size", [(1, 32), (1001, 64), (4099, 256), (3000, 4096)],
                         ids=["n1-b32", "n1001-b64", "n4099-b256", "n3000-b4096"])
@pytest.mark.parametrize("kind,dtype,stochastic", CASES)
def test_cpp_matches_torch_rule_bit_for_bit(kind, dtype, stochastic, n, block_size, cpu_path):
    expected = run_steps("torch", kind, dtype, n, block_size, stochastic)
    got = run_steps("cpp", kind, dtype, n, block_size, stochastic)
    for name, out, ref in zip(["param", "state1", "absmax1", "state2", "absmax2"], got, expected):
        assert out.dtype == ref.dtype
        mismatches = (out.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
        assert mismatches == 0, f"{name}: {mismatches} bytes differ"


def octave_sweep_grads(block_size: int) -> torch.Tensor:
    """Gradients whose new moments, normalized per block, fall in every binary octave of the
    quantizer's 32-entry table, within a few ulps of each segment boundary, and at zero, in both
    signs; each block starts with +-1 so its absmax is known."""
    gen = torch.Generator().manual_seed(11)
    per_octave = slice(code_tables.TABLE_THRESHOLD, code_tables.TABLE_SEGMENT)
    boundaries = torch.cat([tables(signed, CPU)[per_octave] for signed in (True, False)])
    boundaries = boundaries[torch.isfinite(boundaries)].double()
    mantissas = 1 + torch.rand(32, generator=gen, dtype=torch.float64)
    octaves = torch.exp2(-torch.arange(0, 32, dtype=torch.float64)) * mantissas
    near = torch.cat([boundaries * (1 + k * 2.0**-23) for k in (-2, -1, 0, 1, 2)])
    # m is (1 - beta1) g and v (1 - beta2) g^2: sqrt of the targets sweeps v's octaves too.
    values = torch.cat([octaves, near, octaves.sqrt(), near.sqrt(), torch.zeros(3, dtype=torch.float64)])
    values = values * torch.where(torch.rand(values.numel(), generator=gen) < 0.5, -1.0, 1.0).double()
    rows = -(-values.numel() // (block_size - 1))
    rest = torch.zeros(rows * (block_size - 1), dtype=torch.float64)
    rest[:values.numel()] = values
    first = torch.where(torch.arange(rows) % 2 == 0, 1.0, -1.0).double()
    return torch.cat([first[:, None], rest.view(rows, block_size - 1)], dim=1).flatten().float()


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_cpp_quantizes_every_octave_as_the_rule_does(kind, cpu_path):
    """The vector quantizers read the octave and segment tables by lane (permutes and blends on the
    index bits in the AVX2 path): random moments only reach the top octaves, so sweep them all."""
    block_size = 64
    grad = octave_sweep_grads(block_size)
    n = grad.numel()
    got = []
    for name in ("torch", "cpp"):
        param = torch.linspace(-1, 1, n)
        # All-zero blocks: the new moments are (1 - beta1) g and (1 - beta2) g^2 exactly.
        states = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n // block_size)]
        if kind != rule.LION:
            states += [torch.zeros(n, dtype=torch.uint8), torch.zeros(n // block_size)]
        with fastlm.use_backend(name):
            impl = backend.select("optim8bit_step", CPU)
            hyper = rule.make_hyper(kind, 1e-3, 0.9, 0.99, 1e-8, 0.0, 1)
            impl(kind, param, grad.clone(), *(states + [None, None])[:4], tables(True, CPU),
                 tables(False, CPU) if kind != rule.LION else None, block_size, hyper, 7, 1, False)
        got.append([param] + states)
    for name, out, ref in zip(["param", "state1", "absmax1", "state2", "absmax2"], got[1], got[0]):
        mismatches = (out.view(torch.uint8) != ref.view(torch.uint8)).sum().item()
        assert mismatches == 0, f"{name}: {mismatches} bytes differ"
    # The sweep reaches far: codes on both sides of zero and both ends of the range.
    assert {0, 127, 255} <= set(got[0][1].tolist())


def test_optimizer_gives_the_same_bits_on_every_cpu_backend():
    results = []
    for name in ("torch", "cpp"):
        torch.manual_seed(3)
        model = tiny_mlp()
        opt = AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=64)
        with fastlm.use_backend(name):
            train(model, opt, regression_data(), steps=4)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


# ---- vs fp32 optimizers -------------------------------------------------------------------------
def regression_data(n=256, d_in=24, d_out=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)
    return x, torch.tanh(x @ w) + 0.05 * torch.randn(n, d_out, generator=gen)


def tiny_mlp(d_in=24, hidden=96, d_out=5):
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, d_out))


def train(model, opt, data, steps, batch=64):
    x, y = data
    losses = []
    for step in range(steps):
        i = (step * batch) % x.shape[0]
        opt.zero_grad()
        loss = F.mse_loss(model(x[i:i + batch]), y[i:i + batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def full_loss(model, data):
    with torch.no_grad():
        return F.mse_loss(model(data[0]), data[1]).item()


def test_update_direction_matches_fp32_adamw():
    data = regression_data()
    torch.manual_seed(1)
    model8 = tiny_mlp()
    model32 = copy.deepcopy(model8)
    start = [p.detach().clone() for p in model8.parameters()]
    opt8 = AdamW8bit(model8.parameters(), lr=1e-3, min_8bit_size=64)
    opt32 = torch.optim.AdamW(model32.parameters(), lr=1e-3)
    for k in range(1, 11):
        train(model8, opt8, data, steps=1)
        train(model32, opt32, data, steps=1)
        d8 = torch.cat([(p.detach() - s).flatten() for p, s in zip(model8.parameters(), start)])
        d32 = torch.cat([(p.detach() - s).flatten() for p, s in zip(model32.parameters(), start)])
        assert cosine(d8, d32) > 0.98, f"step {k}: update cosine {cosine(d8, d32):.4f}"


def test_dequantized_states_close_to_fp32_states():
    """Same gradients into both: the 8-bit moments track the fp32 ones within the code's resolution."""
    gen = torch.Generator().manual_seed(5)
    n = 8192 + 77
    p8 = torch.nn.Parameter(torch.randn(n, generator=gen))
    p32 = torch.nn.Parameter(p8.detach().clone())
    opt8 = AdamW8bit([p8], lr=1e-3)
    opt32 = torch.optim.AdamW([p32], lr=1e-3)
    for _ in range(20):
        g = torch.randn(n, generator=gen) * torch.rand(n, generator=gen)  # magnitudes spread over decades
        p8.grad, p32.grad = g.clone(), g.clone()
        opt8.step()
        opt32.step()
    s8, s32 = opt8.state[p8], opt32.state[p32]
    m = rule.dequantize(s8["state1"], tables(True, CPU), s8["absmax1"], 256)
    v = rule.dequantize(s8["state2"], tables(False, CPU), s8["absmax2"], 256)
    m_ref, v_ref = s32["exp_avg"], s32["exp_avg_sq"]
    # Each requantization errs by at most half a code gap: 0.9/64/2 ~ 0.007 of the block absmax
    # (signed code, top decade), 0.0035 (unsigned). The errors carry over steps: the first
    # moment's decay by beta1 = 0.9 (<= 0.007 / (1 - 0.9) = 0.07 of absmax), the second's
    # barely (<= 20 steps * 0.0035 = 0.07). Those bounds hold elementwise (0.08 with the absmax
    # drifting between steps); the typical error is a random walk, a few % of the norm
    # (measured: 2.6% and 1.5%).
    assert (m - m_ref).norm() / m_ref.norm() < 0.04
    assert (v - v_ref).norm() / v_ref.norm() < 0.04
    scale1 = s8["absmax1"].repeat_interleave(256)[:n]
    scale2 = s8["absmax2"].repeat_interleave(256)[:n]
    assert torch.all((m - m_ref).abs() <= 0.08 * scale1)
    assert torch.all((v - v_ref).abs() <= 0.08 * scale2)
    # The parameters themselves stay within 1e-4 (relative) of fp32 AdamW's.
    assert (p8 - p32).norm() / p32.norm() < 3e-4


@pytest.mark.parametrize("cls,torch_cls", [(AdamW8bit, torch.optim.AdamW), (Adam8bit, torch.optim.Adam)],
                         ids=["adamw", "adam"])
def test_a_small_second_moment_beside_a_large_one_keeps_the_step_near_lr(cls, torch_cls, cpu_path):
    """One large gradient in a block, then zero gradients: the other elements' second moments lie
    far below the block's absmax (below half the code's smallest positive value), their first
    moments do not (a separate scale). Stored as 0, such a v made the step m / eps (1806 with
    lr 1e-3); the unsigned code never stores 0, so every step stays about lr, as fp32 Adam's."""
    lr = 1e-3
    g = torch.randn(4096, generator=torch.Generator().manual_seed(2))
    g[0] = 100.0
    steps = {}
    for name, make in (("8bit", cls), ("fp32", torch_cls)):
        p = torch.nn.Parameter(torch.randn(4096, generator=torch.Generator().manual_seed(3)))
        opt = make([p], lr=lr, weight_decay=0.0)
        worst = 0.0
        for grad in (g, torch.zeros_like(g), torch.zeros_like(g)):
            p.grad = grad.clone()
            before = p.detach().clone()
            opt.step()
            worst = max(worst, (p.detach() - before).abs().max().item())
        steps[name] = worst
    # fp32 Adam's steps here are at most ~0.7 lr; 2 lr leaves room for the 8-bit states' error and
    # still catches a step of m / eps.
    assert steps["fp32"] < 2 * lr
    assert steps["8bit"] < 2 * lr, steps


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_loss_curve_and_convergence_match_fp32(optimizer):
    data = regression_data(n=512)
    torch.manual_seed(2)
    model8 = tiny_mlp()
    model32 = copy.deepcopy(model8)
    cls8, cls32 = (AdamW8bit, torch.optim.AdamW) if optimizer == "adamw" else (Adam8bit, torch.optim.Adam)
    opt8 = cls8(model8.parameters(), lr=3e-3, weight_decay=1e-2, min_8bit_size=64)
    opt32 = cls32(model32.parameters(), lr=3e-3, weight_decay=1e-2)
    losses8 = train(model8, opt8, data, steps=150)
    losses32 = train(model32, opt32, data, steps=150)
    # Loss curve: every 25-step window's mean within 5% of fp32's (quantization noise is small
    # against the minibatch noise both share).
    for start in range(0, 150, 25):
        w8, w32 = sum(losses8[start:start + 25]), sum(losses32[start:start + 25])
        assert abs(w8 - w32) <= 0.05 * w32, f"steps {start}..{start + 24}: {w8 / 25:.4f} vs {w32 / 25:.4f}"
    final8, final32 = full_loss(model8, data), full_loss(model32, data)
    assert final8 < 0.5 * losses32[0]  # it did converge
    assert abs(final8 - final32) <= 0.02 * final32, f"final loss {final8:.5f} vs fp32 {final32:.5f}"


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=32, dim=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens):  # predicts token t from tokens t-2, t-1
        e = self.embed(tokens)
        return self.head(self.mlp(torch.cat([e[:, :-2], e[:, 1:-1]], dim=-1)))


def lm_batches(vocab=32, steps=120, batch=16, length=34, seed=0):
    """Token streams from a fixed random Markov chain with peaked transitions: learnable, not trivial."""
    gen = torch.Generator().manual_seed(seed)
    probs = F.softmax(torch.randn(vocab, vocab, generator=gen) * 3.0, dim=-1)
    cols = [torch.randint(0, vocab, (steps * batch,), generator=gen)]
    for _ in range(length - 1):
        cols.append(torch.multinomial(probs[cols[-1]], 1, generator=gen).squeeze(1))
    return list(torch.stack(cols, 1).split(batch))


def lm_train(model, opt, batches):
    losses = []
    for tokens in batches:
        opt.zero_grad()
        logits = model(tokens)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 2:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_lm_converges_like_fp32_adamw():
    batches = lm_batches()
    torch.manual_seed(4)
    model8 = TinyLM()
    model32 = copy.deepcopy(model8)
    losses8 = lm_train(model8, AdamW8bit(model8.parameters(), lr=1e-2, min_8bit_size=256), batches)
    losses32 = lm_train(model32, torch.optim.AdamW(model32.parameters(), lr=1e-2), batches)
    tail8, tail32 = sum(losses8[-20:]) / 20, sum(losses32[-20:]) / 20
    assert tail32 < 0.7 * losses32[0]  # the task is learnable in this budget
    for start in range(0, len(batches), 20):
        w8, w32 = sum(losses8[start:start + 20]), sum(losses32[start:start + 20])
        assert abs(w8 - w32) <= 0.03 * w32, f"steps {start}..: {w8 / 20:.4f} vs {w32 / 20:.4f}"
    assert abs(tail8 - tail32) <= 0.02 * tail32, f"final loss {tail8:.4f} vs fp32 {tail32:.4f}"


def test_fp32_state_path_matches_torch_adamw_and_adam():
    """Below min_8bit_size the states are fp32: the rule is then AdamW / Adam up to rounding."""
    gen = torch.Generator().manual_seed(6)
    for cls8, cls32 in ((AdamW8bit, torch.optim.AdamW), (Adam8bit, torch.optim.Adam)):
        p8 = torch.nn.Parameter(torch.randn(300, generator=gen))
        p32 = torch.nn.Parameter(p8.detach().clone())
        opt8, opt32 = cls8([p8], lr=1e-2, weight_decay=0.1), cls32([p32], lr=1e-2, weight_decay=0.1)
        for _ in range(10):
            g = torch.randn(300, generator=gen)
            p8.grad, p32.grad = g.clone(), g.clone()
            opt8.step()
            opt32.step()
        assert "exp_avg" in opt8.state[p8]
        # Different but equivalent operation order: a few fp32 ulps of the parameters' scale.
        torch.testing.assert_close(p8, p32, rtol=0, atol=8 * torch.finfo(torch.float32).eps)


def lion_reference(params, grads, lr, betas, weight_decay):
    """Lion (Chen et al. 2023, Algorithm 2) in float64."""
    p = params.double().clone()
    m = torch.zeros_like(p)
    for g in grads:
        g = g.double()
        c = betas[0] * m + (1 - betas[0]) * g
        p = p * (1 - lr * weight_decay) - lr * torch.sign(c)
        m = betas[1] * m + (1 - betas[1]) * g
    return p


@pytest.mark.parametrize("min_8bit_size", [10**9, 256], ids=["fp32-states", "8bit-states"])
def test_lion_matches_its_definition(min_8bit_size):
    gen = torch.Generator().manual_seed(8)
    n = 5000
    start = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) + 0.3 for _ in range(8)]
    param = torch.nn.Parameter(start.clone())
    opt = Lion8bit([param], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5, min_8bit_size=min_8bit_size)
    for g in grads:
        param.grad = g.clone()
        opt.step()
    ref = lion_reference(start, grads, 1e-3, (0.9, 0.99), 0.5)
    if min_8bit_size > n:
        torch.testing.assert_close(param.double(), ref, rtol=0, atol=16 * torch.finfo(torch.float32).eps)
    else:
        # Quantized momentum may flip the sign of c where it is near 0; the direction stays.
        assert cosine(param.detach() - start, ref - start) > 0.98


# ---- memory, state_dict, optimizer protocol -----------------------------------------------------
def test_state_memory_is_under_a_third_of_fp32():
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    p.grad = torch.randn(1 << 20)
    opt = AdamW8bit([p])
    opt.step()
    fp32_bytes = 2 * 4 * p.numel()
    assert opt.state_bytes() <= 0.3 * fp32_bytes
    assert opt.state[p]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("cls", [AdamW8bit, Adam8bit, Lion8bit], ids=["adamw", "adam", "lion"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_dict_resume_is_bit_exact(cls, dtype):
    data = regression_data()
    torch.manual_seed(9)
    model = tiny_mlp().to(dtype)
    kwargs = dict(lr=1e-3, min_8bit_size=100, bf16_stochastic_rounding=dtype == torch.bfloat16)

    def run(model, opt, steps, offset):
        x, y = data
        for step in range(offset, offset + steps):
            opt.zero_grad()
            F.mse_loss(model(x[step * 8:step * 8 + 64].to(dtype)).float(), y[step * 8:step * 8 + 64]).backward()
            opt.step()

    opt = cls(model.parameters(), **kwargs)
    run(model, opt, 3, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(model, opt, 3, 3)
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = tiny_mlp().to(dtype)
    resumed.load_state_dict(saved["model"])
    opt2 = cls(resumed.parameters(), **kwargs)
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[next(resumed.parameters())]["state1"].dtype == torch.uint8
    run(resumed, opt2, 3, 3)
    for a, b in zip(resumed.parameters(), expected):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("cls,torch_cls", [(AdamW8bit, torch.optim.AdamW), (Adam8bit, torch.optim.Adam)],
                         ids=["adamw", "adam"])
def test_torch_state_dict_loads_with_its_moments_quantized(cls, torch_cls):
    """A torch AdamW/Adam run switched to 8-bit states: the moments quantized once, fp32 below
    min_8bit_size, the step and the group's hyper-parameters kept, and training goes on as fp32's."""
    data = regression_data()
    torch.manual_seed(11)
    model = tiny_mlp()
    opt32 = torch_cls(model.parameters(), lr=2e-3, betas=(0.8, 0.99), weight_decay=0.05)
    train(model, opt32, data, steps=5)
    model8 = copy.deepcopy(model)
    opt8 = cls(model8.parameters(), min_8bit_size=256, block_size=64)
    opt8.load_state_dict(opt32.state_dict())
    group = opt8.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["block_size"]) == (2e-3, (0.8, 0.99), 0.05, 64)
    for p8, p32 in zip(model8.parameters(), model.parameters()):
        s8, s32 = opt8.state[p8], opt32.state[p32]
        assert s8["step"] == 5
        m_ref, v_ref = s32["exp_avg"].flatten(), s32["exp_avg_sq"].flatten()
        if p8.numel() < 256:
            assert torch.equal(s8["exp_avg"], m_ref) and torch.equal(s8["exp_avg_sq"], v_ref)
            continue
        m = rule.dequantize(s8["state1"], tables(True, CPU), s8["absmax1"], 64)
        v = rule.dequantize(s8["state2"], tables(False, CPU), s8["absmax2"], 64)
        # One quantization: at most half the code's largest gap, 0.0070 of the block absmax for the
        # signed code and 0.0035 for the unsigned (the top decade's), plus the closed form's
        # fp32 rounding at a midpoint.
        assert torch.all((m - m_ref).abs() <= 0.0071 * s8["absmax1"].repeat_interleave(64)[:m.numel()])
        assert torch.all((v - v_ref).abs() <= 0.0036 * s8["absmax2"].repeat_interleave(64)[:v.numel()])
    start = [p.detach().clone() for p in model8.parameters()]
    train(model8, opt8, data, steps=5)
    train(model, opt32, data, steps=5)
    d8 = torch.cat([(p.detach() - s).flatten() for p, s in zip(model8.parameters(), start)])
    d32 = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)])
    assert cosine(d8, d32) > 0.98


def test_load_state_dict_rejects_what_does_not_fit():
    p = torch.nn.Parameter(torch.randn(5000))

    def stepped(opt):
        p.grad = torch.randn_like(p)
        opt.step()
        return opt.state_dict()

    cases = [
        (AdamW8bit([p]), stepped(torch.optim.Adam([p])), "is torch.optim.Adam's; AdamW8bit loads torch.optim.AdamW's"),
        (Adam8bit([p]), stepped(torch.optim.AdamW([p])), "is torch.optim.AdamW's; Adam8bit loads torch.optim.Adam's"),
        (AdamW8bit([p]), stepped(torch.optim.AdamW([p], amsgrad=True)), "amsgrad=True, which AdamW8bit does not"),
        (Lion8bit([p]), stepped(torch.optim.AdamW([p])), "lacks block_size, min_8bit_size, bf16_stochastic_rounding"),
        (AdamW8bit([p]), stepped(Lion8bit([p])), "parameter 0's state holds ['absmax1', 'seed', 'state1', 'step']"),
        (AdamW8bit([torch.nn.Parameter(torch.randn(6000))]), stepped(AdamW8bit([p])),
         "parameter 0's state1 has 5000 elements, expected 6000"),
        (AdamW8bit([torch.nn.Parameter(torch.randn(6000))]), stepped(torch.optim.AdamW([p])),
         "parameter 0's exp_avg has 5000 elements, expected 6000"),
        (AdamW8bit([p, torch.nn.Parameter(torch.randn(10))]), stepped(AdamW8bit([p])),
         "param_groups[0] has 1 parameters, this optimizer's 2"),
        (AdamW8bit([{"params": [p]}, {"params": [torch.nn.Parameter(torch.randn(10))]}]), stepped(AdamW8bit([p])),
         "expected 2 param groups, got 1"),
    ]
    for opt, state_dict, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            opt.load_state_dict(state_dict)
        assert not opt.state  # nothing loaded


def test_param_groups_schedulers_closures_and_skipped_params():
    torch.manual_seed(10)
    a = torch.nn.Parameter(torch.randn(5000))
    b = torch.nn.Parameter(torch.randn(5000))
    frozen = torch.nn.Parameter(torch.randn(5000))
    opt = AdamW8bit([{"params": [a]}, {"params": [b, frozen], "lr": 0.0, "weight_decay": 0.0}], lr=torch.tensor(1e-2))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b_start, frozen_start = b.detach().clone(), frozen.detach().clone()
    deltas = []
    for _ in range(3):
        a_before = a.detach().clone()

        def closure():
            opt.zero_grad()
            loss = (a * torch.linspace(-1, 1, 5000)).sum() + b.sum()
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        sched.step()
        deltas.append((a.detach() - a_before).abs().median().item())
    # The same normalized gradient every step: the step halves with the learning rate (read each step).
    assert deltas[1] == pytest.approx(deltas[0] / 2, rel=0.05) and deltas[2] == pytest.approx(deltas[1] / 2, rel=0.05)
    assert torch.equal(b.detach(), b_start)  # lr 0 in its group
    assert torch.equal(frozen.detach(), frozen_start) and frozen not in opt.state  # no grad: skipped


def test_non_contiguous_param_is_updated_in_place():
    base = torch.randn(80, 70)
    p = torch.nn.Parameter(base.t())  # non-contiguous view layout
    ref = torch.nn.Parameter(base.t().contiguous())
    g = torch.randn(70, 80)
    p.grad, ref.grad = g.clone(), g.clone()
    AdamW8bit([p], min_8bit_size=16).step()
    AdamW8bit([ref], min_8bit_size=16).step()
    assert not p.is_contiguous() and torch.equal(p.detach(), ref.detach())


def test_bf16_stochastic_rounding_does_not_stall_and_is_unbiased():
    """Lion moves every weight by exactly lr; at 1e-4, far below bf16's spacing near 1 (2^-8),
    round-to-nearest never moves them, stochastic rounding moves them by lr on average."""
    n = 1 << 17
    means = {}
    for stochastic in (False, True):
        for impl in ("torch", "cpp"):
            p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
            p.grad = torch.ones(n, dtype=torch.bfloat16)
            opt = Lion8bit([p], lr=1e-4, bf16_stochastic_rounding=stochastic)
            with fastlm.use_backend(impl):
                opt.step()
            means[stochastic, impl] = p.double().mean().item()
    assert means[False, "torch"] == means[False, "cpp"] == 1.0
    target = float(torch.tensor(1.0 - 1e-4, dtype=torch.float32))
    # The result is 1 - 2^-8 with probability ~0.0256, else 1: sigma of the mean ~ 2^-8 * 0.158 / sqrt(n).
    sigma = 2**-8 * 0.16 / n**0.5
    for impl in ("torch", "cpp"):
        assert abs(means[True, impl] - target) < 5 * sigma, (impl, means[True, impl], target)


def test_stochastic_rounding_is_unbiased_over_many_trials():
    x = torch.randn(4096) * 3
    trials = torch.stack([rule.round_to_bf16_stochastic(x, seed=11, step=s).double() for s in range(400)])
    spacing = (x.abs().to(torch.bfloat16).double() * 2**-7).clamp_min(1e-30)
    bias = (trials.mean(0) - x.double()) / spacing
    # Per element the mean of 400 Bernoulli draws has sigma <= 0.5/20 spacing; over 4096 elements
    # the average bias must vanish (a biased rounding shifts it by O(0.1)).
    assert bias.abs().max().item() < 0.15
    assert abs(bias.mean().item()) < 0.01
    # Each draw is one of the two neighbours.
    low = x.to(torch.bfloat16).double()
    assert torch.all((trials - x.double()).abs() <= spacing * 2)
    assert not torch.equal(trials[0], low.expand_as(trials[0]))


# ---- argument checks --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1e-3}, "lr"),
    ({"betas": (1.0, 0.999)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
    ({"eps": 0.0}, "eps"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"block_size": 100}, "block_size"),
    ({"block_size": 16}, "block_size"),
    ({"min_8bit_size": -1}, "min_8bit_size"),
], ids=["lr", "beta1", "beta2", "eps", "weight_decay", "block_not_pow2", "block_too_small", "min_8bit_size"])
def test_bad_hyper_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("bad,match", [({"lr": -1.0}, "lr"), ({"block_size": 100}, "block_size")], ids=["lr", "block_size"])
def test_bad_param_group_raises_and_is_not_added(bad, match):
    p = torch.nn.Parameter(torch.randn(3))
    opt = AdamW8bit([p])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], **bad})
    assert len(opt.param_groups) == 1
    p.grad = torch.randn(3)
    opt.step()  # the optimizer still works


def test_sparse_grad_raises():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        AdamW8bit(emb.parameters()).step()


def test_unsupported_param_dtype_raises():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    p.grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        AdamW8bit([p]).step()


def test_cpp_kernel_checks_tables_and_block_size():
    """The C++ entry point checks what the optimizers never pass: a table of the wrong size (the
    former (values, lut) layout) or of another structure, and a block larger than its scratch."""
    from fastlm.extension import cpu_extension

    n = 300
    param, grad = torch.zeros(n), torch.zeros(n)
    hyper = rule.make_hyper(rule.ADAMW, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1).as_list()

    def call(block_size, table1):
        blocks = -(-n // block_size)
        states = [torch.zeros(n, dtype=torch.uint8), torch.zeros(blocks)] * 2
        cpu_extension().optim8bit_step(rule.ADAMW, param, grad, *states, table1, tables(False, CPU), block_size,
                                       hyper, 0, 1, False)

    with pytest.raises(RuntimeError, match=r"tables1: expected the contiguous fp32 CPU code table of 368"):
        call(256, tables(True, CPU)[:256].clone())
    with pytest.raises(RuntimeError, match=r"block_size: expected a power of two in \[16, 4096\], got 8192"):
        call(8192, tables(True, CPU))
    # Tables the vector quantizers would misread: an octave that lost its boundary (its bottom
    # segment then has no upper one), a segment with two upper boundaries, a constant segment
    # ("zero", "one") with a slope, a top that is no index, a negative offset, segment 0 whose top
    # differs from its index, segment 1 too flat to reach segment 8's index at 1.
    table = tables(True, CPU)
    with_boundary = torch.isfinite(table[code_tables.TABLE_THRESHOLD:code_tables.TABLE_SEGMENT]).nonzero()
    octave, other = int(with_boundary[0]), int(with_boundary[1])
    dropped = table.clone()
    dropped[code_tables.TABLE_THRESHOLD + octave] = float("inf")
    with pytest.raises(RuntimeError, match=r"tables1: octave \d+ has no boundary but its segment"):
        call(256, dropped)
    doubled = table.clone()
    doubled[code_tables.TABLE_SEGMENT + other] = doubled[code_tables.TABLE_SEGMENT + octave]
    with pytest.raises(RuntimeError, match=r"tables1: segment \d has two upper boundaries"):
        call(256, doubled)
    for segment, field, value, message in [
        (8, code_tables.TABLE_SCALE, 1.0, r"segment 8 must have scale 0, got 1"),
        (0, code_tables.TABLE_SCALE, 1.0, r"segment 0 must have scale 0, got 1"),
        (3, code_tables.TABLE_TOP, 3.5, r"segment 3's top 3.5 is not an index 0-255"),
        (2, code_tables.TABLE_OFFSET, -1.0, r"segment 2 has scale \S+ and offset -1, which the quantizers never"),
        (0, code_tables.TABLE_TOP, 200.0, r"segment 0's index must be the one of its top from segment 8's offset"),
        (1, code_tables.TABLE_SCALE, 1.0, r"segment 1's y at 1 \(\S+\) must reach segment 8's index 255"),
    ]:
        changed = tables(True, CPU).clone()
        changed[field + segment] = value
        with pytest.raises(RuntimeError, match="tables1: " + message):
            call(256, changed)
    call(256, tables(True, CPU))  # the same call with valid arguments runs


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def test_cpu_kernel_runs_every_path_the_processor_reports(monkeypatch):
    """The kernel finds the paths /proc/cpuinfo says this processor runs, defaults to the fastest,
    runs a forced one, and refuses an unknown one (from the environment and in C++)."""
    from fastlm.extension import cpu_extension

    paths = cpu_kernel_paths()
    assert paths[-1] == "generic" and list(paths) == [p for p in CPU_PATHS if p in paths]
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vbmi"} <= flags:
        assert "avx512" in paths
    if {"avx2", "f16c"} <= flags:
        assert "avx2" in paths
    monkeypatch.delenv(PATH_ENV, raising=False)
    assert cpu_kernel_path() == paths[0]
    assert fastlm.backend_info()["cpu_optim8bit"] == {"path": paths[0], "paths": list(paths), "error": None}
    monkeypatch.setenv(PATH_ENV, "generic")
    assert cpu_kernel_path() == "generic" and cpu_kernel_info()["path"] == "generic"

    monkeypatch.setenv(PATH_ENV, "avx1024")
    with pytest.raises(ValueError, match=rf"{PATH_ENV}: expected one of the paths this CPU runs .*'avx1024'"):
        cpu_kernel_path()
    assert cpu_kernel_info()["path"] is None and cpu_kernel_info()["paths"] == list(paths)
    assert PATH_ENV in cpu_kernel_info()["error"]
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    with pytest.raises(ValueError, match=PATH_ENV):
        AdamW8bit([p]).step()

    n = 256
    states = [torch.zeros(n, dtype=torch.uint8), torch.zeros(1)] * 2
    hyper = rule.make_hyper(rule.ADAMW, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1).as_list()
    with pytest.raises(RuntimeError, match=r"path: expected one of the paths this CPU runs \(.*generic\), got 'x'"):
        cpu_extension().optim8bit_step(rule.ADAMW, torch.zeros(n), torch.zeros(n), *states, tables(True, CPU),
                                       tables(False, CPU), 256, hyper, 0, 1, False, "x")


@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None, reason="needs g++ on x86-64")
def test_cpu_kernel_compiles_every_path_for_a_cpu_without_them(tmp_path):
    """A machine builds the paths its -march lacks under target pragmas, and one whose -march has them
    builds them without: compiling for x86-64-v2 (no AVX) here catches, on any machine, an instruction
    a path uses but does not ask for (an AVX-512 one in the AVX2 path, say), which would otherwise break
    the build on the first machine without it."""
    from torch.utils.cpp_extension import include_paths

    from fastlm.extension import CPU_CFLAGS, source_dir

    flags = [f for f in CPU_CFLAGS if not f.startswith(("-march", "-O"))]
    includes = [arg for path in [*include_paths(), sysconfig.get_paths()["include"]] for arg in ("-isystem", path)]
    cmd = ["g++", "-c", "-O0", "-Wall", "-Werror", "-march=x86-64-v2", *flags, "-fPIC", "-I", str(source_dir()),
           *includes, str(source_dir() / "cpu" / "optim8bit.cpp"), "-o", str(tmp_path / "optim8bit.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour of the cuda backend")
def test_cuda_backend_is_unavailable_without_a_gpu():
    info = fastlm.backend_info()
    assert info["ops"]["optim8bit_step"]["cpu"]["backend"] == "cpp"
    assert "CUDA device" in info["cuda_extension"]["error"]
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    with fastlm.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        AdamW8bit([p]).step()


def test_cpu_offload_keeps_states_on_cpu_and_matches_adamw8bit():
    """On CPU parameters the offloading optimizer is AdamW8bit; its state dict loads into either."""
    data = regression_data()
    results = []
    for cls in (AdamW8bit, fastlm.optim.CPUOffloadAdamW8bit):
        torch.manual_seed(12)
        model = tiny_mlp()
        opt = cls(model.parameters(), lr=1e-2, min_8bit_size=100)
        train(model, opt, data, steps=3)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt.state_dict()))
    assert torch.equal(results[0][0], results[1][0])
    model = tiny_mlp()
    opt = fastlm.optim.CPUOffloadAdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=100)
    opt.load_state_dict(results[0][1])
    assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
