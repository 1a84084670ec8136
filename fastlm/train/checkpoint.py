"""Checkpoints: one directory per save, written atomically, nothing in them unpickled on load.

    OUT/checkpoints/step_00001000/
        model.safetensors       the weights (shared/tied tensors once)
        optimizer.safetensors   the optimizer's tensors; optimizer.json its hyper-parameters
        rng.safetensors         the torch CPU (and CUDA) generator states
        config.json             the full run configuration (model config included)
        tokenizer.json          the tokenizer the token ids refer to
        trainer_state.json      step, data position, tokens seen, Python RNG state

A save writes ``OUT/checkpoints/.tmp-step_...`` and renames it into place, so a crash mid-save
never leaves a half checkpoint under a valid name; then all but the newest ``keep_last`` are
deleted.
"""

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from fastlm.train.config import UserError

_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints in ``out``, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def latest(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save(out: Path, step: int, model, optimizer, config: dict, tokenizer_json: str, trainer_state: dict,
         keep_last: int) -> Path:
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    state = dict(trainer_state, step=step, python_rng=_python_rng_to_json(random.getstate()))
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if final.exists():  # a re-save of the same step (e.g. --stop-at at a checkpoint step)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"checkpoint file {path} is unreadable ({exc}); resume from another --out or start "
                        "fresh") from None


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states from ``path``; returns the trainer state."""
    path = Path(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise UserError(f"cannot load {path / 'model.safetensors'} ({str(exc).splitlines()[0]}); the checkpoint does "
                        "not match this model: use the settings it was trained with, or another --out") from None
    if missing or unexpected:
        raise UserError(f"{path / 'model.safetensors'} does not match this model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); use the settings it was trained with, or another --out")
    try:
        return _load_states(path, optimizer)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"checkpoint {path} is incomplete or corrupt ({type(exc).__name__}: {detail}); resume from "
                        "another --out or start fresh") from None


def _load_states(path: Path, optimizer) -> dict:
    tensors = load_file(str(path / "optimizer.safetensors"))
    meta = read_json(path / "optimizer.json")
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    trainer_state = read_json(path / "trainer_state.json")
    random.setstate(_python_rng_from_json(trainer_state["python_rng"]))
    return trainer_state


def _python_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data):
    version, internal, gauss = data
    return version, tuple(internal), gauss
