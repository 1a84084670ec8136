"""Command line of ``fastlm-train`` (flags documented in fastlm/train/__init__.py and docs/training.md)."""

import argparse
import sys

import torch

from fastlm.train.config import SECTIONS, UserError, presets, resolve

SHORT_FLAGS = {  # short flag -> the config field it sets
    "data": "data.path", "out": "run.out", "steps": "train.steps", "objective": "train.objective",
    "seed": "train.seed", "stop_at": "run.stop_at", "init_from": "run.init_from", "export_hf": "run.export_hf",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlm-train", allow_abbrev=False,
        description="Pretrain a Transformer with fastlm's fused kernels. With no arguments: the 'tiny' preset on the "
                    "shipped Shakespeare corpus (a few minutes on a laptop CPU).",
        epilog="Any config field can be set as --section.field=value (sections: " + ", ".join(SECTIONS) +
               "); see docs/training.md.",
    )
    p.add_argument("--preset", default="tiny", help=f"base settings: {', '.join(presets())} (default tiny)")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file applied over the preset")
    p.add_argument("--data", metavar="PATH", help="text file, .jsonl or directory (default: the shipped corpus)")
    p.add_argument("--out", metavar="DIR", help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--steps", metavar="N", help="optimizer steps")
    p.add_argument("--objective", choices=("clm", "mlm"), help="causal LM (decoder) or masked LM (encoder)")
    p.add_argument("--seed", metavar="S", help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-at", dest="stop_at", metavar="STEP", help="save and exit after this step")
    p.add_argument("--init-from", dest="init_from", metavar="PATH",
                   help="start from a fastlm checkpoint / run directory or a local Hugging Face model directory")
    p.add_argument("--export-hf", dest="export_hf", metavar="DIR",
                   help="after training, also write the model as a Hugging Face (transformers) directory")
    return p


def parse(argv: list[str]):
    """The resolved Config for a command line."""
    args, rest = _parser().parse_known_args(argv)
    overrides = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UserError(f"unknown argument {arg!r}; use the flags in --help or --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise UserError(f"--{key} needs a value (--{key}=VALUE)")
            i += 1
            value = rest[i]
        overrides.append((key, value))
        i += 1
    for name, dotted in SHORT_FLAGS.items():
        if getattr(args, name) is not None:
            overrides.append((dotted, getattr(args, name)))
    if args.resume:
        overrides.append(("run.resume", "true"))
    return resolve(args.preset, args.config, overrides)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_host_memory() -> bool:
    """Make glibc keep freed host memory for reuse instead of returning it to the OS; True if set.

    A CPU training step frees and reallocates the same activation buffers every step. Under glibc's
    defaults much of that memory goes back to the OS (trimmed, or unmapped when above the mmap
    threshold) and every page of it is faulted in and zeroed again on the next step: ~9k page faults
    per step of the tiny preset, ~15% of its time. The process keeps its peak heap instead, as
    under jemalloc or tcmalloc. Allocations over 32 MiB (glibc's ceiling for the mmap threshold)
    are still mapped per use. A no-op off glibc.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 64 << 20))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def _out_of_memory(exc: Exception) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, or the RuntimeError of torch's CPU allocator."""
    return isinstance(exc, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(exc)


def main(argv: list[str] | None = None) -> int:
    from fastlm.train import distributed
    from fastlm.train.trainer import train

    keep_freed_host_memory()
    try:
        cfg = parse(sys.argv[1:] if argv is None else argv)
        summary = train(cfg)
    except UserError as exc:
        print(f"fastlm-train: error: {exc}", file=sys.stderr)
        return 2
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        print("fastlm-train: error: out of memory; lower --train.batch_size (raising --train.grad_accum keeps the "
              "tokens per step), or set --model.activation_checkpointing=true", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastlm-train: interrupted before a checkpoint could be written", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return summary["exit_code"]
