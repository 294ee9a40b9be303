"""Build a ``DinoTxt`` from a registered architecture name or a ModelConfig."""
from __future__ import annotations

from typing import Any, Optional, Union

from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import model_config, resolve_model_dims
from .backbone import FrozenBackbone
from .dinotxt import DinoTxt
from .text_tower import TextTower
from .vision_head import VisionHead


def create_model(arch: Union[str, DictConfig, dict], backbone_module: Optional[nn.Module] = None,
                 trust_code: bool = False, frozen_backbone: Optional[FrozenBackbone] = None, **overrides: Any) -> DinoTxt:
    """Create a model from a registry name (see ``list_models()``) or a config.

    ``overrides`` are nested dicts merged over the config (e.g. ``text={"depth": 2}``).
    ``backbone_module`` plugs in a user encoder instead of building one by name.
    ``trust_code`` allows ``backbone.name`` to be an import path ``package.module:factory``.
    ``frozen_backbone``: the config's frozen backbone, already built (``create_backbone``), used as it is.
    """
    if isinstance(arch, str):
        cfg = model_config(arch, overrides or None)
    else:
        cfg = model_config_from(arch)
        if overrides:
            cfg = OmegaConf.merge(cfg, overrides)
    backbone = frozen_backbone
    if backbone is None:
        backbone = create_backbone(cfg.backbone, backbone_module, trust_code, cfg.backbone.trainable_blocks)
    resolve_model_dims(cfg, backbone.embed_dim, getattr(backbone, "num_heads", None))
    h = cfg.vision_head
    head = VisionHead(backbone.embed_dim, backbone.num_prefix_tokens, h.num_blocks, h.num_heads, h.mlp_ratio,
                      h.drop_path, h.layer_scale_init, h.pooling, h.gem_p, h.use_patch_tokens, h.final_norm, h.attn_impl,
                      h.drop_path_mode, h.get("embed_dim"), bool(h.get("linear_projection", False)))
    head.grad_checkpointing = bool(h.grad_checkpointing)
    text = create_text_tower(cfg.text)
    model = DinoTxt(backbone, head, text, cfg.init_logit_scale, cfg.max_logit_scale, cfg.init_logit_bias)
    model.arch = str(cfg.arch)
    model.zeroshot = OmegaConf.to_container(cfg.zeroshot)
    return model


def create_text_tower(t: DictConfig) -> nn.Module:
    """The scratch CLIP-style tower, or a pretrained transformers encoder: from its folder with its
    weights (``t.pretrained``, training), or from the config JSON a checkpoint carries (``t.hf_config``,
    weights loaded afterwards)."""
    if t.hf_config or t.pretrained:
        from .pretrained_text import PretrainedTextTower

        if t.hf_config:
            text = PretrainedTextTower(t.hf_config, t.output_dim, "mean" if t.pooling == "auto" else t.pooling,
                                       t.pad_id, t.context_length, t.freeze_layers, pretrained=t.pretrained)
        else:
            text = PretrainedTextTower.from_folder(t.pretrained, t.output_dim, t.pooling, t.context_length,
                                                   t.freeze_layers, t.pad_id)
    else:
        text = TextTower(t.vocab_size, t.context_length, t.width, t.depth, t.heads, t.mlp_ratio, t.output_dim,
                         t.pooler, t.dropout, t.ls_init, bool(t.get("linear_projection", True)))
    text.set_grad_checkpointing(t.grad_checkpointing)
    return text


def create_backbone(bcfg: DictConfig, backbone_module: Optional[nn.Module] = None,
                    trust_code: bool = False, trainable_blocks: int = 0) -> FrozenBackbone:
    """The frozen backbone of a model config alone (the feature cache and curation need nothing else; they
    embed with every block frozen, whatever ``bcfg.trainable_blocks`` says: ``create_model`` unlocks)."""
    return FrozenBackbone(bcfg.name, weights=bcfg.weights, img_size=bcfg.img_size, module=backbone_module,
                          patch_token_layer=bcfg.get("patch_token_layer", 1),
                          init_seed=bcfg.init_seed, trust_code=trust_code, trainable_blocks=trainable_blocks,
                          **OmegaConf.to_container(bcfg.kwargs))


def model_config_from(cfg: Union[DictConfig, dict]) -> DictConfig:
    from ..config import ModelConfig, check_choices, merge_config

    cfg = merge_config(OmegaConf.structured(ModelConfig), cfg, "model config")
    check_choices(cfg, "model.")
    return cfg
