"""Frozen vision encoder wrapper (dino.txt / LiT: the image tower never trains).

``FrozenBackbone`` owns freezing so nothing else has to remember it: eval mode is
pinned (``train(True)`` is ignored, including the call Lightning makes after
validation), parameters have ``requires_grad=False``, the forward pass runs under
``torch.no_grad()``, and the weights are excluded from ``DinoTxt`` checkpoints.

Output: the last block's tokens after the final LayerNorm, ordered
``[CLS, registers x R, patches x N]`` (timm's ``forward_features`` for DINOv2 and
DINOv3 ViTs). The reference is timm's ``vit_*_patch14[_reg4]_dinov2`` which equals
the official DINOv2 models.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn


def load_state_dict_file(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a .safetensors / .pth / .pt file as a flat tensor dict (never unpickles objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights file {path} as a torch state dict: {str(e).splitlines()[0]}") from None
    for wrapper in ("model", "state_dict", "teacher"):  # common wrappers around the weights
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"cannot import backbone factory module '{module_name}' from '{spec}': {e}") from None
    if not hasattr(module, attr):
        raise ImportError(f"module '{module_name}' has no attribute '{attr}' (backbone spec '{spec}')")
    return getattr(module, attr)


class FrozenBackbone(nn.Module):
    """A frozen ViT returning ``[CLS, registers, patches]`` tokens.

    Args:
        name: timm model name (e.g. ``vit_large_patch14_reg4_dinov2``) or an import path
            ``package.module:factory`` whose factory returns an ``nn.Module``.
        weights: optional local weights file, official DINOv2/DINOv3 or timm layout.
        img_size: resolution the position embeddings are stored at; other multiples of
            the patch size also work (position embeddings are interpolated on the fly).
        module: an already built ``nn.Module`` (takes precedence over ``name``). It must map
            images to tokens and expose ``embed_dim``, ``patch_size`` and either
            ``num_prefix_tokens`` or ``num_register_tokens``.
        **kwargs: extra constructor arguments (timm overrides such as ``depth``).
    """

    def __init__(
        self,
        name: str = "vit_large_patch14_reg4_dinov2",
        weights: Optional[str] = None,
        img_size: int = 224,
        module: Optional[nn.Module] = None,
        **kwargs: Any,
    ):
        super().__init__()
        self.name = name
        self.is_timm = False
        if module is not None:
            encoder = module
        elif ":" in name:
            encoder = _import_factory(name)(**kwargs)
        else:
            import timm

            try:
                encoder = timm.create_model(
                    name, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=True, **kwargs
                )
            except RuntimeError as e:
                raise ValueError(f"unknown timm backbone '{name}': {e}") from None
            self.is_timm = True
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"backbone '{name}' did not build an nn.Module (got {type(encoder).__name__})")
        self.encoder = encoder
        self.embed_dim = int(getattr(encoder, "embed_dim", getattr(encoder, "num_features", 0)))
        patch = getattr(encoder, "patch_size", None)
        if patch is None and hasattr(encoder, "patch_embed"):
            patch = encoder.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 0)
        if hasattr(encoder, "num_prefix_tokens"):
            self.num_prefix_tokens = int(encoder.num_prefix_tokens)
        elif hasattr(encoder, "num_register_tokens"):
            self.num_prefix_tokens = 1 + int(encoder.num_register_tokens)
        else:
            raise ValueError(
                f"backbone '{name}' must expose num_prefix_tokens or num_register_tokens so the "
                "[CLS, registers, patches] split is known"
            )
        if not self.embed_dim or not self.patch_size:
            raise ValueError(f"backbone '{name}' must expose embed_dim and patch_size")
        if weights:
            self.load_weights(weights)
        self.requires_grad_(False)
        super().train(False)

    @property
    def num_register_tokens(self) -> int:
        return self.num_prefix_tokens - 1

    def load_weights(self, path: Union[str, Path]) -> None:
        """Load a local file strictly, converting official DINOv2/DINOv3 layouts through timm's filter."""
        state = load_state_dict_file(path)
        if self.is_timm:
            filter_fn = getattr(sys.modules[type(self.encoder).__module__], "checkpoint_filter_fn", None)
            if filter_fn is not None:
                state = filter_fn(state, self.encoder)
        own = self.encoder.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})")
            raise ValueError(f"weights {path} do not fit backbone '{self.name}': " + "; ".join(parts))
        self.encoder.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Pinned: the backbone never leaves eval mode (no dropout / drop-path, fixed norms).
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.encoder, "forward_features"):
            tokens = self.encoder.forward_features(images)
        else:
            tokens = self.encoder(images)
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"backbone returned {tuple(tokens.shape)}; expected (B, 1+R+N, {self.embed_dim}) tokens")
        return tokens

    def split_tokens(self, tokens: torch.Tensor):
        """(cls (B,D), registers (B,R,D), patches (B,N,D))."""
        p = self.num_prefix_tokens
        return tokens[:, 0], tokens[:, 1:p], tokens[:, p:]
