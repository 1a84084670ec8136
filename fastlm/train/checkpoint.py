"""Checkpoints: one directory per save, written atomically, nothing in them unpickled on load.

    OUT/checkpoints/step_00001000/
        model.safetensors       the weights (shared/tied tensors once)
        optimizer.safetensors   the optimizer's tensors; optimizer.json its hyper-parameters
        rng.safetensors         the torch CPU (and CUDA) generator states
        config.json             the full run configuration (model config included)
        tokenizer.json          the tokenizer the token ids refer to
        trainer_state.json      step, data position, tokens seen, world size, Python RNG state

Written by N processes (``fastlm.train.distributed``) the files are the same: rank 0 writes the
full model and optimizer state (DDP: its replica; FSDP2: gathered from the shards), so the
weights load in one process. Two differences: rng.safetensors holds every rank's generator
states (``rank{r}.torch_cpu``, ``rank{r}.torch_cuda``), and with an 8-bit optimizer under FSDP2
the optimizer states are per rank (``optimizer.rank00000.safetensors`` ...; optimizer.json says
``"shards": N``), because their quantization blocks follow each rank's shard. Resuming needs the
world size the checkpoint was written with.

A save writes ``OUT/checkpoints/.tmp-step_...`` and renames it into place, so a crash mid-save
never leaves a half checkpoint under a valid name; then all but the newest ``keep_last`` are
deleted. So a file that cannot be read back was damaged after the save: the readers here report
that checkpoint as corrupt, apart from a readable one that does not fit the run's settings. The
advice depends on the reader: a resume (``resume=True``, the trainer's readers) is told to delete
it so that --resume takes the one before; ``resolve_pretrained`` (--init-from, fastlm-generate,
hf_convert) to give another checkpoint.
"""

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from fastlm.models.config import ModelConfig
from fastlm.train import distributed
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


def _optimizer_tensors(state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _shard_name(rank: int) -> str:
    return f"optimizer.rank{rank:05d}.safetensors"


def _rng_states() -> dict:
    """The torch generator states to save: this process's (CPU, every CUDA device), or, from N
    ranks, each rank's own (CPU and its CUDA device) under ``rank{r}.`` on rank 0 (a collective;
    ranks draw different dropout masks, so each resumes its own stream)."""
    if distributed.world_size() == 1:
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        return rng
    local = {"torch_cpu": torch.get_rng_state()}
    device = distributed.comm_device()
    if device.type == "cuda":
        local["torch_cuda"] = torch.cuda.get_rng_state(device)
    gathered = distributed.gather_to_main(local) or []
    return {f"rank{r}.{key}": value for r, states in enumerate(gathered) for key, value in states.items()}


def _set_rng_states(rng: dict) -> None:
    if distributed.world_size() == 1:
        torch.set_rng_state(rng["torch_cpu"])
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
        return
    prefix = f"rank{distributed.rank()}."
    torch.set_rng_state(rng[prefix + "torch_cpu"])
    device = distributed.comm_device()
    if prefix + "torch_cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng[prefix + "torch_cuda"], device)


def save(out: Path, step: int, model, optimizer, config: dict, tokenizer_json: str, trainer_state: dict,
         keep_last: int) -> Path:
    """Write checkpoint ``step``; under torch.distributed every rank calls this (the states are
    gathered with collectives) and rank 0 writes, except the per-rank 8-bit optimizer shards of
    FSDP2, which each rank writes into the temporary directory before rank 0 renames it."""
    model_state = distributed.full_model_state(model)
    optimizer_state = distributed.optimizer_state(model, optimizer)
    sharded = distributed.shards_optimizer_state(model, optimizer)
    rng = _rng_states()
    root = Path(out) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    world = distributed.world_size()
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if model_state is None:
            save_model(distributed.unwrap(model), str(tmp / "model.safetensors"))
        else:
            save_file(model_state, str(tmp / "model.safetensors"))
        tensors, meta = _optimizer_tensors(optimizer_state)
        if sharded:
            meta["shards"] = world
        else:
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file(rng, str(tmp / "rng.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        state = dict(trainer_state, step=step, world_size=world, python_rng=_python_rng_to_json(random.getstate()))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if sharded:
        distributed.barrier()  # the temporary directory exists
        save_file(_optimizer_tensors(optimizer_state)[0], str(tmp / _shard_name(distributed.rank())))
        distributed.barrier()  # every shard is written
    if distributed.is_main():
        if final.exists():  # a re-save of the same step (e.g. --stop-at at a checkpoint step)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    distributed.barrier()  # no rank goes on before the checkpoint is complete
    return final


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _corrupt(ckpt: Path, detail: str, resume: bool = True) -> UserError:
    """The error for a checkpoint that cannot be read back. A save renames a complete directory into place, so
    its files were damaged or removed afterwards: the checkpoint before it is the way back. ``resume``: the
    reader is a --resume (advice: delete it); otherwise it was given as a model to start from or to run."""
    if resume:
        advice = "delete that directory so that --resume takes the previous checkpoint, or start fresh with another --out"
    else:
        advice = "give another checkpoint (e.g. an earlier one in the same checkpoints/ directory)"
    return UserError(f"checkpoint {ckpt} is incomplete or corrupt ({detail}); {advice}")


def read_json(path: Path, resume: bool = True) -> dict:
    """A JSON object file of a checkpoint (``path`` is in the checkpoint directory); UserError when it is
    missing, unreadable or not an object (``resume``: see ``_corrupt``)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise _corrupt(path.parent, f"{path.name}: {_first_line(exc)}", resume) from None
    if not isinstance(value, dict):
        raise _corrupt(path.parent, f"{path.name}: not a JSON object", resume)
    return value


def read_config(ckpt: Path, sections: tuple[str, ...] = ("model", "optim"), resume: bool = True) -> dict:
    """The run configuration saved in checkpoint directory ``ckpt``: a table per section, holding the
    ``sections`` its reader needs (a resume: model and optim; the others may be missing in a checkpoint
    of an older fastlm); UserError when it is unreadable or not so."""
    path = Path(ckpt) / "config.json"
    saved = read_json(path, resume)
    for section in sections:
        if section not in saved:
            raise _corrupt(path.parent, f"{path.name}: no {section} section", resume)
    for section, values in saved.items():
        if not isinstance(values, dict):
            raise _corrupt(path.parent, f"{path.name}: its {section} section is not a JSON object", resume)
    return saved


def read_tokenizer(ckpt: Path, resume: bool = True):
    """The tokenizer saved in checkpoint directory ``ckpt`` (the one its token ids refer to)."""
    from fastlm.train.data import read_tokenizer_file

    path = Path(ckpt) / "tokenizer.json"
    try:
        return read_tokenizer_file(path)
    except ValueError as exc:
        raise _corrupt(path.parent, f"{path.name}: {exc}", resume) from None


def _read_tensors(path: Path, resume: bool = True) -> dict:
    """The tensors of a safetensors file of a checkpoint; UserError when it is missing or damaged."""
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise _corrupt(path.parent, f"{path.name}: {_first_line(exc)}", resume) from None


def load(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and RNG states from ``path``; returns the trainer state. Every
    rank calls this (each reads the files; FSDP2 keeps its shard of the full state)."""
    path = Path(path)
    trainer_state = read_json(path / "trainer_state.json")
    saved_world, world = trainer_state.get("world_size", 1), distributed.world_size()
    if saved_world != world:
        raise UserError(f"checkpoint {path} was written by {saved_world} process(es), this run has {world}; resume "
                        f"with the same world size (torchrun --nproc_per_node / --nnodes); its model.safetensors "
                        "loads anywhere for evaluation or generation")
    model_file = path / "model.safetensors"
    try:
        if distributed.is_sharded(model):
            missing, unexpected = distributed.load_full_model_state(model, load_file(str(model_file)))
        else:
            missing, unexpected = load_model(distributed.unwrap(model), str(model_file), strict=False)
    except (OSError, SafetensorError) as exc:  # reading the file failed
        raise _corrupt(path, f"{model_file.name}: {_first_line(exc)}") from None
    except RuntimeError as exc:  # the file reads, but its tensors do not fit (load_state_dict's error)
        raise UserError(f"cannot load {model_file} ({_first_line(exc)}); the checkpoint does not match this model: "
                        "use the settings it was trained with, or another --out") from None
    if missing or unexpected:
        raise UserError(f"{path / 'model.safetensors'} does not match this model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); use the settings it was trained with, or another --out")
    try:
        _load_states(path, model, optimizer)
        random.setstate(_python_rng_from_json(trainer_state["python_rng"]))
    # Files that read, but whose contents do not fit: the model matched, so they were damaged.
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {_first_line(exc)}") from None
    return trainer_state


def _load_states(path: Path, model, optimizer) -> None:
    meta = read_json(path / "optimizer.json")
    sharded = distributed.shards_optimizer_state(model, optimizer)
    if bool(meta.get("shards")) != sharded:
        held = "per-rank 8-bit optimizer shards (FSDP)" if meta.get("shards") else "a full optimizer state"
        raise UserError(f"checkpoint {path} holds {held}; resume it with the --parallel.mode and --optim.name it "
                        "was trained with")
    tensors = _read_tensors(path / (_shard_name(distributed.rank()) if sharded else "optimizer.safetensors"))
    state: dict = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    distributed.load_optimizer_state(model, optimizer, {"state": state, "param_groups": meta["param_groups"]})
    _set_rng_states(_read_tensors(path / "rng.safetensors"))


def _python_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(data):
    version, internal, gauss = data
    return version, tuple(internal), gauss


# ----------------------------------------------------------------------------- pretrained weights


@dataclass
class Pretrained:
    """A model to start from (``--init-from``) or to run: a fastlm checkpoint or an HF directory."""

    config: ModelConfig
    state_dict: dict | None  # None when only the config was read (pretrained_config)
    tokenizer_path: Path
    eos_token_id: int | None  # from an HF config.json; None: look the end-of-text token up in the tokenizer
    source: str  # "fastlm" or "hf"
    path: Path  # the directory the weights are in

    def load_tokenizer(self):
        """The tokenizer at ``tokenizer_path``; UserError when it cannot be read."""
        from fastlm.train.data import read_tokenizer_file

        if self.source == "fastlm":
            return read_tokenizer(self.path, resume=False)
        try:
            return read_tokenizer_file(self.tokenizer_path)
        except ValueError as exc:
            raise UserError(f"cannot load {self.tokenizer_path} ({exc}); fastlm needs the model's fast tokenizer "
                            "file, as transformers' save_pretrained writes it") from None


def _fastlm_checkpoint_dir(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint directory, else its newest checkpoint if it is a run's --out."""
    if (path / "model.safetensors").is_file() and (path / "trainer_state.json").is_file():
        return path
    return latest(path)


def resolve_pretrained(path, load_weights: bool = True) -> Pretrained:
    """Read a fastlm checkpoint directory, a fastlm-train --out directory (its newest checkpoint) or a
    local Hugging Face model directory (config.json + safetensors of a supported architecture).
    ``load_weights=False`` reads only the configs (cheap). UserError when it is none of these."""
    from fastlm.models import hf_convert

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory; give a fastlm checkpoint, a fastlm-train --out "
                        "directory or a Hugging Face model directory")
    if hf_convert.is_hf_dir(path):
        hf_config = json.loads((path / hf_convert.CONFIG_FILE).read_text())  # is_hf_dir has just read it
        try:
            cfg, state = hf_convert.from_hf(path) if load_weights else (hf_convert.config_from_hf(hf_config), None)
        except (ValueError, FileNotFoundError) as exc:
            raise UserError(f"{path}: {exc}") from None
        if not (path / hf_convert.TOKENIZER_FILE).is_file():
            raise UserError(f"{path}: no {hf_convert.TOKENIZER_FILE} (fastlm needs the fast tokenizer file "
                            "next to the weights)")
        eos = hf_config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        return Pretrained(cfg, state, path / hf_convert.TOKENIZER_FILE, eos if isinstance(eos, int) else None, "hf", path)
    ckpt = _fastlm_checkpoint_dir(path)
    if ckpt is None:
        raise UserError(f"{path}: neither a fastlm checkpoint (model.safetensors + trainer_state.json), a "
                        "fastlm-train --out directory with checkpoints/, nor a Hugging Face model directory "
                        "(config.json with a model_type)")
    saved = read_config(ckpt, sections=("model",), resume=False)
    try:
        cfg = ModelConfig.from_dict(saved["model"])
    except (TypeError, ValueError) as exc:  # maybe a newer fastlm's model config: not called corrupt
        raise UserError(f"{ckpt}: config.json has no valid model section ({exc})") from None
    state = _read_tensors(ckpt / "model.safetensors", resume=False) if load_weights else None
    mismatch = _state_mismatch(cfg, state) if state is not None else ""
    if mismatch:  # --init-from, fastlm-generate, hf_convert: the same one-line error, naming the tensor
        raise UserError(f"{ckpt}: the weights do not match its config ({mismatch})")
    return Pretrained(cfg, state, ckpt / "tokenizer.json", None, "fastlm", ckpt)


def load_pretrained_model(path, dtype: torch.dtype = torch.float32, device=None):
    """(Transformer in eval mode, tokenizers.Tokenizer) from anything ``resolve_pretrained`` reads."""
    from fastlm.models.hf_convert import build_model

    pretrained = resolve_pretrained(path)
    try:
        model = build_model(pretrained.config, pretrained.state_dict, dtype, device)
    except RuntimeError as exc:
        detail = _state_mismatch(pretrained.config, pretrained.state_dict) or _first_line(exc)
        raise UserError(f"{pretrained.path}: the weights do not match its config ({detail})") from None
    return model, pretrained.load_tokenizer()


def _state_mismatch(cfg: ModelConfig, state: dict) -> str:
    """The first missing tensor, unexpected tensor and shape mismatch of ``state`` for a model of ``cfg``
    (those there are, joined by '; '); '' when it fits."""
    from fastlm.models.hf_convert import _expected

    expected = _expected(cfg)
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [name for name in expected if name in state and tuple(state[name].shape) != tuple(expected[name])]
    details = []
    if missing:
        details.append(f"no tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        details.append(f"unexpected tensor {unexpected[0]}" + (f" and {len(unexpected) - 1} more"
                                                              if len(unexpected) > 1 else ""))
    if shapes:
        name = shapes[0]
        details.append(f"{name} has shape {tuple(state[name].shape)}, the config needs {tuple(expected[name])}")
    return "; ".join(details)
