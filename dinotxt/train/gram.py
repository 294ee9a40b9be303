"""The Gram loss of the official trainer (dinov3/eval/text/gram_loss.py; ``loss.gram``): keep the patch
tokens the vision head outputs as similar to each other as the frozen backbone's patch tokens are.

Per image, on ONE random subset of ``patch_sampling_rate`` x N patch positions drawn per step (the same
positions for every image of the batch), the Gram matrices of the head's output patch tokens and of the
frozen backbone's (final-normed) patch tokens, each row L2-normalised when ``normalize_patch_tokens``, and
the mean squared difference of the two over every entry of the batch's (B, n, n) matrices; added to the
contrastive loss with ``weight``. Off by default, as in the released configuration.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gram_subset(num_patches: int, rate: float, device=None, generator=None) -> torch.Tensor:
    """The patch positions of this step: a random permutation's first ``int(num_patches * rate)``."""
    return torch.randperm(num_patches, generator=generator, device=device)[: int(num_patches * rate)]


def gram_loss(head_patches: torch.Tensor, backbone_patches: torch.Tensor, subset: torch.Tensor,
              normalize: bool = True) -> torch.Tensor:
    """MSE between the (B, n, n) Gram matrices of the head's and the backbone's patch tokens (B, N, D) at
    ``subset``; the backbone side carries no gradient (it is frozen)."""
    if head_patches.shape[:2] != backbone_patches.shape[:2]:
        raise ValueError(f"head patch tokens {tuple(head_patches.shape)} and backbone patch tokens "
                         f"{tuple(backbone_patches.shape)} differ in batch or patch count")
    head, frozen = head_patches[:, subset].float(), backbone_patches[:, subset].detach().float()
    if normalize:
        head, frozen = F.normalize(head, dim=-1), F.normalize(frozen, dim=-1)
    return F.mse_loss(head @ head.transpose(-2, -1), frozen @ frozen.transpose(-2, -1))


def gram_flops(batch_size: int, subset: int, head_width: int, backbone_width: int) -> int:
    """Forward FLOPs of the two Gram matrices and their difference (x3 with the backward pass: the caller)."""
    return batch_size * (2 * subset * subset * (head_width + backbone_width) + 3 * subset * subset)


__all__ = ["gram_subset", "gram_loss", "gram_flops"]
