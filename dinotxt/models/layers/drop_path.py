"""Stochastic depth (Huang et al., ECCV 2016) on a residual branch, in the two forms DINOv2 / DINOv3
use (``dinov2/layers/block.py``, ``dinov3/layers/block.py``).

- ``batch_subset`` (the official form for the dino.txt head): the branch is computed only on
  ``floor((1 - p) B)`` randomly chosen samples of the batch (at least one) and added back to
  those rows scaled by ``B / floor((1 - p) B)``; the other rows skip it. The expectation is the
  plain residual, and about a fraction ``p`` of the branch's compute is saved.
- ``per_sample``: the branch runs on every sample, and each sample's output is zeroed with
  probability ``p`` (the kept ones scaled by ``1 / (1 - p)``): the same expectation, no saving.

Both draw from torch's global RNG (the training step reseeds it every step, so a resumed run
draws the same subsets), and are the plain residual in eval mode.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

MODES = ("batch_subset", "per_sample")


class DropPath(nn.Module):
    """Per-sample stochastic depth of a branch output (the ``per_sample`` form)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def subset_size(batch: int, p: float) -> int:
    """Samples whose branch is computed: ``max(floor((1 - p) B), 1)``, as the official code."""
    return max(int(batch * (1 - p)), 1)


def batch_subset_residual(x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor], p: float) -> torch.Tensor:
    """``x + branch(x)`` with the branch on a random subset of ``subset_size(B, p)`` rows, scaled up."""
    b = x.shape[0]
    keep = subset_size(b, p)
    rows = torch.randperm(b, device=x.device)[:keep]
    residual = branch(x[rows])
    return torch.index_add(x.flatten(1), 0, rows, residual.to(x.dtype).flatten(1), alpha=b / keep).view_as(x)


class StochasticResidual(nn.Module):
    """``x + branch(x)`` with stochastic depth ``p`` in ``mode`` (``batch_subset`` or ``per_sample``)."""

    def __init__(self, p: float = 0.0, mode: str = "batch_subset"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown drop path mode '{mode}' (use {' or '.join(MODES)})")
        self.p, self.mode = float(p), mode
        self.drop = DropPath(self.p)

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x + branch(x)
        if self.mode == "batch_subset":
            return batch_subset_residual(x, branch, self.p)
        return x + self.drop(branch(x))
