"""Embed stage: image embeddings from the frozen backbone, caption embeddings from a text encoder.

Image embedding (dino.txt's curation works on the frozen DINOv2 features): the backbone's
last-layer tokens after its final norm, ``[CLS] ‖ mean(patches)`` (registers dropped),
L2-normalised over the whole vector, stored as float16. Images get the evaluation
transform (resize + center crop at the backbone's resolution, ImageNet normalisation).

Layout, one file per pool unit (shard, or slice of manifest rows)::

    embed/image/000000.npy      (n, 2D) float16
    embed/meta/000000.json      samples skipped in that unit, by reason
    embed/meta/000000.parquet   uid, key, caption, source, unit   <- written LAST: the unit's done marker
    embed_text/idf.npy          hashed TF-IDF weights fitted on the pool's captions
    embed_text/000000.npy       (n, text_dim) float16

The image pass is a job of dinotxt's one feature-extraction stage (``dinotxt.features.extract``,
the stage that also writes the feature cache): Lightning's predict loop, where on several GPUs
(``embed.devices``) each rank takes its own units and writes their files, so nothing is
gathered. A rerun embeds only the units without a ``.parquet``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dinotxt.config import model_config
from dinotxt.data.sources import shard_name
from dinotxt.data.units import DataUnit
from dinotxt.features.extract import SKIP_REASONS, ExtractionJob, run_extraction
from dinotxt.fileio import atomic_write_json
from dinotxt.models.backbone import FrozenBackbone
from dinotxt.models.factory import create_backbone

from .store import load_table, save_npy, save_table, shard_paths
from .text_encoders import HashedTfidfEncoder, encode_checked, load_text_encoder

log = logging.getLogger(__name__)


def backbone_config(embed_cfg):
    """BackboneConfig of registry entry ``embed.model`` with the ``embed.backbone`` overrides."""
    overrides = {k: v for k, v in OmegaConf.to_container(embed_cfg.backbone).items() if v is not None}
    return model_config(embed_cfg.model, {"backbone": overrides} if overrides else None).backbone


def pooled_embedding(backbone: FrozenBackbone, images: torch.Tensor) -> torch.Tensor:
    """``normalize([CLS] ‖ mean(patches))`` in float32, shape (B, 2D)."""
    cls, _, patches = backbone.split_tokens(backbone(images))
    return F.normalize(torch.cat([cls, patches.mean(1)], dim=-1).float(), dim=-1)


def write_unit(out_dir: Path, unit: int, embeddings: np.ndarray, rows: Dict[str, list], skipped: Dict[str, int]) -> None:
    """The unit's embeddings, its skip counts, then its metadata table (uid, key, caption, source: the done marker)."""
    name = f"{unit:06d}"
    save_npy(out_dir / "image" / f"{name}.npy", embeddings.astype(np.float16))
    atomic_write_json(out_dir / "meta" / f"{name}.json", {"skipped": skipped, "rows": int(len(rows["uid"]))})
    save_table(out_dir / "meta" / f"{name}.parquet", {
        "uid": np.asarray(rows["uid"], dtype=np.int64), "key": rows["key"], "caption": rows["caption"],
        "source": rows["source"], "unit": np.full(len(rows["uid"]), unit, dtype=np.int32)})


class EmbeddingJob(ExtractionJob):
    """The curation job of the feature-extraction stage: one eval crop per image,
    ``normalize([CLS] ‖ mean(patches))``, one ``.npy`` + ``.json`` + ``.parquet`` per unit."""

    def __init__(self, out_dir: Path, transform, dim: int):
        self.out_dir, self.transform, self.dim = out_dir, transform, dim

    def views(self, image, sample) -> torch.Tensor:
        return self.transform(image)[None]

    def encode(self, backbone, images: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(backbone, images)

    def write(self, unit: DataUnit, samples, outputs, skipped: Dict[str, int]) -> None:
        emb = outputs.float().numpy() if outputs is not None else np.zeros((0, self.dim), np.float32)
        rows = {c: [s[c] for s in samples] for c in ("uid", "key", "caption", "source")}
        write_unit(self.out_dir, unit.index, emb, rows, skipped)  # looked up here, so a test can wrap it

    def done(self, unit: DataUnit) -> bool:
        return (self.out_dir / "meta" / f"{unit.index:06d}.parquet").is_file()


def pooled_cache_for(embed_cfg, units: List[DataUnit]):
    """The feature cache ``embed.from_cache`` names, checked to hold exactly what the embed stage
    computes: this backbone, one eval crop, ``[CLS, mean(patches)]``, the same shards in order."""
    from dinotxt.config import ConfigError
    from dinotxt.data.cache import FeatureCache

    cache = FeatureCache(embed_cfg.from_cache)
    spec, bcfg = cache.spec, backbone_config(embed_cfg)
    found = {"tokens": spec["tokens"], "pooling": (spec.get("pooling") or {}).get("kind"), "views": spec["views"],
             "transform": spec["transform"]["kind"]}
    wanted = {"tokens": "pooled", "pooling": "mean", "views": 1, "transform": "resize_center_crop"}
    for key, value in wanted.items():
        if found[key] != value:
            raise ConfigError(f"embed.from_cache={embed_cfg.from_cache} has {key}={found[key]!r}; the embed stage needs "
                              f"{value!r} (build it with cache.tokens=pooled cache.augment=false cache.views=1 and the "
                              "mean pooler)")
    b = spec["backbone"]
    for key in ("name", "img_size", "kwargs"):
        if b[key] != OmegaConf.to_container(bcfg)[key]:
            raise ConfigError(f"embed.from_cache={embed_cfg.from_cache} was computed with backbone {key}={b[key]!r}, "
                              f"the embed stage uses {OmegaConf.to_container(bcfg)[key]!r}")
    sources = [shard_name(s["source"]) for s in cache.meta["shards"]]
    if sources != [u.name for u in units]:
        raise ConfigError(f"embed.from_cache={embed_cfg.from_cache} covers other shards than pool.data "
                          f"({len(sources)} cached vs {len(units)} in the pool, first {sources[:1]} vs {units[0].name})")
    return cache


def embed_from_cache(cfg, units: List[DataUnit], out_dir: Path) -> None:
    """The embed stage's files from a pooled feature cache: ``normalize([CLS] ‖ mean)`` of the cached tokens,
    sample ids and captions as the image pass would give them (``dinotxt.data.units``)."""
    import random

    from dinotxt.data.stream import extract_caption
    from dinotxt.data.units import sample_uid

    cache = pooled_cache_for(cfg.embed, units)
    job = EmbeddingJob(out_dir, None, 2 * cache.dim)
    for unit, name in zip(units, cache.names):
        if job.done(unit):
            continue
        index = cache.index(name)
        tokens = torch.from_numpy(np.array(cache.array(name))).view(cache.torch_dtype).float()[:, 0]  # (n, 2, D)
        emb = F.normalize(tokens.flatten(1), dim=-1).numpy()
        uids = [sample_uid(unit.name, k) for k in index["keys"]]
        captions = [extract_caption({"__caption__": c}, rng=random.Random(u)) for c, u in zip(index["captions"], uids)]
        write_unit(out_dir, unit.index, emb, {"uid": uids, "key": index["keys"], "caption": captions,
                                              "source": [unit.path] * len(uids)}, index.get("skipped", {}))


def embed_images(cfg, units: List[DataUnit], out_dir: Path, trust_code: bool = False) -> bool:
    """Embed every unit without a finished metadata table, through the feature-extraction stage
    (``dinotxt.features.extract``), or read them from a pooled feature cache (``embed.from_cache``).
    Returns False on a non-zero rank of a multi-GPU run."""
    from dinotxt.transforms import eval_transform

    e = cfg.embed
    if e.from_cache:
        embed_from_cache(cfg, units, out_dir)
        return True
    bcfg = backbone_config(e)
    backbone = create_backbone(bcfg, trust_code=trust_code)  # seeded like create_model: curation and training see one encoder
    precision = e.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and e.accelerator in ("auto", "gpu", "cuda") else "32-true"
    job = EmbeddingJob(out_dir, eval_transform(bcfg.img_size), 2 * backbone.embed_dim)
    return run_extraction(job, backbone, units, cfg.pool, e.batch_size, e.num_workers, e.accelerator, e.devices,
                          precision, log=lambda m: log.info(f"embed: {m}"), verb="embed")


def embed_texts(cfg, units: List[DataUnit], embed_dir: Path, text_dir: Path, trust_code: bool = False) -> Dict:
    """Caption embeddings per unit from the captions in the metadata tables (no image is read again)."""
    e = cfg.embed
    meta = [embed_dir / "meta" / f"{u.index:06d}.parquet" for u in units]
    encoder = load_text_encoder(e.text_encoder, e.text_dim, e.text_ngrams, e.text_kwargs, trust_code)
    if isinstance(encoder, HashedTfidfEncoder):
        idf_path = text_dir / "idf.npy"
        if idf_path.is_file():
            encoder.idf = np.load(idf_path)
        else:  # IDF over the whole pool first, so every unit is encoded with the same weights
            encoder.fit(c for path in meta for c in load_table(path, ["caption"])["caption"])
            save_npy(idf_path, encoder.idf)
    width = encode_checked(encoder, ["a photo"], e.text_encoder).shape[1]  # every shard must have this width
    for path, out in zip(meta, shard_paths(text_dir, len(units))):
        if out.is_file():
            continue
        captions = load_table(path, ["caption"])["caption"]
        chunks = [encode_checked(encoder, captions[i:i + e.text_batch_size], e.text_encoder, width)
                  for i in range(0, len(captions), e.text_batch_size)]
        emb = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
        save_npy(out, emb.astype(np.float16))
    return {"encoder": e.text_encoder, "dim": int(width)}


def load_pool_index(embed_dir: Path, units: List[DataUnit]) -> Dict:
    """The embedded pool as one table in pool order (row i = row i of the concatenated embedding shards):
    ``uid``, ``unit`` (arrays), ``key``, ``caption``, ``source`` (lists). Sample ids must be unique."""
    columns: Dict[str, list] = {"uid": [], "unit": [], "key": [], "caption": [], "source": []}
    for u in units:
        table = load_table(embed_dir / "meta" / f"{u.index:06d}.parquet")
        for name in columns:
            columns[name].append(table[name])
    pool = {name: np.concatenate(parts) if name in ("uid", "unit") else [x for p in parts for x in p]
            for name, parts in columns.items()}
    pool["uid"] = pool["uid"].astype(np.int64)
    pool["unit"] = pool["unit"].astype(np.int64)
    values, counts = np.unique(pool["uid"], return_counts=True)
    if (counts > 1).any():
        dup = int(values[counts > 1][0])
        where = [f"{pool['source'][i]}:{pool['key'][i]}" for i in np.flatnonzero(pool["uid"] == dup)[:2]]
        raise ValueError(f"two samples share the id {dup} ({' and '.join(where)}); give every sample of a shard a "
                         "unique key and every shard a unique file name")
    return pool


def read_skipped(embed_dir: Path, units: List[DataUnit]) -> Dict[str, int]:
    total: Counter = Counter()
    for u in units:
        total.update(json.loads((embed_dir / "meta" / f"{u.index:06d}.json").read_text())["skipped"])
    return {k: int(total.get(k, 0)) for k in SKIP_REASONS}
