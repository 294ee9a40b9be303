"""Stochastic depth (Huang et al., ECCV 2016) on a residual branch."""
from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Per-sample: each sample's branch output is zeroed with probability ``p`` and the kept ones
    are scaled by 1 / (1 - p), so the expectation is the plain branch. Inactive in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep
