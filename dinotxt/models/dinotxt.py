"""The aligned model: frozen backbone + trainable vision head + text tower.

``DinoTxt`` exposes the interface the CLIP ecosystem plugs into (open_clip's
``encode_image`` / ``encode_text(normalize=...)`` / ``get_logits``), plus
``encode_patches`` for dense prediction, which pairs the head patch tokens with the
second half ``text[:, D:]`` of the text embedding (dino.txt, section 4 of METHOD.md).
``forward`` is inference only; the loss lives in ``dinotxt.train.loss``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import FrozenBackbone
from .weights import key_report
from .text_tower import TextTower
from .vision_head import VisionHead


UNLOCKED_PREFIX = "unlocked_backbone."  # checkpoint keys of the unlocked backbone blocks


class DinoTxt(nn.Module):
    """Args:
        backbone: the frozen encoder.
        vision_head: trainable head over its tokens.
        text: text tower whose output width equals ``vision_head.output_dim``.
        init_logit_scale: initial log temperature (ln(1/0.07)).
        max_logit_scale: upper clamp of the log temperature (ln 100).
        init_logit_bias: None (the InfoNCE's model: no bias), or the initial value of a learnable bias
            ``logit_bias`` added to every logit (the sigmoid loss of SigLIP; it starts at -10).
    """

    def __init__(self, backbone: FrozenBackbone, vision_head: VisionHead, text: TextTower,
                 init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = math.log(100.0),
                 init_logit_bias: Optional[float] = None):
        super().__init__()
        if text.output_dim != vision_head.output_dim:
            raise ValueError(f"text output_dim {text.output_dim} != image embedding dim {vision_head.output_dim}")
        self.backbone = backbone
        self.vision_head = vision_head
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.init_logit_scale = float(init_logit_scale)
        self.max_logit_scale = float(max_logit_scale)
        self.init_logit_bias = None if init_logit_bias is None else float(init_logit_bias)
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.arch = ""  # the registry entry it was built from (informational; set by create_model)
        self.zeroshot = {"image_size": None, "crop_fraction": 0.875}  # its evaluation transform (config zeroshot)

    @property
    def config(self):
        """The resolved ``ModelConfig`` that rebuilds this model, read off its modules, so a model
        assembled by hand saves and loads like one from ``create_model``. Raises ValueError when
        the backbone cannot be rebuilt from a config (a ready module, or weights given as a dict)."""
        from omegaconf import OmegaConf

        from ..config import ModelConfig

        return OmegaConf.merge(OmegaConf.structured(ModelConfig), {
            "arch": self.arch, "backbone": self.backbone.config_dict(), "vision_head": self.vision_head.config_dict(),
            "text": self.text.config_dict(), "init_logit_scale": self.init_logit_scale,
            "max_logit_scale": self.max_logit_scale, "init_logit_bias": self.init_logit_bias,
            "zeroshot": dict(self.zeroshot)})

    @property
    def embed_dim(self) -> int:
        return self.vision_head.output_dim

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    # ------------------------------------------------------------------ encoders
    def encode_image_tokens(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embedding from precomputed frozen tokens (the cached-feature path)."""
        x = self.vision_head(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.encode_image_tokens(self.backbone(images), normalize)

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.text(ids)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_patches(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Dense head patch tokens (B, h, w, P) (P = D, or the projection's width), to be compared with
        ``dense_text(text)``."""
        tokens = self.backbone(images)
        _, patches = self.vision_head.forward_tokens(tokens)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = patches.reshape(patches.shape[0], h, w, -1)
        return F.normalize(patches, dim=-1) if normalize else patches

    def dense_text(self, text_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The half of the text embedding aligned with the patch tokens: ``text[:, P:]`` (P = D, or the
        head projection's width)."""
        x = text_features[..., self.vision_head.token_dim:]
        return F.normalize(x, dim=-1) if normalize else x

    # ------------------------------------------------------------------ scoring
    def clamp_logit_scale_(self) -> None:
        """Keep the log temperature in [0, ln 100]; called after every optimizer step."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_logit_scale)

    def get_logits(self, images: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(ids, normalize=True)
        logits = self.logit_scale.exp() * img @ txt.t()
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits, logits.t()

    def forward(self, images: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        out = {"logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if ids is not None:
            out["text_features"] = self.encode_text(ids, normalize=True)
        return out

    # ------------------------------------------------------------------ weights
    def trainable_state_dict(self, state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """Everything except the frozen backbone (what checkpoints hold); unlocked backbone blocks
        (``trainable_blocks``) under ``unlocked_backbone.`` (never ``backbone.``, the prefix of a whole
        backbone carried in a single file). ``state``: read from this full state dict of the model instead of
        its own (a model sharded by FSDP2 holds shards)."""
        out = {}
        for k, v in (self.state_dict() if state is None else state).items():
            if not k.startswith("backbone."):
                out[k] = v
            elif self.backbone.is_unlocked(k[len("backbone."):]):
                out[UNLOCKED_PREFIX + k[len("backbone."):]] = v
        return out

    def variant_keys(self) -> Set[str]:
        """The keys of ``trainable_state_dict()`` that only a training variant has: the sigmoid loss's
        ``logit_bias`` and the unlocked backbone blocks. A checkpoint of the plain recipe (ours or the
        official release) lacks them."""
        return {k for k in self.trainable_state_dict() if k == "logit_bias" or k.startswith(UNLOCKED_PREFIX)}

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor], keep_variants: bool = False) -> None:
        """Load what checkpoints hold (everything but the backbone) strictly; a mismatch names the keys.
        ``keep_variants``: the ``variant_keys()`` that ``state`` lacks keep this model's own values (a
        variant started from a plain checkpoint: the bias at its init, unlocked blocks at the backbone's
        pretrained weights); any other missing key is still an error."""
        # checkpoints written before the head attribute was named after its config section call it "visual"
        state = {("vision_head." + k[len("visual."):] if k.startswith("visual.") else k): v for k, v in state.items()}
        if keep_variants:
            own = self.trainable_state_dict()
            state = {**{k: own[k] for k in self.variant_keys() if k not in state}, **state}
        report = key_report(self.trainable_state_dict(), state)
        if report:
            hint = ""
            if UNLOCKED_PREFIX in report:
                hint = (f"; the model unlocks {self.backbone.trainable_blocks} backbone block(s): "
                        "model.backbone.trainable_blocks must match the checkpoint's")
            raise ValueError(f"checkpoint does not fit this model config: {report}{hint}")
        state = {("backbone." + k[len(UNLOCKED_PREFIX):] if k.startswith(UNLOCKED_PREFIX) else k): v
                 for k, v in state.items()}
        self.load_state_dict({**self.backbone_state(), **state}, strict=True)

    def backbone_state(self) -> Dict[str, torch.Tensor]:
        """The frozen backbone's weights (unlocked blocks excluded), keys as in ``state_dict()``."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith("backbone.") and not self.backbone.is_unlocked(k[len("backbone."):])}

    def trainable_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)
