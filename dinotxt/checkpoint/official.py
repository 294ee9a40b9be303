"""The official dino.txt release (Jose et al., "DINOv2 Meets Text", CVPR 2025) in dinotxt.

Key maps between the files Meta released and our modules, documented here and applied
in both directions: ``load_official`` builds a ``DinoTxt`` from the released files and
loads them strictly; ``official_state_dicts`` turns our trainable weights into the
released layout (what ``dinotxt export --format official`` writes).

DINOv2 release ``dinov2_vitl14_reg4_dinotxt_tet1280d20h24l`` (three files; the official
code loads each head strictly, METHOD.md section 6):

====================  ====================================  ==================================
file                  official key                          dinotxt key
====================  ====================================  ==================================
backbone              ``dinov2_vitl14_reg4_pretrain.pth``   ``backbone.encoder`` (timm, see
                                                            ``dinotxt.models.backbone``)
``*_vision_head.pth`` ``block_list.{i}.*``                  ``vision_head.block_list.{i}.*``
``*_vision_head.pth`` ``ln_final.*``                        ``vision_head.ln_final.*``
``*_vision_head.pth`` ``linear_projection.weight`` (a head  ``vision_head.linear_projection.weight``
                      trained with use_linear_projection;
                      not in the release)
``*_text_encoder.pth`` ``backbone.*``                       ``text.backbone.*``
``*_text_encoder.pth`` ``head.linear_projection.weight``    ``text.head.linear_projection.weight``
(not shipped)                                               ``logit_scale`` = ln 100
====================  ====================================  ==================================

DINOv3 release ``dinov3_vitl16_dinotxt_tet1280d20h24l`` (the backbone file plus ONE
file for both heads; the official code loads it with ``strict=False``, we load it strictly):

==========================================  ==========================================
official key                                dinotxt key
==========================================  ==========================================
``visual_model.head.blocks.{i}.*``          ``vision_head.block_list.{i}.*`` (``blocks``, not ``block_list``)
``visual_model.head.ln_final.*``            ``vision_head.ln_final.*``
``visual_model.head.linear_projection.*``   ``vision_head.linear_projection.*`` (not in the release)
``text_model.backbone.*``                   ``text.backbone.*``
``text_model.head.linear_projection.weight`` ``text.head.linear_projection.weight``
``logit_scale`` (shape (1,), optional)      ``logit_scale`` (a scalar); ln 100 when absent
``visual_model.backbone.*`` (optional)      the frozen backbone, official DINOv3 layout
==========================================  ==========================================

Below the prefixes the module names are the official ones (head blocks ``norm1``,
``attn.qkv`` (no bias), ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.w1/w2/w3``,
``ls2.gamma``; text blocks ``attention_norm``, ``attention.qkv``, ``attention.proj``,
``ffn_norm``, ``feed_forward.fc1/fc2``), so the maps only move prefixes. The text
encoder needs OpenAI's CLIP BPE (``dinotxt.text.clip_bpe.ClipTokenizer``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..models.weights import StateDict, key_report, load_state_dict_file

PathLike = Union[str, Path]

# (official prefix, dinotxt prefix); a rule without a trailing dot names one exact key
KEY_MAPS: Dict[str, Dict[str, List[Tuple[str, str]]]] = {
    "dinov2": {
        "vision_head": [("block_list.", "vision_head.block_list."), ("ln_final.", "vision_head.ln_final."),
                        ("linear_projection.", "vision_head.linear_projection.")],
        "text_encoder": [("backbone.", "text.backbone."), ("head.", "text.head.")],
    },
    "dinov3": {
        "weights": [
            ("visual_model.head.blocks.", "vision_head.block_list."),
            ("visual_model.head.ln_final.", "vision_head.ln_final."),
            ("visual_model.head.linear_projection.", "vision_head.linear_projection."),
            ("text_model.backbone.", "text.backbone."),
            ("text_model.head.", "text.head."),
            ("logit_scale", "logit_scale"),
        ],
    },
}
DINOV3_BACKBONE_PREFIX = "visual_model.backbone."
DEFAULT_LOGIT_SCALE = math.log(100.0)  # not shipped with the DINOv2 release (METHOD.md section 6)


@dataclass(frozen=True)
class Release:
    """One official dino.txt release: its registered architecture and its files."""

    name: str  # the official entry point / file-name prefix
    arch: str  # dinotxt registry entry with the same architecture
    layout: str  # key map in KEY_MAPS
    backbone_file: str  # the frozen backbone the heads were trained on
    head_files: Tuple[str, ...]  # released head file names, in the order of KEY_MAPS[layout]


RELEASES: Dict[str, Release] = {
    "dinov2_vitl14_reg4_dinotxt": Release(
        "dinov2_vitl14_reg4_dinotxt_tet1280d20h24l", "dinotxt_vitl14_reg4", "dinov2", "dinov2_vitl14_reg4_pretrain.pth",
        ("dinov2_vitl14_reg4_dinotxt_tet1280d20h24l_vision_head.pth",
         "dinov2_vitl14_reg4_dinotxt_tet1280d20h24l_text_encoder.pth")),
    "dinov3_vitl16_dinotxt": Release(
        "dinov3_vitl16_dinotxt_tet1280d20h24l", "dinotxt_vitl16_dinov3", "dinov3",
        "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
        ("dinov3_vitl16_dinotxt_vision_head_and_text_encoder-a442d8f5.pth",)),
}


def get_release(name: str) -> Release:
    """A release by its short name or full official name."""
    for short, release in RELEASES.items():
        if name in (short, release.name):
            return release
    raise ValueError(f"unknown official dino.txt release '{name}'; known: {', '.join(RELEASES)}")


def _map_key(key: str, rules: List[Tuple[str, str]], reverse: bool = False) -> Optional[str]:
    for official, ours in rules:
        src, dst = (ours, official) if reverse else (official, ours)
        if src.endswith("."):
            if key.startswith(src):
                return dst + key[len(src):]
        elif key == src:
            return dst
    return None


def official_to_dinotxt(state: StateDict, layout: str, role: str) -> Tuple[StateDict, List[str]]:
    """Rename one official file's keys to ours. Returns (mapped state, keys no rule covers)."""
    rules = KEY_MAPS[layout][role]
    mapped, unmapped = {}, []
    for key, value in state.items():
        ours = _map_key(key, rules)
        if ours is None:
            unmapped.append(key)
        else:
            mapped[ours] = value.reshape(()) if ours == "logit_scale" else value
    return mapped, unmapped


def official_state_dicts(trainable: StateDict, layout: str = "dinov2") -> Dict[str, StateDict]:
    """Our trainable weights (``DinoTxt.trainable_state_dict()``) in the official layout, per released file.

    ``logit_scale`` goes into the DINOv3 file (shape (1,), as the official module stores it);
    the DINOv2 release has no place for it (its loader reads each head strictly).
    """
    if layout not in KEY_MAPS:
        raise ValueError(f"unknown official layout '{layout}' (use {' or '.join(KEY_MAPS)})")
    files: Dict[str, StateDict] = {role: {} for role in KEY_MAPS[layout]}
    leftover = []
    for key, value in trainable.items():
        for role, rules in KEY_MAPS[layout].items():
            official = _map_key(key, rules, reverse=True)
            if official is not None:
                files[role][official] = value.reshape(1) if key == "logit_scale" else value
                break
        else:
            if not (layout == "dinov2" and key == "logit_scale"):
                leftover.append(key)
    if leftover:
        raise ValueError(f"weights {leftover[:3]} have no place in the official {layout} layout")
    return files


def official_trainable_state(model, release: "Release", files: Dict[str, StateDict],
                             paths: Optional[Dict[str, PathLike]] = None, roles: Optional[List[str]] = None) -> StateDict:
    """The official files of ``release`` (role -> state dict) as ``model``'s trainable weights, each
    file checked strictly against the model's own weights in the official layout. ``roles`` limits
    it to some files (a text encoder alone); without the DINOv3 file's logit scale it is ln 100."""
    # a variant's own weights (the sigmoid loss's bias, unlocked backbone blocks) are not in the release
    variants = model.variant_keys()
    expected = official_state_dicts({k: v for k, v in model.trainable_state_dict().items() if k not in variants},
                                    release.layout)
    state: StateDict = {}
    for role in roles or list(KEY_MAPS[release.layout]):
        file_state = files[role]
        if role == "weights":
            file_state = {k: v for k, v in file_state.items() if not k.startswith(DINOV3_BACKBONE_PREFIX)}
            if "logit_scale" not in file_state:
                file_state["logit_scale"] = torch.tensor([DEFAULT_LOGIT_SCALE])
        report = key_report(expected[role], file_state)
        if report:
            path = (paths or {}).get(role, "state dict")
            raise ValueError(f"{role.replace('_', ' ')} file {path} ({_guess_role(file_state)}) does not fit "
                             f"{release.name} as configured (model '{model.arch}'): {report}")
        mapped, _ = official_to_dinotxt(file_state, release.layout, role)
        state.update(mapped)
    if roles is None:
        state.setdefault("logit_scale", torch.tensor(DEFAULT_LOGIT_SCALE))
    return state


def guess_official_role(state: StateDict) -> Optional[str]:
    """``vision_head`` / ``text_encoder`` (DINOv2 release files), ``weights`` (the DINOv3 file), or None."""
    if any(k.startswith(("visual_model.", "text_model.")) for k in state):
        return "weights"
    if any(k.startswith("backbone.token_embedding") for k in state) and any(k.startswith("head.") for k in state):
        return "text_encoder"
    if any(k.startswith(("block_list.", "ln_final.")) for k in state) and not any(k.endswith("patch_embed.proj.weight")
                                                                                  for k in state):
        return "vision_head"
    return None


def _guess_role(state: StateDict) -> str:
    if any(k.startswith(("visual_model.", "text_model.")) for k in state):
        return "the single DINOv3 dino.txt file (vision head and text encoder)"
    if any(k.startswith("backbone.token_embedding") for k in state):
        return "a text encoder file"
    if any(k.startswith(("block_list.", "ln_final.")) for k in state):
        return "a vision head file"
    if any(k.endswith("patch_embed.proj.weight") for k in state):
        return "a backbone file"
    return "an unknown file"


def _read(path: PathLike, role: str) -> StateDict:
    if path is None:
        raise ValueError(f"the {role.replace('_', ' ')} file is required")
    try:
        return load_state_dict_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{role.replace('_', ' ')} file not found: {path}") from None


def load_official(
    name: str = "dinov2_vitl14_reg4_dinotxt",
    backbone: Optional[PathLike] = None,
    vision_head: Optional[PathLike] = None,
    text_encoder: Optional[PathLike] = None,
    weights: Optional[PathLike] = None,
    bpe: Optional[PathLike] = None,
    device: Union[str, torch.device] = "cpu",
    overrides: Optional[dict] = None,
):
    """Build ``DinoTxt`` from the official dino.txt files. Returns ``(model, transform, tokenizer)``.

    Args:
        name: ``dinov2_vitl14_reg4_dinotxt`` or ``dinov3_vitl16_dinotxt`` (or their full names).
        backbone: the frozen backbone's official file (``dinov2_vitl14_reg4_pretrain.pth`` /
            the DINOv3 ViT-L/16 ``.pth``); for DINOv3 it may be omitted when ``weights``
            also holds ``visual_model.backbone.*``.
        vision_head, text_encoder: the two DINOv2-release head files.
        weights: the single DINOv3-release file (vision head and text encoder).
        bpe: ``bpe_simple_vocab_16e6.txt.gz``; None uses the copy inside open_clip_torch.
        device: where the model goes.
        overrides: nested dict merged over the release's registered architecture (tests use
            it to shrink the model; the released files only fit the default).

    Every file is loaded strictly through ``KEY_MAPS``; a file that does not fit names its
    missing / unexpected / mis-shaped keys in its own (official) key names.
    """
    from ..text.clip_bpe import ClipTokenizer
    from ..config import model_config
    from ..models.transforms import model_eval_transform
    from ..models.weights import dinov3_needs_qkv_bias
    from ..models.factory import create_model

    release = get_release(name)
    if release.layout == "dinov2":
        if weights is not None:
            raise ValueError(f"{release.name} ships two head files: pass vision_head=... and text_encoder=..., not weights=")
        files = {"vision_head": _read(vision_head, "vision_head"), "text_encoder": _read(text_encoder, "text_encoder")}
    else:
        if vision_head is not None or text_encoder is not None:
            raise ValueError(f"{release.name} ships one file for both heads: pass it as weights=...")
        files = {"weights": _read(weights, "weights")}
        if backbone is None and any(k.startswith(DINOV3_BACKBONE_PREFIX) for k in files["weights"]):
            backbone = weights  # the backbone loader finds it under its wrapper prefix
    if backbone is None:
        raise ValueError(f"the dino.txt heads need the frozen backbone they were trained on: pass backbone=PATH to "
                         f"{release.backbone_file}")
    if not Path(backbone).is_file():
        raise FileNotFoundError(f"backbone file not found: {backbone}")

    cfg = model_config(release.arch, overrides)
    cfg.backbone.weights = str(backbone)
    if release.layout == "dinov3" and dinov3_needs_qkv_bias(backbone) and not cfg.backbone.name.endswith("_qkvb"):
        cfg.backbone.name = cfg.backbone.name + "_qkvb"  # released ViT-L biases are zero; a file with biases needs them
    model = create_model(cfg)

    paths = {"vision_head": vision_head, "text_encoder": text_encoder, "weights": weights}
    model.load_trainable_state_dict(official_trainable_state(model, release, files, paths))
    model.eval().to(device)
    tokenizer = ClipTokenizer(bpe, context_length=cfg.text.context_length)
    if tokenizer.vocab_size != cfg.text.vocab_size:
        raise ValueError(f"the CLIP tokenizer has {tokenizer.vocab_size} ids but the text tower {cfg.text.vocab_size}")
    return model, model_eval_transform(cfg), tokenizer


__all__ = ["KEY_MAPS", "RELEASES", "Release", "get_release", "load_official", "official_state_dicts",
           "official_to_dinotxt", "official_trainable_state", "guess_official_role", "DEFAULT_LOGIT_SCALE"]
