"""SwiGLU feed-forward (Shazeer, "GLU Variants Improve Transformer", 2020), as dino.txt's head has it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0, multiple: int = 64) -> int:
    """int(dim * mlp_ratio * 2/3) rounded up to a multiple of 64 (2752 for dim 1024)."""
    hidden = int(dim * mlp_ratio * 2 / 3)
    return multiple * math.ceil(hidden / multiple)


class SwiGLU(nn.Module):
    """``w3(silu(w1 x) * w2 x)`` with biases (official key names w1, w2, w3)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))
