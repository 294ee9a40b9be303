"""One record of a checkpoint, read once: what every reader of a checkpoint (``load``, the factory,
``export``, ``push-to-hub``, ``model.init_from``) takes from it.

A checkpoint is a folder, one self-describing ``.safetensors`` file or ``hf-hub:org/name[@revision]``
(layouts: ``dinotxt.checkpoint.format``). ``read_record`` resolves the name (one Hub look-up), reads
the config, the trainable weights, the tokenizer file and, when the checkpoint carries them, the
frozen backbone's weights; ``backbone_weights`` is the one place that decides where the backbone's
weights come from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from ..text import TOKENIZER_FILES, build_tokenizer

PathLike = Union[str, Path]
StateDict = Dict[str, torch.Tensor]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
SINGLE_FILE_FORMAT = "dinotxt-single-file"
TOKENIZER_TENSOR = "__tokenizer__"
BACKBONE_PREFIX = "backbone."
BACKBONE_NAME = "backbone.safetensors"  # optional, in a folder: the frozen backbone (FrozenBackbone.full_state_dict)
NOT_A_CHECKPOINT = (f"pass a checkpoint folder (with {WEIGHTS_NAME} and {CONFIG_NAME}) or a single file written by "
                    "`dinotxt export --format safetensors`")


@dataclass
class CheckpointRecord:
    """Everything a checkpoint holds, read once.

    ``config`` has the ``model`` and ``tokenizer`` sections (and ``train`` when a run wrote it);
    ``state`` the trainable weights (empty when read with ``tensors=False``); ``backbone_state`` the
    frozen backbone's weights when the checkpoint carries them (``backbone.safetensors`` in a folder,
    ``backbone.*`` tensors in a single file), else None."""

    source: str  # what the caller named: a path or hf-hub:org/name
    path: Path  # the local folder or single file
    config: DictConfig
    state: StateDict
    tokenizer_bytes: bytes
    backbone_state: Optional[StateDict] = None
    metadata: Dict[str, str] = field(default_factory=dict)

    @property
    def single_file(self) -> bool:
        return self.path.is_file()

    @property
    def model_config(self) -> DictConfig:
        return self.config.model

    @property
    def train_config(self) -> Optional[DictConfig]:
        return OmegaConf.select(self.config, "train", default=None)

    @property
    def tokenizer_kind(self) -> str:
        return str(self.config.tokenizer.kind)

    @property
    def tokenizer_file(self) -> str:
        return str(self.config.tokenizer.file)

    @property
    def context_length(self) -> int:
        return int(self.config.tokenizer.context_length)

    def tokenizer(self, context_length: Optional[int] = None):
        """The checkpoint's tokenizer (``dinotxt.text``), ``context_length`` tokens per text."""
        return build_tokenizer(self.tokenizer_kind, self.tokenizer_bytes, int(context_length or self.context_length))

    def where(self) -> str:
        """The name to quote in a message about this checkpoint's config."""
        if self.source.startswith("hf-hub:") or self.single_file:
            return self.source
        return str(self.path / CONFIG_NAME)


def local_checkpoint(checkpoint: PathLike, cache_dir: Optional[PathLike] = None, with_backbone: bool = True) -> Path:
    """The local path of a checkpoint: itself, or the Hugging Face cache folder of an ``hf-hub:`` name
    (without its ``backbone.safetensors`` unless ``with_backbone``)."""
    from .hub import hub_snapshot, is_hub_name

    if is_hub_name(checkpoint):
        return hub_snapshot(str(checkpoint), cache_dir, skip=() if with_backbone else (BACKBONE_NAME,))
    return Path(checkpoint)


def _tokenizer_section(cfg: DictConfig) -> DictConfig:
    """The tokenizer section with every field filled (checkpoints of older versions record only the kind)."""
    kind = OmegaConf.select(cfg, "tokenizer.kind", default="sentencepiece")
    return OmegaConf.create({
        "kind": kind,
        "file": OmegaConf.select(cfg, "tokenizer.file", default=TOKENIZER_FILES.get(kind, "tokenizer.model")),
        "context_length": OmegaConf.select(cfg, "tokenizer.context_length", default=None)
        or cfg.model.text.context_length})


def _load_tensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _read_folder(folder: Path, tensors: bool, with_backbone: bool):
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        if not folder.exists():
            raise FileNotFoundError(f"{folder} is not a dinotxt checkpoint: it does not exist")
        raise FileNotFoundError(f"{folder} is not a dinotxt checkpoint: expected {WEIGHTS_NAME} and {CONFIG_NAME} in it")
    cfg = OmegaConf.load(folder / CONFIG_NAME)
    if not isinstance(cfg, DictConfig) or "model" not in cfg:
        raise ValueError(f"{folder / CONFIG_NAME} has no 'model' section; was it written by dinotxt?")
    cfg.tokenizer = _tokenizer_section(cfg)
    tok_path = folder / str(cfg.tokenizer.file)
    if not tok_path.is_file():
        raise FileNotFoundError(f"{folder} is not a complete dinotxt checkpoint: {cfg.tokenizer.file} is missing")
    state = _load_tensors(folder / WEIGHTS_NAME) if tensors else {}
    backbone = None
    if tensors and with_backbone and (folder / BACKBONE_NAME).is_file():
        backbone = _load_tensors(folder / BACKBONE_NAME)
    return cfg, state, tok_path.read_bytes(), backbone, {}


def _read_single_file(path: Path, tensors: bool, with_backbone: bool):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != SINGLE_FILE_FORMAT or "config" not in meta:
                raise ValueError(f"{path} is not a dinotxt checkpoint: {NOT_A_CHECKPOINT}")
            if TOKENIZER_TENSOR not in f.keys():
                raise ValueError(f"{path} has no {TOKENIZER_TENSOR} tensor; the file is incomplete")
            tok_bytes = f.get_tensor(TOKENIZER_TENSOR).numpy().tobytes()
    except ValueError:
        raise
    except Exception:
        raise ValueError(f"{path} is not a dinotxt checkpoint: {NOT_A_CHECKPOINT}") from None
    cfg = OmegaConf.create(meta["config"])
    cfg.tokenizer = _tokenizer_section(cfg)
    state, backbone = {}, None
    if tensors:
        state = _load_tensors(path)
        state.pop(TOKENIZER_TENSOR)
        carried = [k for k in state if k.startswith(BACKBONE_PREFIX)]
        backbone = {k[len(BACKBONE_PREFIX):]: state.pop(k) for k in carried} or None
        if not with_backbone:
            backbone = None
    return cfg, state, tok_bytes, backbone, meta


def read_record(checkpoint: PathLike, cache_dir: Optional[PathLike] = None, tensors: bool = True,
                with_backbone: bool = True) -> CheckpointRecord:
    """Read a checkpoint folder, single file or ``hf-hub:`` name once.

    Args:
        checkpoint: the folder (or its ``model.safetensors``), a single file, or ``hf-hub:org/name[@rev]``.
        cache_dir: the Hugging Face cache for ``hf-hub:`` names.
        tensors: read the weights (False: config and tokenizer only, e.g. for ``get_tokenizer``).
        with_backbone: read (and for the Hub, download) the backbone weights the checkpoint carries.
    """
    source = str(checkpoint)
    path = local_checkpoint(checkpoint, cache_dir, with_backbone=with_backbone and tensors)
    if path.is_file() and path.name == WEIGHTS_NAME:
        path = path.parent
    reader = _read_single_file if path.is_file() else _read_folder
    cfg, state, tok_bytes, backbone, meta = reader(path, tensors, with_backbone)
    return CheckpointRecord(source, path, cfg, state, tok_bytes, backbone, meta)


def backbone_weights(mcfg: DictConfig, override: Optional[str] = None, carried: bool = False,
                     option: str = "backbone_weights=PATH (CLI: --backbone-weights PATH)") -> Optional[str]:
    """Where the frozen backbone's weights come from, checked before anything is built: ``override``
    when the caller names a file, None when the checkpoint ``carried`` them (or the backbone is random),
    else the file the config records, which must exist."""
    from ..models.weights import resolve_weights

    if override is not None:
        return override
    if carried:
        return None
    recorded = mcfg.backbone.weights
    if recorded and not resolve_weights(recorded).is_file():
        raise FileNotFoundError(f"the backbone weights this model was trained with are not at {recorded}; pass {option}")
    return recorded


def backbone_state(record: CheckpointRecord, override: Optional[str] = None, trust_code: bool = False) -> StateDict:
    """The frozen backbone's full state dict: the weights the checkpoint carries, else the backbone
    rebuilt from its config (``override``: another weights file)."""
    from ..models.factory import create_backbone

    if record.backbone_state is not None and override is None:
        return record.backbone_state
    bcfg = record.model_config.backbone.copy()
    bcfg.weights = backbone_weights(record.model_config, override, option="--backbone-weights PATH")
    return create_backbone(bcfg, trust_code=trust_code).full_state_dict()


__all__ = ["CheckpointRecord", "read_record", "local_checkpoint", "backbone_weights", "backbone_state",
           "WEIGHTS_NAME", "CONFIG_NAME", "SINGLE_FILE_FORMAT", "TOKENIZER_TENSOR", "BACKBONE_PREFIX", "BACKBONE_NAME"]
