"""The CUDA 8-bit optimizer kernel: bit for bit against the PyTorch rule and the CPU kernel."""

import pytest
import torch

import fastlm
from fastlm import backend
from fastlm.optim import AdamW8bit, Lion8bit
from fastlm.optim import _rule as rule
from fastlm.optim._code import tables
from fastlm.testing import random_tensor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

KINDS = {"adamw": rule.ADAMW, "adam": rule.ADAM, "lion": rule.LION}
CASES = [
    pytest.param(kind, dtype, sr, id=f"{kname}-{str(dtype).removeprefix('torch.')}" + ("-sr" if sr else ""))
    for kname, kind in KINDS.items()
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for sr in ([False, True] if dtype == torch.bfloat16 else [False])
]


def run_steps(impl_name, device, kind, dtype, n, block_size, stochastic, offset=0, steps=3):
    gen = torch.Generator().manual_seed(n + block_size + kind)
    blocks = -(-n // block_size)
    # `offset` elements in front (sliced off on the device) make the tensors start unaligned:
    # the kernel's scalar path.
    param = random_tensor(n + offset, dtype=dtype, generator=gen)
    s1 = torch.randint(0, 256, (n + offset,), dtype=torch.uint8, generator=gen)
    a1 = torch.rand(blocks, generator=gen)
    a1[0] = 0.0
    s2 = torch.randint(0, 256, (n + offset,), dtype=torch.uint8, generator=gen)
    a2 = torch.rand(blocks, generator=gen)
    grads = [random_tensor(n + offset, dtype=dtype, generator=gen, scale=0.1) for _ in range(steps)]
    param = param.to(device)[offset:]
    grads = [g.to(device)[offset:] for g in grads]
    s1, s2 = s1.to(device)[offset:], s2.to(device)[offset:]
    states = [s1, a1.to(device), s2, a2.to(device)] if kind != rule.LION else [s1, a1.to(device), None, None]
    tables1 = tables(True, device)
    tables2 = tables(False, device) if kind != rule.LION else None
    with fastlm.use_backend(impl_name):
        impl = backend.select("optim8bit_step", device)
        for step, grad in enumerate(grads, start=1):
            hyper = rule.make_hyper(kind, 3e-2, 0.9, 0.99, 1e-6, 0.1, step)
            impl(kind, param, grad, *states, tables1, tables2, block_size, hyper, 7, step, stochastic)
    return [t.cpu() for t in [param] + [s for s in states if s is not None]]


@pytest.mark.parametrize("n,block_size,offset", [(1, 32, 0), (1001, 64, 0), (40999, 256, 0), (3000, 4096, 0),
                                                 (5000, 256, 3)],
                         ids=["n1-b32", "n1001-b64", "n40999-b256", "n3000-b4096", "n5000-b256-unaligned"])
@pytest.mark.parametrize("kind,dtype,stochastic", CASES)
def test_cuda_matches_torch_rule_and_cpu_kernel(kind, dtype, stochastic, n, block_size, offset):
    cuda = torch.device("cuda")
    got = run_steps("cuda", cuda, kind, dtype, n, block_size, stochastic, offset)
    on_gpu_torch = run_steps("torch", cuda, kind, dtype, n, block_size, stochastic, offset)
    on_cpu = run_steps("cpp", torch.device("cpu"), kind, dtype, n, block_size, stochastic, offset)
    for name, out, a, b in zip(["param", "state1", "absmax1", "state2", "absmax2"], got, on_gpu_torch, on_cpu):
        assert torch.equal(out.view(torch.uint8), a.view(torch.uint8)), f"{name}: CUDA != torch rule on CUDA"
        assert torch.equal(out.view(torch.uint8), b.view(torch.uint8)), f"{name}: CUDA != CPU kernel"


def test_optimizer_runs_the_cuda_kernel_and_state_moves_between_devices():
    assert fastlm.backend_info()["ops"]["optim8bit_step"]["cuda"]["backend"] == "cuda"
    torch.manual_seed(0)
    start = torch.randn(70000)
    grads = [torch.randn(70000) for _ in range(6)]
    results = {}
    for device in ("cpu", "cuda"):
        p = torch.nn.Parameter(start.clone().to(device))
        opt = AdamW8bit([p])
        for g in grads[:3]:
            p.grad = g.to(device)
            opt.step()
        results[device] = (p.detach().cpu().clone(), opt.state_dict())
    # CPU states continue on the GPU: same bits as staying on the GPU.
    p = torch.nn.Parameter(results["cpu"][0].cuda())
    opt = AdamW8bit([p])
    opt.load_state_dict(results["cpu"][1])
    assert opt.state[p]["state1"].is_cuda
    q = torch.nn.Parameter(results["cuda"][0].cuda())
    opt_q = AdamW8bit([q])
    opt_q.load_state_dict(results["cuda"][1])
    for g in grads[3:]:
        p.grad, q.grad = g.cuda(), g.cuda()
        opt.step()
        opt_q.step()
    assert torch.equal(p.detach(), q.detach())


def test_bf16_stochastic_rounding_on_cuda_does_not_stall():
    n = 1 << 20
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    Lion8bit([p], lr=1e-4, bf16_stochastic_rounding=True).step()
    sigma = 2**-8 * 0.16 / n**0.5
    assert abs(p.double().mean().item() - (1 - 1e-4)) < 5 * sigma


def test_cpu_offload_matches_adamw8bit_on_the_gpu():
    from fastlm.optim import CPUOffloadAdamW8bit

    torch.manual_seed(1)
    start = [torch.randn(300, 70), torch.randn(257), torch.randn(70, 300).t()]  # small, odd, non-contiguous
    grads = [[torch.randn_like(s) for s in start] for _ in range(4)]
    finals = []
    for cls in (AdamW8bit, CPUOffloadAdamW8bit):
        params = [torch.nn.Parameter(s.cuda()) for s in start]
        opt = cls(params, lr=1e-2, min_8bit_size=1000)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.cuda()
            opt.step()
        if cls is CPUOffloadAdamW8bit:
            assert all(v.device.type == "cpu" for s in opt.state.values() for v in s.values()
                       if isinstance(v, torch.Tensor))
            assert all(buf.is_pinned() for bufs in opt._host.values() for buf in bufs)
        finals.append([p.detach().cpu() for p in params])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_overlapped_cpu_offload_matches_adamw8bit_on_the_gpu():
    """Updates started in backward (device->host copy, CPU kernel, copy back on side streams)
    give the bits of AdamW8bit's CUDA kernel, and the next forward sees the updated weights."""
    from fastlm.optim import CPUOffloadAdamW8bit

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=gen).cuda()
    y = torch.randn(512, 8, generator=gen).cuda()
    finals = []
    for make in (lambda ps: AdamW8bit(ps, lr=1e-2, min_8bit_size=1000),
                 lambda ps: CPUOffloadAdamW8bit(ps, lr=1e-2, min_8bit_size=1000, overlap=True)):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.GELU(), torch.nn.Linear(1024, 8)).cuda()
        opt = make(model.parameters())
        for step in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[step * 64:(step + 1) * 64]), y[step * 64:(step + 1) * 64]).backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]).cpu())
    assert torch.equal(finals[0], finals[1])
