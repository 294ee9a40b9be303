"""``dinotxt cache RECIPE``: the feature cache, written by the feature extraction stage.

The job of the stage (``dinotxt.features.extract``): ``cache.views`` seeded crops of every
image (the run's training crops, or one eval crop), the frozen backbone's tokens of each
(every token, or ``[CLS, pooled patches]`` for a head without blocks), stored in fp16 / bf16
as one ``.bin`` + ``.json`` pair per source unit. The layout and what a cache depends on are
in ``dinotxt.data.feature_cache``, which training reads from.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from ..config import ConfigError
from ..data.feature_cache import (FORMAT_VERSION, META_NAME, STORAGE, backbone_fingerprint, cache_spec, cache_views,
                          source_difference, source_fingerprint, spec_difference, view_transform)
from ..data.stream import raw_caption
from ..data.units import DataUnit, UnitSample, data_units
from ..utils.fileio import atomic_output, atomic_write_json
from ..models.backbone import frozen_tokens
from ..models.vision_head import pool_frozen_tokens
from .extract import ExtractionJob, run_extraction

logger = logging.getLogger(__name__)


def shard_name(unit: DataUnit) -> str:
    return f"{unit.index:05d}"


class CacheJob(ExtractionJob):
    """Seeded views -> frozen tokens -> one cache shard per unit (tokens written before the index,
    so a shard is complete iff its index exists)."""

    def __init__(self, cfg: DictConfig, root: Path, token_shape: List[int], num_units: int, log: Callable[[str], None]):
        c = cfg.cache
        self.root, self.token_shape, self.num_units, self.log = root, token_shape, num_units, log
        self.transform, self.seed, self.num_views = view_transform(cfg), int(cfg.seed), int(c.views)
        self.pooled, self.dtype = c.tokens == "pooled", STORAGE[c.dtype][0]
        self.pooling, self.gem_p = cfg.model.vision_head.pooling, float(cfg.model.vision_head.gem_p)
        self.autocast = cfg.trainer.backbone_autocast
        self.caption_key, self.json_field = cfg.data.caption_key, cfg.data.caption_json_field
        self.written, self.done_now, self.start = 0, 0, time.time()
        self.skipped: Dict[str, int] = {}

    def views(self, image, sample: UnitSample) -> torch.Tensor:
        return cache_views(image, sample.key, self.transform, self.seed, self.num_views)

    def record(self, sample: UnitSample, unit: DataUnit) -> Dict[str, Any]:
        # the caption field as stored (several captions stay several: training draws one per step)
        return {"key": sample.key, "caption": raw_caption(sample.raw, self.caption_key, self.json_field)}

    def encode(self, backbone, images: torch.Tensor) -> torch.Tensor:
        tokens = frozen_tokens(backbone, images, self.autocast)
        if self.pooled:
            tokens = pool_frozen_tokens(tokens, backbone.num_prefix_tokens, self.pooling, self.gem_p)
        return tokens.to(self.dtype)

    def write(self, unit: DataUnit, samples, outputs: Optional[torch.Tensor], skipped: Dict[str, int]) -> None:
        name = shard_name(unit)
        rows = (outputs if outputs is not None else torch.zeros(0, *self.token_shape, dtype=self.dtype))
        rows = rows.reshape(len(samples), self.num_views, *self.token_shape)
        raw = rows.view(torch.int16) if self.dtype == torch.bfloat16 else rows  # numpy has no bfloat16
        with atomic_output(self.root / f"{name}.bin") as tmp:
            tmp.write_bytes(np.ascontiguousarray(raw.numpy()).tobytes())
        atomic_write_json(self.root / f"{name}.json", {"count": len(samples), "skipped": skipped,
                                                       "keys": [s["key"] for s in samples],
                                                       "captions": [s["caption"] for s in samples]})
        self.written += len(samples)
        self.done_now += 1
        for k, v in skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        rate = self.written * self.num_views / max(time.time() - self.start, 1e-9)
        self.log(f"cache shard {name}: {len(samples)} samples, {sum(skipped.values())} skipped "
                 f"({self.done_now} shards written now, {self.num_units} in all, {rate:.1f} images/s)")

    def done(self, unit: DataUnit) -> bool:
        name = shard_name(unit)
        return (self.root / f"{name}.json").is_file() and (self.root / f"{name}.bin").is_file()


def build_cache(cfg: DictConfig, device: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
                trust_code: bool = False, backbone: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Run the frozen backbone of ``cfg`` over ``data.train`` once and write ``cache.path``
    (``trust_code``: the recipe may name its backbone by import path).

    ``device``: ``cpu`` or ``cuda``; by default the GPUs Lightning finds (``cache.devices`` of them).
    Resumes a partial cache with the same spec; refuses a folder holding a cache with another
    spec. Returns a summary (samples, skipped, shards, bytes, seconds, images/s). ``backbone``: the run's
    frozen backbone when the caller already built it (training builds it once for the cache and the model).
    """
    from ..models.factory import create_backbone

    log = log or logger.info
    c, d = cfg.cache, cfg.data
    if not c.path:
        raise ConfigError("cache.path is not set: name the folder to write, e.g. `dinotxt cache RECIPE cache.path=runs/cache`")
    if d.train is None:
        raise ConfigError("no training data: set data.train to the shards or manifest to cache")
    root = Path(c.path)
    spec = cache_spec(cfg)
    units = data_units(d.train, d, c.samples_per_shard)
    source = source_fingerprint(cfg)
    if backbone is None:
        backbone = create_backbone(cfg.model.backbone, trust_code=trust_code)
    weights_hash = backbone_fingerprint(backbone)
    with torch.inference_mode():
        size = spec["backbone"]["img_size"]
        full = backbone(torch.zeros(1, 3, size, size)).shape
    token_shape = [2, int(full[-1])] if c.tokens == "pooled" else [int(full[1]), int(full[2])]
    meta = {"format": FORMAT_VERSION, "spec": spec, "weights_hash": weights_hash, "token_shape": token_shape,
            "source": source, "data": str(d.train),
            "shards": [{"name": shard_name(u), "source": u.path if not u.is_manifest else f"{u.name}[{u.start}:{u.stop}]"}
                       for u in units]}
    meta_path = root / META_NAME
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        found = spec_difference(old.get("spec"), spec) or source_difference(old.get("source"), source)
        if found:
            field, recorded, wanted = found
            raise ConfigError(f"{root} holds a feature cache built with {field}={recorded!r}, but the recipe asks for "
                              f"{wanted!r}; write to another cache.path or delete that folder")
        if old.get("weights_hash") != weights_hash:
            raise ConfigError(f"{root} holds a feature cache computed by a backbone with other weights; write to "
                              "another cache.path or delete that folder")
    atomic_write_json(meta_path, meta)

    job = CacheJob(cfg, root, token_shape, len(units), log=log)
    accelerator = {"cpu": "cpu", "cuda": "gpu"}.get(device or "", "auto")
    start = time.time()
    run_extraction(job, backbone, units, d, c.batch_size, num_workers=d.num_workers, accelerator=accelerator,
                   devices=c.devices if accelerator != "cpu" else 1, precision="32-true",
                   log=lambda m: log(f"feature cache {root}: {m}"), what="shards")
    elapsed = time.time() - start
    total = sum(int(json.loads((root / f"{shard_name(u)}.json").read_text())["count"]) for u in units)
    views = int(c.views)
    return {"path": str(root), "shards": len(units), "samples": total, "written_now": job.written, "views": views,
            "token_shape": token_shape, "dtype": c.dtype, "skipped_now": dict(job.skipped),
            "bytes": total * int(np.prod(token_shape)) * 2 * views, "seconds": round(elapsed, 1),
            "images_per_s": round(job.written * views / elapsed, 1) if elapsed > 0 and job.written else None}


__all__ = ["build_cache", "CacheJob"]
