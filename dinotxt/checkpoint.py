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
``dinotxt push-to-hub``, fetched through the Hugging Face cache (``dinotxt.hub``).

Every file is written to a temporary name and renamed, so an interrupted save never
leaves a half-written checkpoint. Loading never unpickles objects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf

from .clip_tokenizer import BPE_FILENAME, ClipTokenizer
from .fileio import atomic_output, atomic_write_bytes
from .hf_tokenizer import HF_TOKENIZER_FILENAME, HFTokenizer
from .tokenizer import Tokenizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
TOKENIZER_NAME = "tokenizer.model"
# tokenizer kind -> file name inside a checkpoint folder
TOKENIZER_FILES = {"sentencepiece": TOKENIZER_NAME, "clip_bpe": BPE_FILENAME, "hf_tokenizer": HF_TOKENIZER_FILENAME}
SINGLE_FILE_FORMAT = "dinotxt-single-file"
TOKENIZER_TENSOR = "__tokenizer__"
BACKBONE_PREFIX = "backbone."
BACKBONE_NAME = "backbone.safetensors"  # optional, in a folder: the frozen backbone (FrozenBackbone.full_state_dict)


def tokenizer_kind(tokenizer) -> str:
    """``sentencepiece`` (``dinotxt.Tokenizer``), ``clip_bpe`` (``ClipTokenizer``) or ``hf_tokenizer``
    (``HFTokenizer``, a pretrained text encoder's own)."""
    kind = getattr(tokenizer, "kind", "sentencepiece")
    if kind not in TOKENIZER_FILES:
        raise ValueError(f"cannot save a tokenizer of kind '{kind}' (known: {', '.join(TOKENIZER_FILES)})")
    return kind


def tokenizer_file_bytes(tokenizer) -> bytes:
    """The bytes of the file that rebuilds ``tokenizer`` (SentencePiece model, BPE vocabulary or tokenizer.json)."""
    attribute = {"sentencepiece": "model_bytes", "clip_bpe": "bpe_bytes", "hf_tokenizer": "json_bytes"}
    return getattr(tokenizer, attribute[tokenizer_kind(tokenizer)])


def build_tokenizer(kind: str, data: Union[bytes, str, Path], context_length: int):
    """Rebuild a tokenizer from its kind and file (path or bytes)."""
    if kind == "clip_bpe":
        return ClipTokenizer(data, context_length=context_length)
    if kind == "sentencepiece":
        return Tokenizer(data, context_length=context_length)
    if kind == "hf_tokenizer":
        return HFTokenizer(data, context_length=context_length)
    raise ValueError(f"unknown tokenizer kind '{kind}' (known: {', '.join(TOKENIZER_FILES)}); written by a newer dinotxt?")


def _checkpoint_config(model, tokenizer, train_config: Optional[DictConfig] = None) -> DictConfig:
    kind = tokenizer_kind(tokenizer)
    cfg = OmegaConf.create({"model": model.config,
                            "tokenizer": {"kind": kind, "file": TOKENIZER_FILES[kind],
                                          "context_length": int(tokenizer.context_length)}})
    if train_config is not None:
        cfg["train"] = train_config
    return cfg


def save_checkpoint(directory: Union[str, Path], model, tokenizer, train_config: Optional[DictConfig] = None) -> Path:
    """Write a checkpoint folder (weights, config, tokenizer); ``tokenizer`` is a ``Tokenizer`` or ``ClipTokenizer``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg = _checkpoint_config(model, tokenizer, train_config)  # raises before anything is written
    state = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "dinotxt", "arch": str(cfg.model.arch)})
    atomic_write_bytes(directory / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True).encode())
    tokenizer.save(directory / cfg.tokenizer.file)
    return directory


def save_single_file(path: Union[str, Path], state: Dict[str, torch.Tensor], config: DictConfig,
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


def _single_file_metadata(path: Path) -> Optional[Dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def local_checkpoint(checkpoint: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None,
                     with_backbone: bool = True) -> Path:
    """The local path of a checkpoint: itself, or the Hugging Face cache folder of an ``hf-hub:`` name
    (without its ``backbone.safetensors`` unless ``with_backbone``)."""
    from .hub import hub_snapshot, is_hub_name

    if is_hub_name(checkpoint):
        return hub_snapshot(str(checkpoint), cache_dir, skip=() if with_backbone else (BACKBONE_NAME,))
    return Path(checkpoint)


def read_checkpoint(checkpoint: Union[str, Path], cache_dir: Optional[Union[str, Path]] = None):
    """(config with model + tokenizer sections, trainable state, tokenizer file bytes) of a folder, a single
    file or an ``hf-hub:`` name."""
    from safetensors.torch import load_file

    checkpoint = local_checkpoint(checkpoint, cache_dir, with_backbone=False)
    if checkpoint.is_file() and checkpoint.name != WEIGHTS_NAME:
        cfg, state, tok_bytes = read_single_file(checkpoint)
        return cfg, {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}, tok_bytes
    folder = checkpoint.parent if checkpoint.is_file() else checkpoint
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        if not folder.exists():
            raise FileNotFoundError(f"{folder} is not a dinotxt checkpoint: it does not exist")
        raise FileNotFoundError(f"{folder} is not a dinotxt checkpoint: expected {WEIGHTS_NAME} and {CONFIG_NAME} in it")
    cfg = OmegaConf.load(folder / CONFIG_NAME)
    if "model" not in cfg:
        raise ValueError(f"{folder / CONFIG_NAME} has no 'model' section; was it written by dinotxt?")
    kind = OmegaConf.select(cfg, "tokenizer.kind", default="sentencepiece")
    tok_name = OmegaConf.select(cfg, "tokenizer.file", default=TOKENIZER_FILES.get(kind, "tokenizer.model"))
    if not (folder / tok_name).is_file():
        raise FileNotFoundError(f"{folder} is not a complete dinotxt checkpoint: {tok_name} is missing")
    out = OmegaConf.create({"model": cfg.model, "tokenizer": {
        "kind": kind, "file": tok_name,
        "context_length": OmegaConf.select(cfg, "tokenizer.context_length", default=cfg.model.text.context_length)}})
    try:
        state = load_file(str(folder / WEIGHTS_NAME))
    except Exception as e:
        raise ValueError(f"cannot read {folder / WEIGHTS_NAME}: {e}") from None
    return out, state, (folder / tok_name).read_bytes()



def load(checkpoint: Union[str, Path], device: Union[str, torch.device] = "cpu", backbone_weights: Optional[str] = None,
         trust_code: bool = False, cache_dir: Optional[Union[str, Path]] = None):
    """Load a dinotxt checkpoint folder, single file or ``hf-hub:org/name[@revision]``. Returns
    ``(model, transform, tokenizer)``.

    ``backbone_weights`` points at the frozen backbone's weights file when it moved
    since training (the config records the original path); without it a folder's own
    ``backbone.safetensors`` is used when it has one. A checkpoint whose backbone is
    an import path ``package.module:factory`` is refused unless ``trust_code=True``: the
    checkpoint's author chose that code (``dinotxt.plugins``). ``cache_dir``: the Hugging
    Face cache for ``hf-hub:`` names (default: ``huggingface_hub``'s own).
    """
    from .hub import is_hub_name

    source = str(checkpoint)
    path = local_checkpoint(checkpoint, cache_dir, with_backbone=backbone_weights is None)
    if path.is_file() and path.name != WEIGHTS_NAME:
        return load_single_file(path, device, backbone_weights, trust_code)
    cfg, state, tok_bytes = read_checkpoint(path)
    tokenizer = build_tokenizer(cfg.tokenizer.kind, tok_bytes, cfg.model.text.context_length)
    folder = path.parent if path.is_file() else path
    backbone_state = None
    if backbone_weights is None and (folder / BACKBONE_NAME).is_file():
        from safetensors.torch import load_file

        backbone_state = load_file(str(folder / BACKBONE_NAME))
    return _assemble(cfg.model, state, tokenizer, device, backbone_weights, backbone_state=backbone_state,
                     trust_code=trust_code, source=source if is_hub_name(source) else str(folder / CONFIG_NAME))


def read_single_file(path: Union[str, Path]):
    """``(config, state, tokenizer file bytes)`` of a file written by ``save_single_file``; ``state``
    keeps the ``backbone.*`` tensors when the file has them."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = _single_file_metadata(path)
    if meta is None or meta.get("format") != SINGLE_FILE_FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not a dinotxt checkpoint: pass a checkpoint folder (with {WEIGHTS_NAME} and "
                         f"{CONFIG_NAME}) or a single file written by `dinotxt export --format safetensors`")
    cfg = OmegaConf.create(meta["config"])
    state = load_file(str(path))
    if TOKENIZER_TENSOR not in state:
        raise ValueError(f"{path} has no {TOKENIZER_TENSOR} tensor; the file is incomplete")
    return cfg, state, state.pop(TOKENIZER_TENSOR).numpy().tobytes()


def load_single_file(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                     backbone_weights: Optional[str] = None, trust_code: bool = False):
    """Load a file written by ``save_single_file``. Returns ``(model, transform, tokenizer)``."""
    cfg, state, tok_bytes = read_single_file(path)
    tokenizer = build_tokenizer(cfg.tokenizer.kind, tok_bytes, cfg.model.text.context_length)
    backbone = {k[len(BACKBONE_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(BACKBONE_PREFIX)]}
    return _assemble(cfg.model, state, tokenizer, device, backbone_weights, backbone_state=backbone or None,
                     trust_code=trust_code, source=str(path))


def _assemble(mcfg: DictConfig, state: Dict[str, torch.Tensor], tokenizer, device, backbone_weights: Optional[str],
              backbone_state: Optional[Dict[str, torch.Tensor]] = None, trust_code: bool = False,
              source: str = "checkpoint"):
    from .models.backbone import FrozenBackbone
    from .models.factory import create_model
    from .models.weights import resolve_weights
    from .models.backbone import names_code
    from .plugins import UntrustedCodeError
    from .transforms import eval_transform

    if names_code(mcfg.backbone.name) and not trust_code:  # before anything is imported or built
        raise UntrustedCodeError(
            f"{source}: model.backbone.name={mcfg.backbone.name!r} names code to import and call; load this "
            "checkpoint with trust_code=True (command line: --trust-code) only if you trust whoever made it")
    recorded = mcfg.backbone.weights
    if backbone_state is not None and backbone_weights is None:
        mcfg.backbone.weights = None  # the backbone travels in the file; the recorded path is not needed
    elif backbone_weights is not None:
        mcfg.backbone.weights = backbone_weights
    elif mcfg.backbone.weights and not resolve_weights(mcfg.backbone.weights).is_file():
        raise FileNotFoundError(
            f"the backbone weights this model was trained with are not at {mcfg.backbone.weights}; "
            "pass backbone_weights=PATH (CLI: --backbone-weights PATH)"
        )
    model = create_model(mcfg, trust_code=trust_code)
    if backbone_state is not None and backbone_weights is None:
        b = mcfg.backbone
        model.backbone = FrozenBackbone(b.name, weights=backbone_state, img_size=b.img_size, init_seed=b.init_seed,
                                        trust_code=trust_code, trainable_blocks=b.get("trainable_blocks", 0),
                                        **OmegaConf.to_container(b.kwargs))
        # the weights travel in the file; a config written from this model records the original file
        model.backbone.weights_file, model.backbone.rebuild_problem = recorded, None
    model.load_trainable_state_dict(state)
    model.eval().to(device)
    if tokenizer.vocab_size > mcfg.text.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the text tower only {mcfg.text.vocab_size}")
    return model, eval_transform(mcfg.backbone.img_size), tokenizer
