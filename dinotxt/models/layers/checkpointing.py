"""Activation checkpointing of one transformer block, full or selective.

``full`` recomputes the whole block in the backward pass (least memory). ``selective`` is the official
trainer's policy (dinov3/eval/text/ac_comp_parallelize.py): the outputs of the expensive ops (matrix
products, attention kernels) are SAVED and only the cheap rest (norms, activations, adds) is recomputed,
most of the memory saving at a fraction of the recompute. Both are exact: the same forward, the same
gradients (the random state of dropout / drop path is replayed).
"""
from __future__ import annotations

from contextlib import suppress
from functools import partial
from typing import Callable, List, Optional

import torch
from torch import nn

MODES = ("full", "selective")


def saved_ops() -> List:
    """The ops whose outputs the selective policy keeps (matmuls and the attention kernels of every backend)."""
    ops = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default]
    for name in ("_scaled_mm", "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"):
        with suppress(AttributeError):  # an op this torch build lacks
            ops.append(getattr(torch.ops.aten, name).default)
    return ops


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(saved_ops())


def run_block(block: nn.Module, x: torch.Tensor, mode: Optional[str]) -> torch.Tensor:
    """``block(x)``, under activation checkpointing when ``mode`` is ``full`` / ``selective`` (or True = full)."""
    if not mode:
        return block(x)
    if mode is True or mode == "full":
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    if mode != "selective":
        raise ValueError(f"activation checkpointing '{mode}' is not one of {', '.join(MODES)}")
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=_selective_context)


__all__ = ["MODES", "run_block", "saved_ops"]
