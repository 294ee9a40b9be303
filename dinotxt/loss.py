"""Symmetric InfoNCE over the global batch (CLIP / LiT / dino.txt).

``logits = logit_scale * norm(img) @ norm(txt).T``;
``loss = (CE(img -> txt) + CE(txt -> img)) / 2``, computed in fp32.

Temperature convention (open_clip's, so ``ClipLoss()(**model(images, ids))`` is right):
the model stores the LOG temperature ``DinoTxt.logit_scale`` (a parameter, clamped to
[0, ln 100]); ``DinoTxt.forward`` returns its exponential under the key ``logit_scale``,
and the loss takes that exponentiated multiplier as it is.

fp32 means fp32 under any autocast: the features are upcast and autocast is switched off
inside the loss, otherwise a bf16 autocast region would hand bf16 logits (an 8-bit
mantissa, errors of ~0.3 at scale 100) to the cross-entropy. Inputs of higher precision
(float64) stay in their precision.

Under DDP the features of all ranks are gathered WITH gradients (the distributed
gather lives in a free function, as in open_clip); each rank then computes the rows
of the global loss that belong to its own samples against all samples of the global
batch. Averaging the rank losses (as DDP averages gradients) gives exactly the
single-process loss on the global batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .precision import at_least_fp32


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


def distributed_world() -> Tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-gather features from every rank, keeping the autograd graph (rank order).
    Every rank must hold the same number of rows (the loaders drop nothing unevenly:
    each rank yields full batches)."""
    if distributed_world()[1] == 1:
        return image_features, text_features
    return _AllGatherWithGrad.apply(image_features), _AllGatherWithGrad.apply(text_features)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rank: int = 0, all_image_features: Optional[torch.Tensor] = None,
              all_text_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local rows of the global symmetric InfoNCE, in fp32 (or float64 for float64 inputs)
    whatever autocast is active. Features are L2-normalised here.

    Args:
        image_features, text_features: this rank's (B, E) features, paired row by row.
        logit_scale: the EXPONENTIATED temperature, the multiplier of the cosines (open_clip's
            convention; ``DinoTxt.forward`` returns it): ``model.logit_scale.exp()``, at most 100.
        rank: index of this rank's block inside the gathered features.
        all_image_features, all_text_features: the gathered global features (defaults to local).
    """
    with torch.autocast(image_features.device.type, enabled=False):
        img = F.normalize(at_least_fp32(image_features), dim=-1)
        txt = F.normalize(at_least_fp32(text_features), dim=-1)
        all_img = img if all_image_features is None else F.normalize(at_least_fp32(all_image_features), dim=-1)
        all_txt = txt if all_text_features is None else F.normalize(at_least_fp32(all_text_features), dim=-1)
        scale = logit_scale.to(img.dtype)
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        logits_per_image = scale * img @ all_txt.t()
        logits_per_text = scale * txt @ all_img.t()
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipLoss(nn.Module):
    """Global-batch symmetric InfoNCE; works in one process or under torch.distributed.

    ``forward(image_features, text_features, logit_scale)`` takes the exponentiated scale,
    as open_clip's ``ClipLoss`` does, so ``ClipLoss()(**model(images, ids))`` is the
    training loss of a ``DinoTxt``.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        rank, world = distributed_world()
        if world == 1:
            return clip_loss(image_features, text_features, logit_scale)
        all_img, all_txt = gather_features(image_features, text_features)
        return clip_loss(image_features, text_features, logit_scale, rank, all_img, all_txt)
