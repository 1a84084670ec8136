"""Multi-process training for ``fastlm-train`` on torch's own engine (``torch.distributed``).

    torchrun --nproc_per_node=8 -m fastlm.train --parallel.mode=fsdp ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init` joins the
process group from them (NCCL for CUDA, gloo on CPU). ``--parallel.mode``:

- ``ddp``: ``torch.nn.parallel.DistributedDataParallel``; every rank holds the whole model and
  optimizer, gradients are averaged over ranks in the backward pass.
- ``fsdp``: FSDP2, ``torch.distributed.fsdp.fully_shard`` on every Transformer block and then on
  the root; parameters, gradients and optimizer states are sharded over ranks (DTensors).
- ``auto`` (the default): ``ddp`` under torchrun with more than one process, else ``none``.
- ``none``: one process.

Gradient accumulation skips the gradient communication on all micro-steps but the last
(:func:`grad_sync`). Everything here is a no-op in a single process, so the trainer calls it
unconditionally.
"""

import contextlib
import os
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fastlm.optim.optim8bit import _Optimizer8bit
from fastlm.train.config import ParallelConfig, UserError

# The device collectives run on (the process group's backend needs its own device's tensors).
_comm_device = torch.device("cpu")


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(cfg: ParallelConfig) -> str:
    """``cfg.mode`` with ``auto`` decided; UserError for a mode the launch cannot run."""
    world = _env_world()
    if cfg.mode == "auto":
        return "ddp" if world > 1 else "none"
    if cfg.mode == "none" and world > 1:
        raise UserError(f"--parallel.mode=none under torchrun with {world} processes would train {world} "
                        "independent copies into one --out; use --parallel.mode=ddp or fsdp")
    if cfg.mode != "none" and "RANK" not in os.environ:
        raise UserError(f"--parallel.mode={cfg.mode} needs the process group torchrun sets up: launch with "
                        "torchrun --nproc_per_node=N -m fastlm.train ... (or use --parallel.mode=none)")
    return cfg.mode


def init(mode: str, device: torch.device) -> torch.device:
    """Join the process group for ``mode`` (not ``none``); returns the device this rank trains on
    (``cuda:LOCAL_RANK`` on CUDA)."""
    global _comm_device
    if mode == "none":
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":  # device_id: NCCL binds this rank's GPU (barriers need not guess it)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    _comm_device = device
    return device


def teardown() -> None:
    """Leave the process group (after the last collective; safe to call when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that logs, prints and writes files."""
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (one copy of each message, not one per process)."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Run the body on rank 0 first, then on the others: rank 0 fills a cache (trained
    tokenizer, token file) that the other ranks then read instead of rebuilding it. Rank 0 joins
    the barrier even when its body raises, so the others run on and report the same error."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def seed_ranks(seed: int) -> None:
    """Give every rank its own torch RNG stream (dropout, sampling) after the model is built from
    the shared seed; a single process keeps the stream it has."""
    if world_size() > 1:
        torch.manual_seed(seed * 1_000_003 + rank())


def wrap(model: torch.nn.Module, mode: str, reshard_after_forward: bool = True) -> torch.nn.Module:
    """The model as trained under ``mode``: a DDP wrapper, the same module sharded by FSDP2 (each
    block its own unit, so only one block's full weights exist at a time), or ``model`` itself."""
    if mode == "ddp":
        device_ids = [torch.cuda.current_device()] if _comm_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if mode == "fsdp":
        # A block returns a view (nn.Linear's output on 3-D input); FSDP2 warns that an in-place op on it
        # would skip a hook. The Transformer never modifies a block's outputs in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=reshard_after_forward)
        fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside a DDP wrapper (an FSDP2 module is the Transformer itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: torch.nn.Module, sync: bool):
    """Backward passes in the body communicate gradients only when ``sync`` (the last
    micro-step of an accumulation); the others accumulate locally."""
    if isinstance(model, DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (losses, token counts)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: int) -> int:
    """The largest of one integer over ranks (a stop signal seen by any rank stops them all)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` that also takes FSDP2's sharded (DTensor) gradients: the
    norm is over the full gradients on every rank."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)


# ---- checkpoint states -------------------------------------------------------------------------
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict | None:
    """FSDP2: the full (gathered, CPU) state dict on rank 0 and ``{}`` elsewhere; a collective,
    so every rank calls it. Other modes: None (the module is saved as it is)."""
    if not is_sharded(model):
        return None
    return get_model_state_dict(model, options=_FULL)


def load_full_model_state(model: torch.nn.Module, state: dict):
    """Shard a full state dict (read by every rank) into an FSDP2 model; returns torch's
    (missing, unexpected) keys."""
    return set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def shards_optimizer_state(model: torch.nn.Module, optimizer) -> bool:
    """Whether the optimizer's state is saved per rank: the 8-bit optimizers under FSDP2 quantize
    each rank's local shard in blocks, so their states exist only in that layout."""
    return is_sharded(model) and isinstance(optimizer, _Optimizer8bit)


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer state dict in torch's index-keyed form, as a single process has it:
    FSDP2 (full-state optimizers) gathers it onto rank 0 (``{}`` elsewhere; a collective); other
    modes, and the per-rank 8-bit states under FSDP2, are the local ``state_dict()``."""
    if not is_sharded(model) or shards_optimizer_state(model, optimizer):
        return optimizer.state_dict()
    by_name = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not by_name:
        return {}
    index = _name_to_index(by_name["param_groups"])
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Set an index-keyed state dict (full, or this rank's 8-bit shard) into the optimizer."""
    if not is_sharded(model) or shards_optimizer_state(model, optimizer):
        optimizer.load_state_dict(state)
        return
    names = _param_names(model, optimizer)
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    by_name = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _name_to_index(groups: list[dict]) -> dict[str, int]:
    names = [n for g in groups for n in g["params"]]
    return {n: i for i, n in enumerate(names)}


def _param_names(model: torch.nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the order its state-dict indices count)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_to_main(obj) -> list | None:
    """``obj`` of every rank, in rank order, on rank 0 (a collective); None elsewhere."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def comm_device() -> torch.device:
    """This rank's device (its CUDA device under NCCL, else the CPU)."""
    return _comm_device
