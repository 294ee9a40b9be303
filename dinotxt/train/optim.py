"""AdamW with no-decay groups and a per-step warmup + cosine schedule (METHOD.md section 3)."""
from __future__ import annotations

import logging
import math
from typing import Iterable, List, Tuple

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
                    max_steps: int, min_lr_ratio: float = 0.0):
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup_steps, max_steps, min_lr_ratio))
    return opt, sched
