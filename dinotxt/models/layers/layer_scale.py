"""LayerScale (Touvron et al., "Going deeper with Image Transformers", ICCV 2021): a learned
per-channel gain on a residual branch, initialised small (1e-5 in dino.txt's head)."""
from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
