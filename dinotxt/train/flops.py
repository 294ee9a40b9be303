"""FLOPs of one training step and model FLOPs utilisation (MFU).

MFU follows the PaLM convention (Chowdhery et al. 2022, appendix B): the matmul FLOPs
(2 per multiply-add) the model needs per step, divided by step time and the hardware's
dense peak. For dino.txt / LiT that is the frozen backbone's forward pass only (it never
runs backward), and forward + backward (= 3x forward) of the trainable head and text
tower, plus the loss logits; unlocked backbone blocks (``trainable_blocks``) count 3x too (a
ViT block starts with a LayerNorm whose weights train, so every matmul after it needs its input
gradient: 3x is exact). With batch-subset stochastic depth in the head (the official form),
its branches run on floor((1-p)B) rows and are counted so. Recompute for activation checkpointing is not model work
and is not counted. Attention is counted over the full score matrix (also when causal),
as ``torch.utils.flop_counter`` does; the text tower is counted at the length it really
runs at after padding is trimmed. Sizes are read from the modules themselves, so any
backbone with timm-style ``blocks`` and any head / text configuration is counted.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..models.layers import subset_size

# dense bf16 peak in TFLOP/s by device name (first match wins; order matters)
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2),
]


def linear_flops(module: nn.Module, tokens: int) -> int:
    """Matmul FLOPs of every ``nn.Linear`` inside ``module`` applied to ``tokens`` tokens."""
    return 2 * tokens * sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(tokens: int, width: int) -> int:
    """``q @ k^T`` and ``scores @ v`` over the full ``tokens x tokens`` matrix, all heads."""
    return 2 * 2 * tokens * tokens * width


def block_forward_flops(block: nn.Module, tokens: int, width: int) -> int:
    return linear_flops(block, tokens) + attention_flops(tokens, width)


def backbone_forward_flops(backbone, num_tokens: int) -> int:
    """Forward FLOPs of the frozen backbone for one image producing ``num_tokens`` tokens."""
    encoder = backbone.encoder
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:  # an encoder without timm-style blocks: its linear layers only
        return linear_flops(encoder, num_tokens)
    flops = sum(block_forward_flops(b, num_tokens, backbone.embed_dim) for b in blocks)
    proj = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d):
        flops += 2 * (num_tokens - backbone.num_prefix_tokens) * proj.weight.numel()
    return flops


def train_step_flops(model, batch_size: int, num_tokens: int, text_len: int, global_batch: Optional[int] = None,
                     cached: bool = False, gram_patches: int = 0) -> Dict[str, int]:
    """FLOPs of one training step of ``model`` (a ``DinoTxt``) on one process.

    Args:
        batch_size: images (and captions) on this process.
        num_tokens: frozen tokens per image (1 + registers + patches).
        text_len: token columns the text tower runs (after ``trim_padding``).
        global_batch: contrastive batch over all ranks (default: ``batch_size``).
        cached: the backbone's tokens come from the feature cache (no backbone FLOPs).
        gram_patches: patch positions of the Gram loss per step (``loss.gram``; 0: off).
    Returns:
        ``{"backbone", "head", "text", "loss", "total"}`` FLOPs (the Gram loss counted in ``loss``).
    """
    global_batch = global_batch or batch_size
    head = model.vision_head
    head_fwd = sum(block_forward_flops(b, num_tokens, head.dim) for b in head.block_list)
    if getattr(head, "has_projection", False):  # the linear projection of the [CLS] and patch tokens (not the registers)
        proj_tokens = 2 if num_tokens <= 2 else num_tokens - head.num_prefix_tokens + 1  # 2: pooled [CLS, mean]
        head_fwd += linear_flops(head.linear_projection, proj_tokens)
    # batch-subset stochastic depth (the official head) computes each branch on floor((1-p)B) rows only
    head_rows = batch_size
    if head.training and head.drop_path > 0 and head.drop_path_mode == "batch_subset" and len(head.block_list):
        head_rows = subset_size(batch_size, head.drop_path)
    text = model.text
    if hasattr(text, "encoder"):  # a pretrained transformers encoder: its linear layers and attention matmuls
        text_fwd = linear_flops(text.encoder, text_len) + text.depth * attention_flops(text_len, text.width)
        text_fwd += linear_flops(text.projection, 1)
    else:
        width = text.backbone.positional_embedding.shape[1]
        text_fwd = sum(block_forward_flops(b, text_len, width) for b in text.backbone.blocks)
        text_fwd += linear_flops(text.head, 1)  # projection of the EOT token only
    embed = model.embed_dim
    loss_fwd = 2 * 2 * batch_size * global_batch * embed  # image->text and text->image logits
    if gram_patches:
        from .gram import gram_flops

        loss_fwd += gram_flops(batch_size, gram_patches, getattr(head, "token_dim", head.dim), model.backbone.embed_dim)
    backbone = 0 if cached else batch_size * backbone_forward_flops(model.backbone, num_tokens)
    unlocked = int(getattr(model.backbone, "trainable_blocks", 0) or 0)
    blocks = getattr(model.backbone.encoder, "blocks", None)
    if unlocked and blocks is not None and not cached:  # unlocked blocks also run backward (2x their forward)
        backbone += 2 * batch_size * sum(block_forward_flops(b, num_tokens, model.backbone.embed_dim)
                                         for b in list(blocks)[-unlocked:])
    out = {
        "backbone": backbone,
        "head": 3 * head_rows * head_fwd,
        "text": 3 * batch_size * text_fwd,
        "loss": 3 * loss_fwd,
    }
    out["total"] = sum(out.values())
    return out


def peak_bf16_flops(device: Optional[torch.device] = None) -> Optional[float]:
    """Dense bf16 peak FLOP/s of a known CUDA GPU, or None (unknown device, or CPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
    return flops_per_step / seconds_per_step / peak_flops
