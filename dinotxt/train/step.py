"""The forward pass of one contrastive training step (LiT / dino.txt), shared by the
Lightning system, the feature cache writer and ``bench/train_throughput.py``, so the
benchmark times exactly the code that trains.

The frozen backbone runs under ``torch.inference_mode`` (no autograd bookkeeping at all)
and, optionally, under bf16 autocast (``trainer.backbone_autocast``: fast on CPUs with
AMX / avx512_bf16 and on GPUs, but not bit-exact). A batch carries either images, or
frozen tokens read from the feature cache (``tokens``: every output token; ``pooled``:
``[CLS, pooled patches]`` for a head without blocks), so the cached path skips the
backbone entirely.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from ..precision import at_least_fp32

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def backbone_autocast_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """The autocast dtype of ``trainer.backbone_autocast`` (None = inherit the run's precision)."""
    if name in (None, "", "none", "null"):
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"trainer.backbone_autocast={name!r} is not supported; use bfloat16 or null")
    return AUTOCAST_DTYPES[name]


def frozen_tokens(backbone: torch.nn.Module, images: torch.Tensor, autocast: Optional[str] = None) -> torch.Tensor:
    """Output tokens of the frozen backbone, as an ordinary (at least fp32) tensor the head can train on.

    Args:
        backbone: the ``FrozenBackbone``.
        images: (B, 3, H, W) normalised images.
        autocast: ``None`` (fp32, or whatever autocast the caller runs under) or ``"bfloat16"``.
    """
    dtype = backbone_autocast_dtype(autocast)
    cast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    try:
        with torch.inference_mode(), cast:
            tokens = backbone(images)
    except RuntimeError as e:
        # torch's bf16 flash-attention CPU kernel picks its AMX packing from the hardware but refuses
        # it below the avx512 dispatch level (ATEN_CPU_CAPABILITY=default|avx2 on an AMX machine):
        # the math kernel computes the same attention
        if "pack_vnni2" not in str(e):
            raise
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.inference_mode(), cast, sdpa_kernel([SDPBackend.MATH]):
            tokens = backbone(images)
    # inference tensors cannot be saved for backward: copy outside inference mode (bf16 autocast
    # output becomes fp32; a float64 model, as the exactness tests run, stays float64)
    return tokens.to(torch.promote_types(tokens.dtype, torch.float32), copy=True)


def image_features(model, batch: Dict[str, torch.Tensor], backbone_autocast: Optional[str] = None) -> torch.Tensor:
    """Image embeddings of a batch of images, cached tokens, or cached pooled tokens."""
    if "pooled" in batch:
        return model.vision_head.forward_pooled(at_least_fp32(batch["pooled"]))
    if "tokens" in batch:
        return model.encode_image_tokens(at_least_fp32(batch["tokens"]))
    return model.encode_image_tokens(frozen_tokens(model.backbone, batch["image"], backbone_autocast))


def contrastive_loss(model, loss_fn, batch: Dict[str, torch.Tensor], backbone_autocast: Optional[str] = None) -> torch.Tensor:
    """The global-batch symmetric InfoNCE of one batch (``loss_fn`` gathers across ranks; it takes the
    exponentiated temperature, as ``DinoTxt.forward`` returns it)."""
    return loss_fn(image_features(model, batch, backbone_autocast), model.encode_text(batch["text"]),
                   model.logit_scale.exp())
