"""Self-describing checkpoints: a folder with the trainable weights (safetensors), the
resolved config that rebuilds the model, and the tokenizer.

    checkpoint/
      model.safetensors   vision head, text tower, logit_scale (never the frozen backbone)
      config.yaml         resolved model config (+ the training config when saved by a run)
      tokenizer.model     SentencePiece model

Every file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written checkpoint. Loading never unpickles objects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from omegaconf import DictConfig, OmegaConf

from .fileio import atomic_output, atomic_write_bytes
from .tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TOKENIZER_NAME = "tokenizer.model"


def save_checkpoint(directory: Union[str, Path], model, tokenizer: Tokenizer, train_config: Optional[DictConfig] = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    with atomic_output(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "dinotxt", "arch": str(model.config.arch)})
    cfg = OmegaConf.create({"model": model.config})
    if train_config is not None:
        cfg["train"] = train_config
    atomic_write_bytes(directory / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True).encode())
    tokenizer.save(directory / TOKENIZER_NAME)
    return directory


def load(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu", backbone_weights: Optional[str] = None):
    """Load a dinotxt checkpoint folder. Returns ``(model, transform, tokenizer)``.

    ``backbone_weights`` points at the frozen backbone's weights file when it moved
    since training (the config records the original path).
    """
    from .models.factory import create_model
    from .transforms import eval_transform

    directory = Path(checkpoint)
    if directory.is_file() and directory.name == WEIGHTS_NAME:
        directory = directory.parent
    for name in (WEIGHTS_NAME, CONFIG_NAME, TOKENIZER_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"{directory} is not a dinotxt checkpoint: {name} is missing "
                f"(expected a folder with {WEIGHTS_NAME}, {CONFIG_NAME}, {TOKENIZER_NAME})"
            )
    from safetensors.torch import load_file

    cfg = OmegaConf.load(directory / CONFIG_NAME)
    if "model" not in cfg:
        raise ValueError(f"{directory / CONFIG_NAME} has no 'model' section; was it written by dinotxt?")
    mcfg = cfg.model
    if backbone_weights is not None:
        mcfg.backbone.weights = backbone_weights
    elif mcfg.backbone.weights and not Path(mcfg.backbone.weights).is_file():
        raise FileNotFoundError(
            f"the backbone weights this model was trained with are not at {mcfg.backbone.weights}; "
            "pass backbone_weights=PATH (CLI: --backbone-weights PATH)"
        )
    model = create_model(mcfg)
    try:
        state = load_file(str(directory / WEIGHTS_NAME))
    except Exception as e:
        raise ValueError(f"cannot read {directory / WEIGHTS_NAME}: {e}") from None
    model.load_trainable_state_dict(state)
    model.eval().to(device)
    tokenizer = Tokenizer(directory / TOKENIZER_NAME, context_length=mcfg.text.context_length)
    if tokenizer.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the text tower only {mcfg.text.vocab_size}")
    return model, eval_transform(mcfg.backbone.img_size), tokenizer
