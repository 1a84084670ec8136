"""``Linear``: ``nn.Linear`` (same parameters, init and state_dict keys) whose matmuls run fastlm's ``gemm``."""

import torch
from torch import nn

from fastlm.ops.gemm import linear


class Linear(nn.Linear):
    """A drop-in ``nn.Linear``: on CPU its float32 matmuls, forward and backward, run oneDNN (see
    ``fastlm.ops.gemm``); on CUDA it is ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
