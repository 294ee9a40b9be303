"""open_clip's factory for dinotxt models: ``create_model_and_transforms`` and ``get_tokenizer``.

Code written for open_clip runs with one changed import::

    import dinotxt as open_clip
    model, preprocess_train, preprocess = open_clip.create_model_and_transforms("hf-hub:org/name")
    tokenizer = open_clip.get_tokenizer("hf-hub:org/name")

A model is named by

- a checkpoint folder or single ``.safetensors`` file (``runs/NAME/checkpoint``);
- ``hf-hub:org/name[@revision]``: a Hub repository written by ``dinotxt push-to-hub`` (``dinotxt.checkpoint.hub``);
- ``official:<release>``: the official dino.txt release (``official:dinov2_vitl14_reg4_dinotxt``,
  ``official:dinov3_vitl16_dinotxt``) from local files, as ``dinotxt.load_official`` reads them.
  The files are found by their released names in ``pretrained`` (a folder), else in torch.hub's
  checkpoint folder (``$TORCH_HOME/hub/checkpoints``, where ``torch.hub.load`` of the official
  repositories puts them); keyword arguments ``backbone=``, ``vision_head=``,
  ``text_encoder=``, ``weights=``, ``bpe=`` name files one by one.

The model is ``DinoTxt``: ``encode_image(images, normalize=)``, ``encode_text(ids, normalize=)``,
``logit_scale`` (the log temperature, as open_clip stores it). ``preprocess_train`` is the
training crop of METHOD.md (RandomResizedCrop with the run's ``data.crop_scale`` / ``data.hflip``
when the checkpoint records them), ``preprocess_val`` the evaluation transform ``dinotxt.load``
returns. The tokenizer maps a string or a list of strings to a ``LongTensor (B, context_length)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

OFFICIAL_PREFIX = "official:"
PRECISIONS = {"fp32": torch.float32, "amp": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "fp64": torch.float64}
_OFFICIAL_FILE_ARGS = ("backbone", "vision_head", "text_encoder", "weights", "bpe")

PathLike = Union[str, Path]


def is_official_name(name: Any) -> bool:
    return isinstance(name, str) and name.startswith(OFFICIAL_PREFIX)


def official_files(name: str, pretrained: Optional[PathLike] = None, **files: Optional[PathLike]) -> Dict[str, Any]:
    """``load_official`` arguments for ``official:<release>``: each file given by keyword, else found by its
    released name in the folder ``pretrained``, else in torch.hub's checkpoint folder."""
    from ..text.clip_bpe import BPE_FILENAME
    from .official import get_release

    release = get_release(name[len(OFFICIAL_PREFIX):] if is_official_name(name) else name)
    unknown = sorted(set(files) - set(_OFFICIAL_FILE_ARGS))
    if unknown:
        raise TypeError(f"unknown argument {unknown[0]!r} for {name} (files: {', '.join(_OFFICIAL_FILE_ARGS)})")
    folder = _release_folder(name, pretrained)
    roles = ("vision_head", "text_encoder") if release.layout == "dinov2" else ("weights",)
    wanted = {"backbone": release.backbone_file, **dict(zip(roles, release.head_files)), "bpe": BPE_FILENAME}
    out: Dict[str, Any] = {"name": release.name}
    for role, file_name in wanted.items():
        if files.get(role) is not None:
            out[role] = files[role]
        elif (folder / file_name).is_file():
            out[role] = str(folder / file_name)
        elif role == "bpe":
            out[role] = None  # the copy inside open_clip_torch
        elif role == "backbone" and release.layout == "dinov3":
            out[role] = None  # load_official finds it inside the weights file, or says it is needed
        else:
            raise FileNotFoundError(f"{name}: {file_name} not found in {folder}; pass pretrained=FOLDER holding the "
                                    f"release files, or {role}=PATH")
    return out


def _release_folder(name: str, pretrained: Optional[PathLike]) -> Path:
    """Where the files of an official release are looked for: ``pretrained``, else torch.hub's checkpoints."""
    from .official import get_release

    if pretrained is None:
        return Path(torch.hub.get_dir()) / "checkpoints"
    folder = Path(pretrained)
    if not folder.is_dir():
        release = get_release(name[len(OFFICIAL_PREFIX):] if is_official_name(name) else name)
        raise FileNotFoundError(f"{name}: pretrained={pretrained} must be the folder holding the release files "
                                f"({', '.join((release.backbone_file,) + release.head_files)})")
    return folder


def _load(model_name: PathLike, pretrained: Optional[PathLike], device, cache_dir, backbone_weights, trust_code,
          overrides: Optional[dict], files: Dict[str, Any]):
    """``(model, preprocess_val, tokenizer, train section of the config or None)``."""
    from .format import build_from_record
    from .record import read_record

    if is_official_name(model_name):
        from .official import load_official

        model, transform, tokenizer = load_official(**official_files(str(model_name), pretrained, **files),
                                                    device=device, overrides=overrides)
        return model, transform, tokenizer, None
    if pretrained is not None or files or overrides:
        extra = "pretrained" if pretrained is not None else sorted(files or overrides)[0]
        raise TypeError(f"{model_name}: {extra}= applies to official: names only; a checkpoint names its own weights")
    record = read_record(model_name, cache_dir, with_backbone=backbone_weights is None)  # one Hub look-up
    model, transform, tokenizer = build_from_record(record, device, backbone_weights, trust_code)
    return model, transform, tokenizer, record.train_config


def create_model_and_transforms(model_name: PathLike, pretrained: Optional[PathLike] = None,
                                precision: str = "fp32", device: Union[str, torch.device] = "cpu",
                                cache_dir: Optional[PathLike] = None, backbone_weights: Optional[str] = None,
                                trust_code: bool = False, overrides: Optional[dict] = None, **files: PathLike):
    """``(model, preprocess_train, preprocess_val)``, open_clip's signature.

    Args:
        model_name: checkpoint folder / file, ``hf-hub:org/name[@revision]`` or ``official:<release>``.
        pretrained: for ``official:`` names, the folder holding the release files; None otherwise.
        precision: ``fp32`` (``amp``), ``fp16``, ``bf16`` or ``fp64``: the dtype of the weights.
        device: where the model goes.
        cache_dir: the Hugging Face cache for ``hf-hub:`` names (default: ``huggingface_hub``'s).
        backbone_weights: the frozen backbone's weights file, if it is not where the config says.
        trust_code: allow a checkpoint whose backbone is an import path (``dinotxt.utils.plugins``).
        overrides: ``official:`` only: merged over the release architecture (``load_official``).
        **files: ``official:`` only: ``backbone=``, ``vision_head=``, ``text_encoder=``, ``weights=``, ``bpe=``.
    """
    from ..models.transforms import train_transform

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use {', '.join(PRECISIONS)}")
    model, preprocess_val, _, train = _load(model_name, pretrained, device, cache_dir, backbone_weights, trust_code,
                                            overrides, files)
    model = model.to(PRECISIONS[precision]).eval()
    data = train.data if train is not None and "data" in train else None
    scale = tuple(data.crop_scale) if data is not None and "crop_scale" in data else (0.08, 1.0)
    hflip = float(data.hflip) if data is not None and "hflip" in data else 0.5
    preprocess_train = train_transform(int(model.backbone.img_size), scale, hflip)
    return model, preprocess_train, preprocess_val


def create_model_from_pretrained(model_name: PathLike, pretrained: Optional[PathLike] = None, **kwargs):
    """``(model, preprocess_val)``, as open_clip's function of that name."""
    model, _, preprocess = create_model_and_transforms(model_name, pretrained, **kwargs)
    return model, preprocess


def get_tokenizer(model_name: PathLike, pretrained: Optional[PathLike] = None, context_length: Optional[int] = None,
                  cache_dir: Optional[PathLike] = None, **files: PathLike):
    """The tokenizer of a model (``tokenizer(texts) -> LongTensor (B, context_length)``), read without
    building the model: a checkpoint's own tokenizer file, or the CLIP BPE of the official release."""
    from .record import read_record

    if is_official_name(model_name):
        from ..config import model_config
        from ..text import BPE_FILENAME, ClipTokenizer
        from .official import get_release

        release = get_release(str(model_name)[len(OFFICIAL_PREFIX):])
        bpe = files.get("bpe")
        if bpe is None and (_release_folder(str(model_name), pretrained) / BPE_FILENAME).is_file():
            bpe = _release_folder(str(model_name), pretrained) / BPE_FILENAME  # else the copy inside open_clip_torch
        return ClipTokenizer(bpe, context_length=context_length or int(model_config(release.arch).text.context_length))
    if pretrained is not None or files:
        raise TypeError(f"{model_name}: pretrained= and file arguments apply to official: names only")
    return read_record(model_name, cache_dir, tensors=False).tokenizer(context_length)


__all__ = ["create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer", "official_files",
           "OFFICIAL_PREFIX", "PRECISIONS"]
