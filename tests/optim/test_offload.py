"""CPUOffloadAdamW8bit: overlapped (updates started in backward) and step-time updates give
AdamW8bit's bits, resume exactly, and refuse what overlap cannot do. On a CPU-only machine the
parameters are CPU tensors: the same worker, hooks and waiting, without the device copies
(tests/gpu/test_optim_cuda.py covers those)."""

import gc
import io

import pytest
import torch
import torch.nn.functional as F

from fastlm.optim import AdamW8bit, CPUOffloadAdamW8bit

KWARGS = dict(lr=1e-2, min_8bit_size=1000)  # the 96x24 weight goes 8-bit, the rest keeps fp32 states


def data(n=256, d_in=24, d_out=5):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen)
    return x, torch.tanh(x @ torch.randn(d_in, d_out, generator=gen))


def model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(24, 96), torch.nn.GELU(), torch.nn.Linear(96, 5))


def flat(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def train(m, opt, steps, offset=0, batch=64, accumulate=1, clip=None):
    x, y = data()
    for step in range(offset, offset + steps):
        opt.zero_grad()
        for micro in range(accumulate):
            i = ((step * accumulate + micro) * batch) % x.shape[0]
            F.mse_loss(m(x[i:i + batch]), y[i:i + batch]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
        opt.step()


def trained(make_opt, steps=4, **train_kwargs):
    m = model()
    train(m, make_opt(m.parameters()), steps, **train_kwargs)
    return flat(m)


def test_overlapped_and_step_time_updates_match_adamw8bit_bit_for_bit():
    expected = trained(lambda ps: AdamW8bit(ps, **KWARGS))
    assert torch.equal(trained(lambda ps: CPUOffloadAdamW8bit(ps, **KWARGS)), expected)
    assert torch.equal(trained(lambda ps: CPUOffloadAdamW8bit(ps, overlap=True, **KWARGS)), expected)


def test_overlapped_update_starts_in_backward():
    m = model()
    opt = CPUOffloadAdamW8bit(m.parameters(), overlap=True, **KWARGS)
    before = flat(m)
    x, y = data()
    F.mse_loss(m(x[:64]), y[:64]).backward()
    opt._wait()  # what step() does: the updates were started by backward's hooks
    assert all(opt.state[p]["step"] == 1 for p in m.parameters())
    assert not torch.equal(flat(m), before)
    opt.step()  # nothing left to start: no second update
    assert all(opt.state[p]["step"] == 1 for p in m.parameters())


def test_overlap_updates_grads_set_without_backward_at_step():
    p = torch.nn.Parameter(torch.randn(3000))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(3000)
    p.grad, q.grad = g.clone(), g.clone()
    CPUOffloadAdamW8bit([p], overlap=True, **KWARGS).step()
    AdamW8bit([q], **KWARGS).step()
    assert torch.equal(p.detach(), q.detach())


def test_closure_and_scheduler_in_overlap_mode():
    def run(cls, **kwargs):
        m = model()
        opt = cls(m.parameters(), **KWARGS, **kwargs)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        x, y = data()
        for step in range(3):
            def closure():
                opt.zero_grad()
                loss = F.mse_loss(m(x[step * 64:(step + 1) * 64]), y[step * 64:(step + 1) * 64])
                loss.backward()
                return loss

            loss = opt.step(closure)
            assert isinstance(loss, torch.Tensor)
            sched.step()
        return flat(m)

    assert torch.equal(run(CPUOffloadAdamW8bit, overlap=True), run(AdamW8bit))


def test_state_dict_resume_is_bit_exact_in_overlap_mode():
    m = model()
    opt = CPUOffloadAdamW8bit(m.parameters(), overlap=True, **KWARGS)
    train(m, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buffer)
    train(m, opt, 3, offset=3)
    buffer.seek(0)
    saved = torch.load(buffer)
    for cls, kwargs in ((CPUOffloadAdamW8bit, dict(overlap=True)), (AdamW8bit, {})):
        resumed = model()
        resumed.load_state_dict(saved["model"])
        opt2 = cls(resumed.parameters(), **KWARGS, **kwargs)
        opt2.load_state_dict(saved["opt"])
        train(resumed, opt2, 3, offset=3)
        assert torch.equal(flat(resumed), flat(m)), cls.__name__


def test_gradient_accumulation_and_clipping_need_step_time_updates():
    # overlap=False: accumulated and clipped gradients are used, as by AdamW8bit.
    expected = trained(lambda ps: AdamW8bit(ps, **KWARGS), accumulate=2, clip=0.05)
    assert torch.equal(trained(lambda ps: CPUOffloadAdamW8bit(ps, **KWARGS), accumulate=2, clip=0.05), expected)
    # overlap=True: a second backward before step() is refused, not silently applied twice.
    with pytest.raises(RuntimeError, match="overlap=False"):
        trained(lambda ps: CPUOffloadAdamW8bit(ps, overlap=True, **KWARGS), accumulate=2)


def test_overlap_cannot_skip_a_step_and_is_not_stuck_after_saying_so():
    """backward(), zero_grad() without step() (a skipped step), backward(), step(): the first update was
    applied during backward, so zero_grad says the step could not be skipped; then training goes on."""
    m = model()
    opt = CPUOffloadAdamW8bit(m.parameters(), overlap=True, **KWARGS)
    x, y = data()
    before = flat(m)
    F.mse_loss(m(x[:64]), y[:64]).backward()
    with pytest.raises(RuntimeError, match="cannot be skipped and was taken; skipping steps .* needs overlap=False"):
        opt.zero_grad()
    assert not torch.equal(flat(m), before) and all(p.grad is None for p in m.parameters())
    F.mse_loss(m(x[64:128]), y[64:128]).backward()  # no "second gradient" error: a new step
    opt.step()
    opt.zero_grad()
    assert all(opt.state[p]["step"] == 2 for p in m.parameters())
    assert torch.equal(flat(m), trained(lambda ps: AdamW8bit(ps, **KWARGS), steps=2))  # two steps were taken
    # After the second-gradient error, zero_grad() ends that step without a second error.
    F.mse_loss(m(x[:64]), y[:64]).backward()
    with pytest.raises(RuntimeError, match="a step cannot be skipped"):
        F.mse_loss(m(x[:64]), y[:64]).backward()
    opt.zero_grad()
    F.mse_loss(m(x[:64]), y[:64]).backward()
    opt.step()


def test_a_discarded_overlapped_optimizer_leaves_no_hook_behind():
    m = model()
    first = CPUOffloadAdamW8bit(m.parameters(), overlap=True, **KWARGS)
    train(m, first, 1)
    del first
    gc.collect()
    start = flat(m)
    reference = model()
    with torch.no_grad():
        for a, b in zip(reference.parameters(), m.parameters()):
            a.copy_(b)
    train(m, CPUOffloadAdamW8bit(m.parameters(), overlap=True, **KWARGS), 2)
    train(reference, AdamW8bit(reference.parameters(), **KWARGS), 2)
    assert not torch.equal(flat(m), start)
    assert torch.equal(flat(m), flat(reference))


def test_overlap_must_be_a_bool():
    with pytest.raises(TypeError, match="overlap"):
        CPUOffloadAdamW8bit(model().parameters(), overlap="yes")
