"""Where training metrics go: ``OUT/metrics.jsonl`` always, TensorBoard event files as well when
the ``tensorboard`` package is installed (``tensorboard --logdir OUT/tensorboard``)."""

import json
import math
import sys
from pathlib import Path

import torch

# Dense bf16 tensor-core FLOP/s of the GPUs MFU is reported for (datasheet, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}


def peak_bf16_flops(device: torch.device) -> float | None:
    """The datasheet peak of ``device`` for MFU; None on the CPU and on GPUs not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in PEAK_BF16_FLOPS.items() if gpu in name), None)


def _tensorboard_writer(logdir: Path):
    """A SummaryWriter, or None when tensorboard is not installed (it is an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(logdir))


def _strict(value):
    """``value`` with non-finite floats as None: JSON has no NaN or Infinity, and strict parsers
    (jq, most languages' JSON libraries) reject the tokens Python would write."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` (flushed, so a crash keeps what was
    logged) and mirrors each record's numbers that carry a ``step`` to TensorBoard. ``out=None``:
    this process does not log (a rank other than 0); its records are dropped."""

    def __init__(self, out: Path | None, tensorboard: bool):
        self._jsonl = open(out / "metrics.jsonl", "a") if out is not None else None
        self._tb = _tensorboard_writer(out / "tensorboard") if tensorboard and out is not None else None
        if tensorboard and out is not None and self._tb is None:
            print("fastlm-train: tensorboard is not installed; metrics go to metrics.jsonl only "
                  "(pip install tensorboard for event files)", file=sys.stderr)

    def log(self, record: dict) -> None:
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(_strict(record), allow_nan=False) + "\n")
        self._jsonl.flush()
        if self._tb is None or "step" not in record:
            return
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                # val_* go under val/, the rest under train/, so TensorBoard groups them.
                tag = f"val/{name.removeprefix('val_')}" if name.startswith("val_") else f"train/{name}"
                self._tb.add_scalar(tag, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
