"""Precision rules shared by the model, the loss and the training step.

dino.txt trains its heads in bf16 autocast but keeps what must be exact in fp32: the
contrastive loss, the frozen tokens the head trains on. "At least fp32" keeps float64 as
float64, so the exactness tests (tests/numerics.py) can run the same code in double precision.
"""
from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is of lower precision (bf16, fp16), else unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
