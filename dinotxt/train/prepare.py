"""The steps a run takes before ``Trainer.fit``, each explicit and each skipping when its output exists:
the feature cache (``prepare_feature_cache``), the tokenizer (``prepare_tokenizer``), and the config's
last resolution from that tokenizer (``fit_config_to_tokenizer``). ``dinotxt.train.run`` calls them in order.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from ..config import ConfigError
from ..data.feature_cache import cache_complete
from ..text import BPE_FILENAME, HF_TOKENIZER_FILENAME, ClipTokenizer, HFTokenizer, Tokenizer, train_tokenizer
from ..utils.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


def check_inputs(cfg: DictConfig, backbone: torch.nn.Module) -> None:
    """What the run reads, checked before anything is written: the training data exists (shards expand, a
    manifest is there), the zero-shot folder exists, and a finished feature cache fits this run's backbone,
    transform and data (else the message names the ``cache.path`` that would)."""
    from pathlib import Path

    from ..data.feature_cache import FeatureCache
    from ..data.sources import expand_shards, is_manifest

    spec = cfg.data.train
    if spec is not None and is_manifest(spec) and not Path(spec).is_file():
        raise FileNotFoundError(f"data.train={spec}: manifest not found")
    if spec is not None and not is_manifest(spec):
        expand_shards(spec)  # raises on missing shards
    if cfg.eval.zeroshot_dir and not Path(cfg.eval.zeroshot_dir).is_dir():
        raise FileNotFoundError(f"eval.zeroshot_dir={cfg.eval.zeroshot_dir} is not a folder (one sub-folder of "
                                "images per class); point it at one, or set eval.zeroshot_dir=null")
    if cfg.cache.path and cache_complete(cfg.cache.path):
        FeatureCache(cfg.cache.path).check_fits(cfg, backbone)
    elif not cfg.data.train:
        raise ConfigError("no training data: set data.train to the shards or manifest to train on"
                          + (f" (the feature cache {cfg.cache.path} is not complete)" if cfg.cache.path else ""))


def prepare_feature_cache(cfg: DictConfig, backbone: torch.nn.Module, trust_code: bool = False) -> Optional[dict]:
    """Build ``cache.path`` with the run's frozen ``backbone`` when the recipe trains on a cache that is not
    complete yet (one process: with several, ``dinotxt cache RECIPE`` first, as the loader says). Returns the
    cache's summary when it was built now, else None."""
    if not (cfg.cache.path and cfg.data.train) or cache_complete(cfg.cache.path):
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    from ..features.build_cache import build_cache

    log.info(f"feature cache {cfg.cache.path}: not complete, building it first (the frozen backbone runs once "
             "over data.train; `dinotxt cache RECIPE` does the same on its own)")
    summary = build_cache(cfg, trust_code=trust_code, backbone=backbone)
    log.info(f"feature cache {summary['path']}: the frozen backbone ran once over {summary['samples']:,} training "
             f"images x {summary['views']} views in {summary['seconds']:.0f} s; training reads its tokens from there")
    return summary


def prepare_tokenizer(cfg: DictConfig, run_dir: Path, init=None):
    """The run's tokenizer, kept in the run folder (so ``--resume`` uses the same one): the own tokenizer of
    ``model.text.pretrained``, the one the ``model.init_from`` weights bring, OpenAI's CLIP BPE
    (``tokenizer.kind=clip``), or SentencePiece (``tokenizer.path``, or trained on the captions)."""
    ctx = cfg.model.text.context_length
    if cfg.model.text.pretrained:
        return _pretrained_text_tokenizer(cfg, run_dir, init)
    kind, path = tokenizer_choice(cfg, init)
    if init is not None and (kind, path) != (cfg.tokenizer.kind, cfg.tokenizer.path):
        log.info(f"tokenizer: the {init.tokenizer_kind} tokenizer of model.init_from ({init.describe()})")
    if init is not None and init.tokenizer_bytes is not None:
        name = Tokenizer.filename if kind == "sentencepiece" else BPE_FILENAME
        if not (run_dir / name).is_file():
            atomic_write_bytes(run_dir / name, init.tokenizer_bytes)
    if kind == "clip":
        kept = run_dir / BPE_FILENAME
        tok = ClipTokenizer(kept if kept.is_file() else path, context_length=ctx)
        if not kept.is_file():
            tok.save(kept)
        return tok
    kept = run_dir / Tokenizer.filename
    if kept.is_file():
        return Tokenizer(kept, ctx)
    if path:
        tok = Tokenizer(path, ctx)
    else:
        from ..data.captions import training_captions

        captions = training_captions(cfg.data, cfg.tokenizer.max_sentences, cfg.cache.path)
        log.info(f"training a SentencePiece tokenizer on {len(captions):,} captions (vocab_size {cfg.tokenizer.vocab_size})")
        tok = train_tokenizer(captions, cfg.tokenizer.vocab_size, ctx)
    tok.save(kept)
    return tok


def tokenizer_choice(cfg: DictConfig, init=None):
    """``(tokenizer.kind, tokenizer.path)`` the run uses: the recipe's, or those of ``model.init_from``'s weights."""
    if init is None:
        return cfg.tokenizer.kind, cfg.tokenizer.path
    return ("clip" if init.tokenizer_kind == "clip_bpe" else "sentencepiece"), None


def _pretrained_text_tokenizer(cfg: DictConfig, run_dir: Path, init=None):
    """The own tokenizer of ``model.text.pretrained`` (its tokenizer.json, kept in the run folder)."""
    from ..models.pretrained_text import resolve_text_model

    t = cfg.model.text
    if init is not None:
        raise ConfigError("model.init_from and model.text.pretrained both name text weights; keep one of them")
    if cfg.tokenizer.kind != "sentencepiece" or cfg.tokenizer.path:
        raise ConfigError(f"model.text.pretrained brings its own tokenizer: remove tokenizer.kind={cfg.tokenizer.kind}"
                          + (f" / tokenizer.path={cfg.tokenizer.path}" if cfg.tokenizer.path else ""))
    path = run_dir / HF_TOKENIZER_FILENAME
    tok = HFTokenizer(path if path.is_file() else resolve_text_model(t.pretrained), t.context_length)
    if not path.is_file():
        tok.save(path)
    log.info(f"tokenizer: the own tokenizer of {t.pretrained} ({tok.vocab_size:,} ids, pad id {tok.pad_id})")
    return tok


def fit_config_to_tokenizer(cfg: DictConfig, tokenizer, init=None) -> DictConfig:
    """A copy of ``cfg`` whose text tower matches ``tokenizer`` (vocabulary size, padding id) and whose
    tokenizer section says where it came from: the config's last resolution before training."""
    cfg = cfg.copy()
    cfg.tokenizer.kind, cfg.tokenizer.path = tokenizer_choice(cfg, init)
    cfg.model.text.vocab_size = tokenizer.vocab_size
    if cfg.model.text.pretrained:
        cfg.model.text.pad_id = tokenizer.pad_id
    return cfg


__all__ = ["check_inputs", "prepare_feature_cache", "prepare_tokenizer", "tokenizer_choice", "fit_config_to_tokenizer"]
