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
from typing import Any, Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from ..text import TOKENIZER_FILES, build_tokenizer
from ..utils.log import error_line

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
    built_tokenizer: Any = field(default=None, repr=False)  # the tokenizer, rebuilt once when the record is read

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
        length = int(context_length or self.context_length)
        built = self.built_tokenizer
        if built is not None and int(built.context_length) == length:
            return built
        return build_tokenizer(self.tokenizer_kind, self.tokenizer_bytes, length)

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


def read_config_file(path: Path) -> DictConfig:
    """A checkpoint's ``config.yaml``; a file that is not YAML is one line naming it."""
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml's scanner / parser errors, undecodable bytes, a folder in its place
        raise ValueError(f"{path} is not a readable YAML config ({error_line(e)}); was it written by dinotxt?") from None


def _checked_config(cfg, where: str) -> DictConfig:
    """The config of a checkpoint with its model section checked against the schema (an unknown key or a value
    of the wrong type is one line naming the file) and its tokenizer section filled."""
    from ..config import ModelConfig, merge_config

    if not isinstance(cfg, DictConfig) or not isinstance(cfg.get("model"), DictConfig):
        raise ValueError(f"{where} has no 'model' section; was it written by dinotxt?")
    cfg.model = merge_config(OmegaConf.structured(ModelConfig), cfg.model, where)
    cfg.tokenizer = _tokenizer_section(cfg)
    return cfg


def check_tokenizer(kind: str, data: bytes, context_length: int, where: str):
    """The tokenizer a checkpoint's file rebuilds; a file that does not rebuild one is one line naming it."""
    if not data:
        raise ValueError(f"{where} is empty: the checkpoint's {kind} tokenizer file is damaged")
    try:
        return build_tokenizer(kind, data, context_length)
    except ImportError:
        raise
    except Exception as e:  # sentencepiece's RuntimeError, a bad gzip, a bad tokenizer.json
        raise ValueError(f"{where} is not a valid {kind} tokenizer file ({error_line(e)})") from None


def _load_tensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _check_file(folder: Path, name: str, missing: str) -> None:
    if (folder / name).is_dir():
        raise IsADirectoryError(f"{folder / name} is a folder where the checkpoint's file should be: the checkpoint "
                                "is damaged")
    if not (folder / name).is_file():
        raise FileNotFoundError(missing)


def _read_folder(folder: Path, tensors: bool, with_backbone: bool):
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is not a dinotxt checkpoint: it does not exist")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        _check_file(folder, name, f"{folder} is not a dinotxt checkpoint: expected {WEIGHTS_NAME} and {CONFIG_NAME} in it")
    cfg = _checked_config(read_config_file(folder / CONFIG_NAME), str(folder / CONFIG_NAME))
    tok_path = folder / str(cfg.tokenizer.file)
    _check_file(folder, str(cfg.tokenizer.file), f"{folder} is not a complete dinotxt checkpoint: "
                                                 f"{cfg.tokenizer.file} is missing")
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
    try:
        cfg = OmegaConf.create(meta["config"])
    except Exception as e:
        raise ValueError(f"{path}: the config in its metadata is not valid YAML ({error_line(e)})") from None
    cfg = _checked_config(cfg, f"{path} (its config)")
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
    record = CheckpointRecord(source, path, cfg, state, tok_bytes, backbone, meta)
    where = f"{path}[{TOKENIZER_TENSOR}]" if record.single_file else str(path / record.tokenizer_file)
    record.built_tokenizer = check_tokenizer(record.tokenizer_kind, tok_bytes, record.context_length, where)
    return record


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
