"""Precision rules shared by the model, the loss and the training step.

dino.txt trains its heads in bf16 autocast but keeps what must be exact in fp32: the
contrastive loss, the frozen tokens the head trains on. "At least fp32" keeps float64 as
float64, so the exactness tests (tests/numerics.py) can run the same code in double precision.
"""
from __future__ import annotations

from typing import Optional

import torch



def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is of lower precision (bf16, fp16), else unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def backbone_autocast_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype of ``trainer.backbone_autocast`` (None = inherit the run's precision)."""
    if name in (None, "", "none", "null"):
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"trainer.backbone_autocast={name!r} is not supported; use bfloat16 or null")
    return AUTOCAST_DTYPES[name]
