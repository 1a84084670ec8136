"""Argument checks the public ops share: errors name the argument, the expected and the actual."""

import torch


def check_like(fn: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` must have ``ref``'s shape, dtype and device (ValueError / TypeError otherwise)."""
    if t.shape != ref.shape:
        raise ValueError(f"{fn}: {name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref.device}")
