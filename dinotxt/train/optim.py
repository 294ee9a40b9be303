"""AdamW with no-decay groups and a per-step warmup + cosine schedule (METHOD.md section 3)."""
from __future__ import annotations

import logging
import math
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(named_params: Iterable[Tuple[str, nn.Parameter]], weight_decay: float, verbose: bool = True) -> List[dict]:
    """Decay >=2-D weights; no decay for 1-D params (norms, LayerScale), biases and logit_scale."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    if verbose:
        n_d, n_nd = sum(p.numel() for p in decay), sum(p.numel() for p in no_decay)
        log.info(f"optimizer: {len(decay)} tensors ({n_d:,} params) with weight decay, "
              f"{len(no_decay)} tensors ({n_nd:,} params) without")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float = 0.0):
    """LR multiplier per step: linear warmup from 0 at step 0 (as the official trainer) to 1 at
    ``warmup_steps``, then cosine to ``min_ratio`` at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, eps: float, warmup_steps: int,
                    max_steps: int, min_lr_ratio: float = 0.0, backbone_lr: Optional[float] = None):
    """AdamW over the trainable parameters, and its warmup-cosine schedule. Unlocked backbone blocks
    (``backbone.*`` parameters that train) get groups of their own with peak lr ``backbone_lr`` (None:
    ``lr``); every group follows the same schedule (LambdaLR scales each group's own peak)."""
    named = list(model.named_parameters())
    head = [(n, p) for n, p in named if not n.startswith("backbone.")]
    unlocked = [(n, p) for n, p in named if n.startswith("backbone.") and p.requires_grad]
    groups = param_groups(head, weight_decay)
    if unlocked:
        backbone_groups = param_groups(unlocked, weight_decay, verbose=False)
        peak = lr if backbone_lr is None else float(backbone_lr)
        for g in backbone_groups:
            g["lr"] = peak
        groups += [g for g in backbone_groups if g["params"]]
        log.info(f"optimizer: {sum(p.numel() for _, p in unlocked):,} unlocked backbone params at peak lr {peak:g}")
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, max_steps, min_lr_ratio))
    return opt, sched
