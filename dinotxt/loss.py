"""Symmetric InfoNCE over the global batch (CLIP / LiT / dino.txt).

``logits = exp(logit_scale) * norm(img) @ norm(txt).T``;
``loss = (CE(img -> txt) + CE(txt -> img)) / 2``, computed in fp32.

Under DDP the features of all ranks are gathered WITH gradients (the distributed
gather lives in a free function, as in open_clip); each rank then computes the rows
of the global loss that belong to its own samples against all samples of the global
batch. Averaging the rank losses (as DDP averages gradients) gives exactly the
single-process loss on the global batch.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized tensors of all ranks; the backward pass sums the incoming
    gradients over ranks and hands each rank the slice of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-gather features from every rank, keeping the autograd graph (rank order).
    Every rank must hold the same number of rows (the loaders drop nothing unevenly:
    each rank yields full batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features
    return _AllGatherWithGrad.apply(image_features), _AllGatherWithGrad.apply(text_features)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rank: int = 0, all_image_features: torch.Tensor = None, all_text_features: torch.Tensor = None) -> torch.Tensor:
    """Local rows of the global symmetric InfoNCE. Features are L2-normalised here.

    Args:
        image_features, text_features: this rank's (B, E) features, paired row by row.
        logit_scale: the log temperature (a scalar tensor); exp() is applied here.
        rank: index of this rank's block inside the gathered features.
        all_image_features, all_text_features: the gathered global features (defaults to local).
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    all_img = img if all_image_features is None else F.normalize(all_image_features.float(), dim=-1)
    all_txt = txt if all_text_features is None else F.normalize(all_text_features.float(), dim=-1)
    scale = logit_scale.float().exp()
    labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    logits_per_image = scale * img @ all_txt.t()
    logits_per_text = scale * txt @ all_img.t()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipLoss(nn.Module):
    """Global-batch symmetric InfoNCE; works in one process or under torch.distributed."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed:
            return clip_loss(image_features, text_features, logit_scale)
        all_img, all_txt = gather_features(image_features, text_features)
        return clip_loss(image_features, text_features, logit_scale, dist.get_rank(), all_img, all_txt)
