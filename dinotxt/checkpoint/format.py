"""Self-describing checkpoints: the trainable weights (safetensors), the resolved config
that rebuilds the model, and the tokenizer, either as a folder or as one file.

    checkpoint/
      model.safetensors   vision head, text tower, logit_scale (never the frozen backbone)
      config.yaml         resolved model config, the tokenizer kind (+ the training config when saved by a run)
      tokenizer.model     SentencePiece model (dinotxt's own tokenizer), or
      bpe_simple_vocab_16e6.txt.gz   the CLIP BPE vocabulary (the official dino.txt weights)
      backbone.safetensors   optional: the frozen backbone's weights (``dinotxt push-to-hub --include-backbone``)

    model.safetensors (single file, ``dinotxt export --format safetensors``)
      tensors             the same weights (+ ``backbone.*`` with ``--include-backbone``) and
                          ``__tokenizer__``: the tokenizer file's bytes as a uint8 tensor
      metadata            format, the config YAML, the tokenizer kind

A folder may also be named ``hf-hub:org/name[@revision]``: a Hub repository written by
``dinotxt push-to-hub``, fetched through the Hugging Face cache (``dinotxt.checkpoint.hub``).

Every file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written checkpoint. Loading never unpickles objects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from ..text import TOKENIZER_FILES, tokenizer_kind
from ..utils.fileio import atomic_output, atomic_write_bytes
from ..utils.log import error_line
from .record import (BACKBONE_PREFIX, CONFIG_NAME, SINGLE_FILE_FORMAT, TOKENIZER_TENSOR, WEIGHTS_NAME,
                     CheckpointRecord, backbone_weights, read_record)

PathLike = Union[str, Path]


def checkpoint_config(model, tokenizer, train_config: Optional[DictConfig] = None) -> DictConfig:
    """The ``config.yaml`` of a checkpoint: the model's config, the tokenizer section (and the run's config)."""
    kind = tokenizer_kind(tokenizer)
    cfg = OmegaConf.create({"model": model.config,
                            "tokenizer": {"kind": kind, "file": TOKENIZER_FILES[kind],
                                          "context_length": int(tokenizer.context_length)}})
    if train_config is not None:
        cfg["train"] = train_config
    return cfg


def save_checkpoint(directory: PathLike, model, tokenizer, train_config: Optional[DictConfig] = None,
                    state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write a checkpoint folder (weights, config, tokenizer); ``tokenizer`` is any ``dinotxt.text`` tokenizer.
    ``state``: the model's full state dict when its own tensors are shards (FSDP2: ``sharded_full_state``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg = checkpoint_config(model, tokenizer, train_config)  # raises before anything is written
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict(state).items()}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "dinotxt", "arch": str(cfg.model.arch)})
    atomic_write_bytes(directory / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True).encode())
    tokenizer.save(directory / cfg.tokenizer.file)
    return directory


def save_single_file(path: PathLike, state: Dict[str, torch.Tensor], config: DictConfig,
                     tokenizer_bytes: bytes) -> Path:
    """Write one self-describing safetensors file: ``state`` (trainable weights, optionally
    ``backbone.*``), the tokenizer file as the uint8 tensor ``__tokenizer__``, and ``config``
    (with its ``model`` and ``tokenizer`` sections) as YAML in the metadata."""
    from safetensors.torch import save_file

    if "model" not in config or "tokenizer" not in config:
        raise ValueError("a single-file checkpoint needs the 'model' and 'tokenizer' config sections")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8)
    metadata = {
        "format": SINGLE_FILE_FORMAT,
        "arch": str(config.model.arch),
        "tokenizer_kind": str(config.tokenizer.kind),
        "includes_backbone": str(any(k.startswith(BACKBONE_PREFIX) for k in state)).lower(),
        "config": OmegaConf.to_yaml(config, resolve=True),
    }
    path = Path(path)
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_checkpoint(checkpoint: PathLike, cache_dir: Optional[PathLike] = None):
    """``(config with model + tokenizer sections, trainable state, tokenizer file bytes)`` of a folder,
    a single file or an ``hf-hub:`` name (``read_record`` gives everything else)."""
    record = read_record(checkpoint, cache_dir, with_backbone=False)
    return record.config, record.state, record.tokenizer_bytes


def read_single_file(path: PathLike):
    """``(config, state, tokenizer file bytes)`` of a file written by ``save_single_file``; ``state``
    keeps the ``backbone.*`` tensors when the file has them."""
    record = read_record(Path(path))
    if not record.single_file:
        raise ValueError(f"{path} is a checkpoint folder, not a single file")
    state = dict(record.state)
    state.update({BACKBONE_PREFIX + k: v for k, v in (record.backbone_state or {}).items()})
    return record.config, state, record.tokenizer_bytes


def load(checkpoint: PathLike, device: Union[str, torch.device] = "cpu", backbone_weights: Optional[str] = None,
         trust_code: bool = False, cache_dir: Optional[PathLike] = None, image_size: Optional[int] = None,
         crop_fraction: Optional[float] = None):
    """Load a dinotxt checkpoint folder, single file or ``hf-hub:org/name[@revision]``. Returns
    ``(model, transform, tokenizer)``.

    ``backbone_weights`` points at the frozen backbone's weights file when it moved
    since training (the config records the original path); without it the weights the
    checkpoint carries are used when it has them. A checkpoint whose backbone is
    an import path ``package.module:factory`` is refused unless ``trust_code=True``: the
    checkpoint's author chose that code (``dinotxt.utils.plugins``). ``cache_dir``: the Hugging
    Face cache for ``hf-hub:`` names (default: ``huggingface_hub``'s own). The returned transform is the
    model's own zero-shot protocol (its config's ``zeroshot``: image size and crop fraction), or
    ``image_size`` / ``crop_fraction`` when given.
    """
    record = read_record(checkpoint, cache_dir, with_backbone=backbone_weights is None)
    return build_from_record(record, device, backbone_weights, trust_code, image_size, crop_fraction)


def load_single_file(path: PathLike, device: Union[str, torch.device] = "cpu",
                     backbone_weights: Optional[str] = None, trust_code: bool = False):
    """Load a file written by ``save_single_file``. Returns ``(model, transform, tokenizer)``."""
    return load(path, device, backbone_weights, trust_code)


def build_from_record(record: CheckpointRecord, device: Union[str, torch.device] = "cpu",
                      override: Optional[str] = None, trust_code: bool = False, image_size: Optional[int] = None,
                      crop_fraction: Optional[float] = None):
    """``(model, transform, tokenizer)`` of a checkpoint record: the model rebuilt from its config, the
    trainable weights loaded strictly, the frozen backbone from the weights it carries or the file it names."""
    from ..models.backbone import FrozenBackbone, names_code
    from ..models.factory import create_backbone, create_model
    from ..models.transforms import model_eval_transform
    from ..utils.plugins import UntrustedCodeError

    mcfg = record.model_config.copy()
    if names_code(mcfg.backbone.name) and not trust_code:  # before anything is imported or built
        raise UntrustedCodeError(
            f"{record.where()}: model.backbone.name={mcfg.backbone.name!r} names code to import and call; load this "
            "checkpoint with trust_code=True (command line: --trust-code) only if you trust whoever made it")
    tokenizer = record.tokenizer(mcfg.text.context_length)
    carried = record.backbone_state is not None and override is None
    recorded = mcfg.backbone.weights
    mcfg.backbone.weights = backbone_weights(mcfg, override, carried)
    b = mcfg.backbone
    if carried:  # the weights travel in the checkpoint
        backbone = FrozenBackbone(b.name, weights=record.backbone_state, img_size=b.img_size, init_seed=b.init_seed,
                                  trust_code=trust_code, trainable_blocks=b.get("trainable_blocks", 0),
                                  patch_token_layer=b.get("patch_token_layer", 1),
                                  **OmegaConf.to_container(b.kwargs))
        # a config written from this model records the original file
        backbone.weights_file, backbone.rebuild_problem = recorded, None
    else:
        backbone = create_backbone(b, trust_code=trust_code, trainable_blocks=b.get("trainable_blocks", 0))
    check_head_fits_backbone(record, backbone)  # before the head is built around it
    model = create_model(mcfg, trust_code=trust_code, frozen_backbone=backbone)
    try:
        model.load_trainable_state_dict(record.state)
    except (ValueError, RuntimeError, KeyError) as e:
        weights = record.path if record.single_file else record.path / WEIGHTS_NAME
        raise ValueError(f"{weights}: {error_line(e)}") from None
    model.eval().to(device)
    if tokenizer.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the text tower only {mcfg.text.vocab_size}")
    return model, model_eval_transform(mcfg, image_size, crop_fraction), tokenizer


def check_head_fits_backbone(record: CheckpointRecord, backbone) -> None:
    """The vision head's weights were trained on a backbone of this width (one line naming both otherwise: a
    ViT-B head on a ViT-L backbone, or --backbone-weights of another size)."""
    norm = record.state.get("vision_head.ln_final.weight")
    if norm is None:
        norm = next((v for k, v in record.state.items() if k.startswith("vision_head.") and k.endswith("norm1.weight")),
                    None)
    trained = int(norm.shape[0]) if norm is not None and norm.ndim == 1 else None
    proj = record.state.get("vision_head.linear_projection.weight")  # (P, D): a head of 0 blocks without a norm
    if trained is None and proj is not None and proj.ndim == 2:
        trained = int(proj.shape[1])
    width = int(backbone.embed_dim)
    if trained is not None and trained != width:
        b = record.model_config.backbone
        raise ValueError(f"{record.where()}: the vision head was trained on a {trained}-wide backbone, but "
                         f"model.backbone {b.name} ({b.weights or 'random init'}) is {width} wide: give the backbone "
                         "the head was trained with (--backbone-weights PATH, or model.backbone in the config)")


__all__ = ["check_head_fits_backbone", "save_checkpoint", "save_single_file", "read_checkpoint", "read_single_file", "load", "load_single_file",
           "build_from_record", "checkpoint_config"]
