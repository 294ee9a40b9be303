"""The forward pass of one contrastive training step (LiT / dino.txt), shared by the
Lightning system, the feature cache writer and ``bench/train_throughput.py``, so the
benchmark times exactly the code that trains.

The frozen backbone runs under ``torch.inference_mode`` (no autograd bookkeeping at all; a backbone
with unlocked blocks keeps the graph of those)
and, optionally, under bf16 autocast (``trainer.backbone_autocast``: fast on CPUs with
AMX / avx512_bf16 and on GPUs, but not bit-exact). A batch carries either images, or
frozen tokens read from the feature cache (``tokens``: every output token; ``pooled``:
``[CLS, pooled patches]`` for a head without blocks), so the cached path skips the
backbone entirely.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from ..models.backbone import frozen_tokens
from ..utils.precision import at_least_fp32


def image_features(model, batch: Dict[str, torch.Tensor], backbone_autocast: Optional[str] = None) -> torch.Tensor:
    """Image embeddings of a batch of images, cached tokens, or cached pooled tokens."""
    if "pooled" in batch:
        return model.vision_head.forward_pooled(at_least_fp32(batch["pooled"]))
    if "tokens" in batch:
        return model.encode_image_tokens(at_least_fp32(batch["tokens"]))
    return model.encode_image_tokens(frozen_tokens(model.backbone, batch["image"], backbone_autocast))


def contrastive_loss(model, loss_fn, batch: Dict[str, torch.Tensor], backbone_autocast: Optional[str] = None) -> torch.Tensor:
    """The global-batch contrastive loss of one batch (``loss_fn`` gathers across ranks; it takes the
    exponentiated temperature, as ``DinoTxt.forward`` returns it, and the model's logit bias, if any)."""
    return loss_fn(image_features(model, batch, backbone_autocast), model.encode_text(batch["text"]),
                   model.logit_scale.exp(), getattr(model, "logit_bias", None))


def contrastive_and_gram_loss(model, loss_fn, batch: Dict[str, torch.Tensor], gram,
                              backbone_autocast: Optional[str] = None):
    """``(total loss, gram loss)``: the contrastive loss plus ``gram.weight`` x the Gram loss of the head's
    output patch tokens against the frozen backbone's (``dinotxt.train.gram``), from one head forward pass."""
    from .gram import gram_loss, gram_subset

    if "pooled" in batch:
        raise ValueError("loss.gram needs every patch token: a pooled feature cache has none (cache.tokens=all)")
    tokens = at_least_fp32(batch["tokens"]) if "tokens" in batch else \
        frozen_tokens(model.backbone, batch["image"], backbone_autocast)
    head = model.vision_head
    cls, patches = head.forward_tokens(tokens)
    image = head.embed(cls, patches)
    frozen = tokens[:, head.num_prefix_tokens:]
    subset = gram_subset(frozen.shape[1], float(gram.patch_sampling_rate), device=frozen.device)
    extra = gram_loss(patches, frozen, subset, bool(gram.normalize_patch_tokens))
    contrastive = loss_fn(image, model.encode_text(batch["text"]), model.logit_scale.exp(),
                          getattr(model, "logit_bias", None))
    return contrastive + float(gram.weight) * extra, extra
