"""Block-wise 8-bit AdamW, Adam and Lion (Dettmers et al., ICLR 2022).

Each moment is stored as one uint8 code per element plus one fp32 absmax per block of
``block_size`` elements (about 1 byte per parameter and moment instead of 4); the update is
computed per element in fp32 by the rule in csrc/common/optim8bit_rule.h, then requantized.
Tensors smaller than ``min_8bit_size`` keep fp32 states (their memory does not matter and
quantizing them would only add error).

Backends (``fastlm.backend``): ``cpp`` (CPU tensors), ``cuda`` (CUDA tensors; the CUDA C++
extension is compiled on first use) and ``torch`` (``fastlm.optim._rule``, the reference the
kernels match bit for bit). ``CPUOffloadAdamW8bit`` keeps the states of GPU parameters in CPU
memory and updates them with the CPU kernel.

FSDP2-sharded parameters (DTensors) are updated through their local shards: each rank keeps
8-bit states for its shard only, quantized in blocks of that shard (so a state dict holds this
rank's states; fastlm-train saves them per rank).

Quantizing is a closed form (fastlm/optim/_code.py): the dynamic code is linear inside each
decade, so a value's index is ``trunc(|x| * scale + offset)`` once a small table and one compare
pick its decade; it is the nearest code value except within an fp32 rounding of a midpoint.
It replaced a search over the midpoints (a 26 KB lookup-table gather on the CPU, the costliest
step there) and normalizing divides once per block (1 / absmax) and then multiplies. The code
values and the state layout did not change, so state dicts saved before load and dequantize
as they did. On the CPU, with AVX-512 (F/BW/VBMI), the step dequantizes with byte permutes,
quantizes with in-register permutes and overlaps each block's absmax reduction with the next
block's update: 2.0x the speed of the gather-based kernel (interleaved A/B, 8M and 64M fp32
parameters). On a shared 2-vCPU Zen 4 machine, in ``fastlm-bench --suite full --ops optim``
(5 runs), that is 0.7-1.5x the speed of ``torch.optim.AdamW(fused=True)`` at 8M fp32
parameters, 0.6-0.7x at 64M and 0.8-1.6x at 8M bf16 (before: 0.5-0.6x, 0.4-0.5x and 0.4x);
the fused step moves 28 bytes per parameter to our 16 but is bound by memory
bandwidth, ours by computation (per element a square root, a division, and a dequantization
and a quantization per moment).

Without AVX-512 (AVX2 with F16C: AMD Zen 2/3, Intel before Skylake-SP, and Intel parts without
VBMI) the step runs 8 lanes at a time: one scalar load per code from the code table to dequantize
(there are no byte permutes, and AMD's gathers cost more), and the same closed form with two byte
shuffles and 8-entry permutes to quantize. Before, that hardware ran the rule element by element.
On a 2-vCPU Zen 3 machine (``benchmarks/results/cpu-2026-12-02-zen3-optim/``) a first version of
this path (with gathers) was ~3.5x the element-wise kernel alone (1M fp32 parameters, alternating
processes), and the step at 8M fp32 1.4-1.9x ``foreach`` AdamW and 7-10x bitsandbytes, but
0.3-0.37x the fused AdamW, which does far less work per element. Without gathers, measured with
the AVX2 path forced on a Zen 4 (``benchmarks/results/cpu-2026-12-03-zen4/optim_avx2_lookup.txt``),
the step went from 0.45-0.51x to 0.59-0.60x the fused AdamW at 8M fp32; a Zen 3 was not at hand.

The CPU kernel holds every path the processor can run, picked at run time: ``avx512``, ``avx2``,
or ``generic`` (the rule element by element, as the compiler vectorizes it). All compute the
same bits. ``cpu_kernel_paths()`` lists them, fastest (the default) first;
``$FASTLM_OPTIM8BIT_PATH`` forces one (to compare them, or to test each on one machine), and
``fastlm.backend_info()["cpu_optim8bit"]`` says which runs.
"""

import concurrent.futures
import functools
import os
import sys
import weakref

import torch

from fastlm import backend
from fastlm.extension import cpu_extension, cuda_extension
from fastlm.optim import _rule
from fastlm.optim._code import tables
from fastlm.optim._rule import ADAM, ADAMW, LION

MIN_BLOCK_SIZE = 32
MAX_BLOCK_SIZE = 4096  # the CUDA kernel runs one thread block per quantization block
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---- the CPU kernel's code paths ---------------------------------------------------------------
PATH_ENV = "FASTLM_OPTIM8BIT_PATH"


@functools.cache
def cpu_kernel_paths() -> tuple[str, ...]:
    """The CPU kernel's code paths this build and processor run, fastest (the default) first."""
    return tuple(cpu_extension().optim8bit_paths())


def cpu_kernel_path() -> str:
    """The path the CPU kernel runs: ``$FASTLM_OPTIM8BIT_PATH`` when set, else the fastest."""
    paths = cpu_kernel_paths()
    forced = os.environ.get(PATH_ENV, "")
    if not forced:
        return paths[0]
    if forced not in paths:
        raise ValueError(f"{PATH_ENV}: expected one of the paths this CPU runs {paths}, got {forced!r}")
    return forced


def cpu_kernel_info() -> dict:
    """``fastlm.backend_info()["cpu_optim8bit"]``: the CPU kernel's path and the alternatives."""
    try:
        paths = list(cpu_kernel_paths())
    except RuntimeError as exc:  # the extension did not build
        return {"path": None, "paths": [], "error": str(exc)}
    try:
        return {"path": cpu_kernel_path(), "paths": paths, "error": None}
    except ValueError as exc:  # a forced path this CPU does not run
        return {"path": None, "paths": paths, "error": str(exc)}


# ---- launchers: one optimizer step on one parameter, in place --------------------------------
def _step_cpp(kind, param, grad, state1, absmax1, state2, absmax2, tables1, tables2, block_size, hyper, seed,
              step, stochastic_rounding):
    cpu_extension().optim8bit_step(
        kind, param, grad, state1, absmax1, state2, absmax2, tables1, tables2, block_size, hyper.as_list(), seed,
        step, stochastic_rounding, cpu_kernel_path(),
    )

def _step_cuda(kind, param, grad, state1, absmax1, state2, absmax2, tables1, tables2, block_size, hyper, seed,
               step, stochastic_rounding):
    cuda_extension().optim8bit_step(
        kind, param, grad, state1, absmax1, state2, absmax2, tables1, tables2, block_size, hyper.as_list(), seed,
        step, stochastic_rounding,
    )

backend.register("optim8bit_step", cpp=_step_cpp, cuda=_step_cuda, torch=_rule.step_8bit)

# ---- argument checks --------------------------------------------------------------------------
def _lr_value(lr) -> float:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr: expected a number or a one-element tensor, got a tensor of shape {tuple(lr.shape)}")
        return float(lr.item())
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"lr: expected a number or a one-element tensor, got {type(lr).__name__}")
    return float(lr)

def _check_hyper(group: dict, kind: int) -> None:
    """ValueError/TypeError for a bad hyper-parameter of a param group, naming it."""
    lr = _lr_value(group["lr"])
    if not lr >= 0.0:
        raise ValueError(f"lr: expected >= 0, got {lr}")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"betas: expected two values, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}]: expected a value in [0, 1), got {beta}")
    if kind != LION and not group["eps"] > 0.0:
        raise ValueError(f"eps: expected > 0, got {group['eps']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"weight_decay: expected >= 0, got {group['weight_decay']}")
    block_size = group["block_size"]
    if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0
            or block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE):
        raise ValueError(
            f"block_size: expected a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size!r}"
        )
    min_8bit_size = group["min_8bit_size"]
    if not isinstance(min_8bit_size, int) or isinstance(min_8bit_size, bool) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size: expected an integer >= 0, got {min_8bit_size!r}")
    if not isinstance(group["bf16_stochastic_rounding"], bool):
        raise TypeError(f"bf16_stochastic_rounding: expected a bool, got {group['bf16_stochastic_rounding']!r}")

def _check_param(param: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise TypeError("8-bit optimizers do not support sparse gradients; got a sparse grad of shape "
                        f"{tuple(grad.shape)} (use a dense gradient, e.g. nn.Embedding(sparse=False))")
    if param.dtype not in _PARAM_DTYPES:
        raise TypeError(f"param: expected float32, bfloat16 or float16, got {param.dtype}")
    if grad.dtype != param.dtype or grad.shape != param.shape or grad.device != param.device:
        raise ValueError(
            f"grad: expected {param.dtype} of shape {tuple(param.shape)} on {param.device}, "
            f"got {grad.dtype} of shape {tuple(grad.shape)} on {grad.device}"
        )

def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or ``t`` itself. No DTensor exists
    unless torch.distributed.tensor was imported, and importing it here would add a second to
    ``import fastlm``."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t

def _is_torch_adam(state_dict: dict) -> bool:
    """Whether ``state_dict`` is torch.optim.Adam's or AdamW's (its groups say amsgrad, never ours)."""
    return all("amsgrad" in group and "block_size" not in group for group in state_dict["param_groups"])

class _Optimizer8bit(torch.optim.Optimizer):
    """The shared machinery; subclasses fix the rule (``_kind``) and the defaults."""

    _kind: int
    # The torch optimizer of the same rule, whose state dicts load_state_dict converts (or None).
    _torch_counterpart: type[torch.optim.Optimizer] | None = None

    def __init__(self, params, lr, betas, eps, weight_decay, block_size, min_8bit_size, bf16_stochastic_rounding):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size, bf16_stochastic_rounding=bf16_stochastic_rounding)
        _check_hyper(defaults, self._kind)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # Checked before the group joins (torch fills the missing keys from the defaults), so a
        # rejected group leaves the optimizer as it was.
        _check_hyper({**self.defaults, **param_group}, self._kind)
        super().add_param_group(param_group)

    def _param_index(self, param: torch.Tensor) -> int:
        flat = [p for group in self.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(flat) if p is param)

    def _state_device(self, param: torch.Tensor) -> torch.device:
        """Where the states of ``param`` live (the offloading subclass keeps them on the CPU)."""
        return param.device

    def _init_state(self, param: torch.Tensor, group: dict) -> dict:
        n = _local(param).numel()
        device = self._state_device(param)
        state = {"step": 0, "seed": self._param_index(param)}
        two_moments = self._kind != LION
        if n >= group["min_8bit_size"]:
            blocks = -(-n // group["block_size"])
            # Zero codes with zero absmax dequantize to exactly 0, as fp32 states start.
            state["state1"] = torch.zeros(n, dtype=torch.uint8, device=device)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=device)
            if two_moments:
                state["state2"] = torch.zeros(n, dtype=torch.uint8, device=device)
                state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        else:
            state["exp_avg"] = torch.zeros(n, dtype=torch.float32, device=device)
            if two_moments:
                state["exp_avg_sq"] = torch.zeros(n, dtype=torch.float32, device=device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_hyper(group, self._kind)
            for param in group["params"]:
                if param.grad is None:
                    continue
                state, hyper = self._begin_update(param, group)
                self._update(param, state, group, hyper)
        return loss

    def _begin_update(self, param: torch.Tensor, group: dict) -> tuple[dict, _rule.Hyper]:
        """Check ``param``'s gradient, create its state on first use, count the step and
        return the state with the step's scalars (the group's ``lr`` read now)."""
        _check_param(_local(param), _local(param.grad))
        state = self.state[param]
        if not state:
            state.update(self._init_state(param, group))
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = _rule.make_hyper(self._kind, _lr_value(group["lr"]), beta1, beta2, group["eps"],
                                 group["weight_decay"], state["step"])
        return state, hyper

    def _update(self, param: torch.Tensor, state: dict, group: dict, hyper: _rule.Hyper) -> None:
        # The kernels take contiguous tensors; a non-contiguous parameter is updated through a copy.
        local = _local(param)
        target = local.data if local.is_contiguous() else local.data.contiguous()
        self._update_contiguous(target, _local(param.grad).contiguous(), state, group, hyper)
        if not local.is_contiguous():
            local.data.copy_(target)

    def _update_contiguous(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict,
                           hyper: _rule.Hyper) -> None:
        """One step on contiguous ``param`` and ``grad``, on the device they and the states share."""
        stochastic = group["bf16_stochastic_rounding"] and param.dtype == torch.bfloat16
        if "state1" in state:
            two_moments = self._kind != LION
            tables1 = tables(True, param.device)
            tables2 = tables(False, param.device) if two_moments else None
            impl = backend.select("optim8bit_step", param.device)
            impl(self._kind, param, grad, state["state1"], state["absmax1"], state.get("state2"),
                 state.get("absmax2"), tables1, tables2, group["block_size"], hyper, state["seed"], state["step"],
                 stochastic)
        else:
            _rule.step_fp32(self._kind, param, grad, state["exp_avg"], state.get("exp_avg_sq"), hyper,
                            state["seed"], state["step"], stochastic)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but states keep their dtypes (torch would cast uint8 codes and fp32 absmax
        to the parameter's dtype), so training continues bit for bit.

        A state dict of the torch optimizer with the same rule (``torch.optim.AdamW`` for AdamW8bit,
        ``torch.optim.Adam`` for Adam8bit) loads too, to switch a run to 8-bit states: its moments
        are quantized as this optimizer's own states would be (fp32 below ``min_8bit_size``), its
        step count and its groups' lr, betas, eps and weight decay are kept, and this optimizer's
        block size, ``min_8bit_size`` and rounding apply. The steps that follow are then the 8-bit
        optimizer's, not bit for bit those the torch optimizer would have taken. Any other state
        dict that does not fit raises a ValueError naming what does not match."""
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state_dict: expected {len(self.param_groups)} param groups, got "
                             f"{len(state_dict['param_groups'])}")
        for g, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"state_dict: param_groups[{g}] has {len(saved['params'])} parameters, this "
                                 f"optimizer's {len(group['params'])}")
        if self._torch_counterpart is not None and _is_torch_adam(state_dict):
            state_dict = self._from_torch(state_dict)
        self._check_loadable(state_dict)
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        for saved, group in zip(saved_groups, self.param_groups):
            for index, param in zip(saved["params"], group["params"]):
                if index not in saved_state:
                    continue
                self.state[param] = {
                    key: value.to(device=self._state_device(param), copy=True) if isinstance(value, torch.Tensor)
                    else value
                    for key, value in saved_state[index].items()
                }

    def _check_loadable(self, state_dict: dict) -> None:
        """ValueError unless ``state_dict`` holds this optimizer's groups and, per parameter, the
        states its rule keeps, of the parameter's size (this rank's shard under FSDP2)."""
        name = type(self).__name__
        moments = ("1", "2") if self._kind != LION else ("1",)
        layouts = ({"step", "seed", *(f"state{i}" for i in moments), *(f"absmax{i}" for i in moments)},
                   {"step", "seed", "exp_avg", *(("exp_avg_sq",) if self._kind != LION else ())})
        for g, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            missing = [key for key in self.defaults if key not in saved]
            if missing:
                raise ValueError(f"state_dict: param_groups[{g}] lacks {', '.join(missing)}: not a state dict of {name}")
            for index, param in zip(saved["params"], group["params"]):
                state = state_dict["state"].get(index)
                if state is None:
                    continue
                if set(state) not in layouts:
                    raise ValueError(f"state_dict: parameter {index}'s state holds {sorted(state)}; {name} keeps "
                                     f"{sorted(layouts[0])} or {sorted(layouts[1])}")
                n = _local(param).numel()
                blocks = -(-n // saved["block_size"])
                for key, value in state.items():
                    expected = blocks if key.startswith("absmax") else n
                    if isinstance(value, torch.Tensor) and value.numel() != expected:
                        raise ValueError(f"state_dict: parameter {index}'s {key} has {value.numel()} elements, "
                                         f"expected {expected} for a parameter of shape {tuple(param.shape)}")

    def _from_torch(self, state_dict: dict) -> dict:
        """``state_dict`` of ``self._torch_counterpart`` as this optimizer's (see load_state_dict)."""
        counterpart = self._torch_counterpart.__name__
        decoupled = self._kind == ADAMW
        groups, states = [], {}
        for g, (saved, group) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            for flag in ("amsgrad", "maximize"):
                if saved.get(flag):
                    raise ValueError(f"state_dict: param_groups[{g}] has {flag}=True, which {type(self).__name__} "
                                     "does not implement")
            if saved.get("decoupled_weight_decay", decoupled) != decoupled:
                other = "torch.optim.AdamW" if saved["decoupled_weight_decay"] else "torch.optim.Adam"
                raise ValueError(f"state_dict: param_groups[{g}] is {other}'s; {type(self).__name__} loads "
                                 f"torch.optim.{counterpart}'s")
            converted = {key: group[key] for key in self.defaults}
            converted.update({key: saved[key] for key in ("lr", "betas", "eps", "weight_decay")}, params=saved["params"])
            groups.append(converted)
            for index, param in zip(saved["params"], group["params"]):
                if index in state_dict["state"]:
                    states[index] = self._quantized(state_dict["state"][index], index, param, converted)
        return {"state": states, "param_groups": groups}

    def _quantized(self, saved: dict, index: int, param: torch.Tensor, group: dict) -> dict:
        """A torch Adam/AdamW state of ``param`` (``index`` in the state dict) as this optimizer's,
        its moments quantized."""
        state = self._init_state(param, group)
        state["step"] = int(saved["step"])
        for key, moment, signed in (("exp_avg", "1", True), ("exp_avg_sq", "2", False)):
            value = _local(saved[key]).detach().float().reshape(-1)
            if value.numel() != _local(param).numel():
                raise ValueError(f"state_dict: parameter {index}'s {key} has {value.numel()} elements, expected "
                                 f"{_local(param).numel()} for a parameter of shape {tuple(param.shape)}")
            if key in state:
                state[key] = value.to(state[key].device, copy=True)
            else:
                codes, absmax = _rule.requantize(value, tables(signed, value.device), signed, group["block_size"])
                state[f"state{moment}"], state[f"absmax{moment}"] = codes, absmax
        return state

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states (codes, absmax and fp32 states)."""
        return sum(v.numel() * v.element_size() for s in self.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))

class AdamW8bit(_Optimizer8bit):
    """AdamW (decoupled weight decay, as ``torch.optim.AdamW``) with block-wise 8-bit states.

    ``bf16_stochastic_rounding``: bf16 parameters are written with stochastic rounding (keyed
    by the parameter's index, the step and the element), so small updates to pure-bf16 weights
    accumulate on average instead of rounding away.
    """

    _kind = ADAMW
    _torch_counterpart = torch.optim.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, block_size=256,
                 min_8bit_size=4096, bf16_stochastic_rounding=False):
        super().__init__(params, lr, betas, eps, weight_decay, block_size, min_8bit_size, bf16_stochastic_rounding)

class Adam8bit(_Optimizer8bit):
    """Adam with coupled L2 weight decay (added to the gradient, as ``torch.optim.Adam``), 8-bit states."""

    _kind = ADAM
    _torch_counterpart = torch.optim.Adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, block_size=256,
                 min_8bit_size=4096, bf16_stochastic_rounding=False):
        super().__init__(params, lr, betas, eps, weight_decay, block_size, min_8bit_size, bf16_stochastic_rounding)

class Lion8bit(_Optimizer8bit):
    """Lion (Chen et al., 2023: sign of an interpolated momentum, decoupled decay), one 8-bit state."""

    _kind = LION

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, block_size=256, min_8bit_size=4096,
                 bf16_stochastic_rounding=False):
        super().__init__(params, lr, betas, 0.0, weight_decay, block_size, min_8bit_size,
                         bf16_stochastic_rounding)


class CPUOffloadAdamW8bit(AdamW8bit):
    """AdamW8bit whose states live in CPU memory and whose update runs on the CPU kernel, for
    models whose optimizer states do not fit the GPU.

    Per GPU parameter and step: the gradient and the parameter are copied into pinned host
    buffers (on a side stream, after the work that produced them), a worker thread runs the
    CPU kernel on them with the CPU-resident states, then copies the parameter back (another
    side stream); ``step()`` returns once every update is done and has made the current stream
    wait for the copies back. CPU parameters are updated in place by the same worker. The CPU
    and CUDA kernels compute the same bits (tests/gpu/test_optim_cuda.py), so training matches
    AdamW8bit in either mode, and state dicts are interchangeable.

    ``overlap=False`` (the default): ``step()`` starts every update (the worker still overlaps
    one parameter's copies with another's CPU update) and waits for them. Gradient clipping,
    gradient accumulation over several backward passes and any other change to the gradients
    before ``step()`` work as with any optimizer.

    ``overlap=True``: each parameter's update starts during ``backward()``, as soon as its
    gradient is accumulated (``register_post_accumulate_grad_hook``), so the copies and the CPU
    update run under the rest of the backward pass; ``step()`` then only waits for them (and
    updates, at once, parameters whose gradient came without a backward pass). Hence:

    - the update uses the gradient as backward left it: clipping or scaling gradients
      between ``backward()`` and ``step()`` has no effect on it (clip inside the loss instead,
      or use ``overlap=False``);
    - one backward pass per ``step()``: a second gradient for a parameter before ``step()``
      (gradient accumulation) raises a RuntimeError during that backward;
    - no step can be skipped: the update is applied during ``backward()``, before the caller
      could decide to skip it (e.g. on non-finite gradients, which needs ``overlap=False``).
      ``zero_grad()`` after a backward pass without ``step()`` waits for those updates, clears
      the gradients, counts the step as taken and then raises a RuntimeError saying so; the
      optimizer goes on normally after it (the next backward and ``step()`` are a new step).
      After the second-gradient error, ``step()`` or ``zero_grad()`` likewise ends that step;
    - the learning rate and other hyper-parameters are read when the update starts (during
      backward), which is after the previous ``step()`` and scheduler step, as usual;
    - a closure passed to ``step()`` runs its backward first, as usual; ``zero_grad()``,
      ``state_dict()`` and ``load_state_dict()`` first wait for outstanding updates.
    """

    def __init__(self, params, *args, overlap: bool = False, **kwargs):
        super().__init__(params, *args, **kwargs)
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap: expected a bool, got {overlap!r}")
        self.overlap = overlap
        # Pinned staging buffers (parameter, gradient) per GPU parameter: scratch, not state.
        self._host: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
        # Updates started and not yet waited for, in start order. (Grad mode is per thread: the
        # worker's tasks run under no_grad themselves.)
        self._pending: dict[torch.Tensor, concurrent.futures.Future] = {}
        # Parameters whose update for the coming step() has started (in backward, overlap=True).
        self._started: set[torch.Tensor] = set()
        # Whether an error about this step has been raised already (a second gradient).
        self._refused = False
        # One worker: updates run one at a time (the CPU kernel is itself parallel), in order.
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastlm-offload")
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._group_of: dict[torch.Tensor, dict] = {}
        self._hook_handles: list = []
        weakref.finalize(self, _shutdown_offload, self._worker, self._hook_handles)
        for group in self.param_groups:
            self._track_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_group_of"):  # the constructor tracks its own groups once set up
            self._track_group(self.param_groups[-1])

    def _track_group(self, group: dict) -> None:
        optimizer = weakref.ref(self)  # the hooks must not keep a discarded optimizer alive

        def on_grad_ready(param: torch.Tensor) -> None:
            live = optimizer()
            if live is not None:
                live._grad_ready(param)

        for param in group["params"]:
            self._group_of[param] = group
            if self.overlap and param.requires_grad:
                self._hook_handles.append(param.register_post_accumulate_grad_hook(on_grad_ready))

    def _state_device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu")

    @torch.no_grad()
    def _grad_ready(self, param: torch.Tensor) -> None:
        """The post-accumulate-grad hook (overlap=True): start ``param``'s update now."""
        if param in self._started:
            self._refused = True
            raise RuntimeError(
                "CPUOffloadAdamW8bit(overlap=True): a second gradient for a parameter before step(); "
                "updates are applied during backward, so gradients cannot accumulate over several backward "
                "passes and a step cannot be skipped (gradient accumulation, or skipping steps e.g. on "
                "non-finite gradients, needs overlap=False); call step() or zero_grad() to end this step"
            )
        group = self._group_of[param]
        _check_hyper(group, self._kind)
        self._start(param, group)

    def _start(self, param: torch.Tensor, group: dict) -> None:
        state, hyper = self._begin_update(param, group)
        self._started.add(param)
        if param.device.type == "cpu":
            self._pending[param] = self._worker.submit(torch.no_grad()(self._update), param, state, group, hyper)
            return
        host_param, host_grad = self._host_buffers(param)
        to_host, to_device = self._side_streams(param.device)
        grad = param.grad
        to_host.wait_stream(torch.cuda.current_stream(param.device))
        with torch.cuda.stream(to_host):
            host_param.copy_(param.detach(), non_blocking=True)
            host_grad.copy_(grad, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(to_host)
        grad.record_stream(to_host)  # zero_grad may free it before the copy has run

        def update() -> torch.cuda.Event:
            copied.synchronize()
            self._update_contiguous(host_param.view(-1), host_grad.view(-1), state, group, hyper)
            with torch.cuda.stream(to_device):
                param.data.copy_(host_param, non_blocking=True)
                done = torch.cuda.Event()
                done.record(to_device)
            return done

        self._pending[param] = self._worker.submit(torch.no_grad()(update))

    def _host_buffers(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if param not in self._host:
            pinned = torch.cuda.is_available()
            self._host[param] = tuple(
                torch.empty(param.shape, dtype=param.dtype, pin_memory=pinned) for _ in range(2)
            )
        return self._host[param]

    def _side_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _wait(self) -> None:
        """Wait for every started update; later GPU work waits for their copies back."""
        pending, self._pending = self._pending, {}
        errors = []
        for param, future in pending.items():
            try:
                done = future.result()
            except Exception as exc:  # noqa: BLE001 (the first is raised once all have finished)
                errors.append(exc)
                continue
            if done is not None:
                torch.cuda.current_stream(param.device).wait_event(done)
        if errors:
            raise errors[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            for group in self.param_groups:
                _check_hyper(group, self._kind)
                for param in group["params"]:
                    if param.grad is not None and param not in self._started:
                        self._start(param, group)
        finally:
            self._started.clear()
            self._refused = False
            self._wait()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        skipped = bool(self._started) and not self._refused
        self._started.clear()  # those updates are applied: the next backward is a new step
        self._refused = False
        self._wait()
        super().zero_grad(set_to_none)
        if skipped:
            raise RuntimeError(
                "CPUOffloadAdamW8bit(overlap=True): zero_grad() after backward() without step(): the updates "
                "were applied during backward, so this step cannot be skipped and was taken; skipping steps "
                "(e.g. on non-finite gradients) needs overlap=False"
            )

    def state_dict(self) -> dict:
        self._wait()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._wait()
        super().load_state_dict(state_dict)


def _shutdown_offload(worker: concurrent.futures.ThreadPoolExecutor, hook_handles: list) -> None:
    """Finalizer of a CPUOffloadAdamW8bit: stop its worker thread and remove its hooks."""
    worker.shutdown(wait=False)
    for handle in hook_handles:
        handle.remove()
