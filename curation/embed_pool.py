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

    embed/uids/000000.npy       the unit's sample ids, sorted (the pool-wide uniqueness check reads them)
    embed/rows.npy              samples per unit: where each unit's rows start in the pool (``PoolIndex``)

The image pass is a job of dinotxt's one feature-extraction stage (``dinotxt.features.extract``,
the stage that also writes the feature cache): Lightning's predict loop, where on several processes
(``torchrun`` / ``srun``, or ``embed.devices`` GPUs) each rank takes its own units and writes their
files, so nothing is gathered. A rerun embeds only the units without a ``.parquet``. The caption
pass is split by units too: the TF-IDF document frequencies are per-unit integer counts, summed over
the processes exactly.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dinotxt.config import model_config
from dinotxt.data.sources import shard_name
from dinotxt.data.units import DataUnit
from dinotxt.data.stream import SKIP_REASONS
from dinotxt.features.extract import ExtractionJob, run_extraction
from dinotxt.utils.fileio import atomic_write_json
from dinotxt.models.backbone import FrozenBackbone
from dinotxt.models.factory import create_backbone

from .ranks import Ranks
from .store import load_array, load_table, read_json, save_npy, save_npz, save_table, shard_paths, uid_bucket, uid_bucket_count
from .text_encoders import FEATURE_BITS, HashedTfidfEncoder, encode_checked, load_text_encoder

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
        self.written = 0  # units this process wrote

    def views(self, image, sample) -> torch.Tensor:
        return self.transform(image)[None]

    def encode(self, backbone, images: torch.Tensor) -> torch.Tensor:
        return pooled_embedding(backbone, images)

    def write(self, unit: DataUnit, samples, outputs, skipped: Dict[str, int]) -> None:
        emb = outputs.float().numpy() if outputs is not None else np.zeros((0, self.dim), np.float32)
        rows = {c: [s[c] for s in samples] for c in ("uid", "key", "caption", "source")}
        write_unit(self.out_dir, unit.index, emb, rows, skipped)  # looked up here, so a test can wrap it
        self.written += 1

    def done(self, unit: DataUnit) -> bool:
        return (self.out_dir / "meta" / f"{unit.index:06d}.parquet").is_file()


def pooled_cache_for(embed_cfg, units: List[DataUnit]):
    """The feature cache ``embed.from_cache`` names, checked to hold exactly what the embed stage
    computes: this backbone, one eval crop, ``[CLS, mean(patches)]``, the same shards in order."""
    from dinotxt.config import ConfigError
    from dinotxt.data.feature_cache import FeatureCache

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


def embed_from_cache(cfg, units: List[DataUnit], out_dir: Path, ranks: Ranks) -> int:
    """The embed stage's files from a pooled feature cache: ``normalize([CLS] ‖ mean)`` of the cached tokens,
    sample ids and captions as the image pass would give them (``dinotxt.data.units``), each rank its units."""
    import random

    from dinotxt.data.stream import extract_caption
    from dinotxt.data.units import sample_uid

    cache = pooled_cache_for(cfg.embed, units)
    job = EmbeddingJob(out_dir, None, 2 * cache.dim)
    for i in ranks.share(len(units), count=False):
        unit, name = units[i], cache.names[i]
        if job.done(unit):
            continue
        index = cache.index(name)
        tokens = torch.from_numpy(np.array(cache.array(name))).view(cache.torch_dtype).float()[:, 0]  # (n, 2, D)
        emb = F.normalize(tokens.flatten(1), dim=-1).numpy()
        uids = [sample_uid(unit.name, k) for k in index["keys"]]
        captions = [extract_caption({"__caption__": c}, rng=random.Random(u)) for c, u in zip(index["captions"], uids)]
        write_unit(out_dir, unit.index, emb, {"uid": uids, "key": index["keys"], "caption": captions,
                                              "source": [unit.path] * len(uids)}, index.get("skipped", {}))
        job.written += 1
    return job.written


def launch_devices(e, ranks: Ranks):
    """Lightning's ``devices`` and ``num_nodes`` for the embed pass: under a launcher with several processes,
    one device per local process on each node (``embed.devices`` / ``embed.num_nodes`` = auto), which is what
    Lightning checks the launcher's world size against."""
    devices, nodes = e.devices, e.num_nodes
    if ranks.world > 1:
        devices = ranks.local_world if devices == "auto" else devices
        nodes = max(1, ranks.world // ranks.local_world) if nodes == "auto" else nodes
    return devices, 1 if nodes == "auto" else int(nodes)


def embed_images(cfg, units: List[DataUnit], out_dir: Path, trust_code: bool = False,
                 ranks: Optional[Ranks] = None) -> int:
    """Embed every unit without a finished metadata table, through the feature-extraction stage
    (``dinotxt.features.extract``), or read them from a pooled feature cache (``embed.from_cache``).
    Every rank returns the number of units it embedded."""
    from dinotxt.models.transforms import eval_transform

    ranks = ranks or Ranks()
    e = cfg.embed
    if e.from_cache:
        return embed_from_cache(cfg, units, out_dir, ranks)
    bcfg = backbone_config(e)
    backbone = create_backbone(bcfg, trust_code=trust_code)  # seeded like create_model: curation and training see one encoder
    precision = e.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and e.accelerator in ("auto", "gpu", "cuda") else "32-true"
    job = EmbeddingJob(out_dir, eval_transform(bcfg.img_size), 2 * backbone.embed_dim)
    devices, num_nodes = launch_devices(e, ranks)
    run_extraction(job, backbone, units, cfg.pool, e.batch_size, e.num_workers, e.accelerator, devices,
                   precision, log=lambda m: log.info(f"embed: {m}"), verb="embed", num_nodes=num_nodes)
    return job.written


def index_units(embed_dir: Path, units: List[DataUnit], ranks: Ranks) -> Dict:
    """After the image pass: every unit's sorted ids (``uids/``, by the ranks, per unit), the samples per unit
    (``rows.npy``, rank 0), and the check that no two samples of the pool share an id (by id buckets, so no
    process holds the pool's ids). Returns the pool's sample count."""
    for u in ranks.share(len(units), count=False):
        path = embed_dir / "uids" / f"{u:06d}.npy"
        if not path.is_file():
            save_npy(path, np.sort(load_table(embed_dir / "meta" / f"{u:06d}.parquet", ["uid"])["uid"].astype(np.int64)))

    def rows() -> np.ndarray:
        counts = np.array([read_json(embed_dir / "meta" / f"{u.index:06d}.json")["rows"] for u in units],
                          dtype=np.int64)
        save_npy(embed_dir / "rows.npy", counts)
        return counts
    ranks.barrier()  # every unit's ids are on disk
    counts = ranks.on_zero(rows)
    parts = [embed_dir / "uids" / f"{u:06d}.npy" for u in range(len(units))]
    buckets = uid_bucket_count(int(counts.sum()))
    error = None
    for b in ranks.share(buckets, count=False):
        ids = uid_bucket(parts, b, buckets)
        same = np.flatnonzero(ids[1:] == ids[:-1])
        if len(same) and error is None:
            error = ValueError(_shared_id_message(int(ids[same[0]]), embed_dir, units, parts))
    ranks.raise_together(error)
    return {"samples": int(counts.sum())}


def _shared_id_message(uid: int, embed_dir: Path, units: List[DataUnit], parts: List[Path]) -> str:
    where = []
    for u, path in enumerate(parts):
        ids = load_array(path, mmap_mode="r")
        i = int(np.searchsorted(ids, uid))
        if i < len(ids) and ids[i] == uid:
            table = load_table(embed_dir / "meta" / f"{u:06d}.parquet", ["uid", "key", "source"])
            where += [f"{s}:{k}" for k, s, x in zip(table["key"], table["source"], table["uid"]) if x == uid]
    return (f"two samples share the id {uid} ({' and '.join(where[:2])}); give every sample of a shard a unique key "
            "and every shard a unique file name")


def embed_texts(cfg, units: List[DataUnit], embed_dir: Path, text_dir: Path, trust_code: bool = False,
                ranks: Optional[Ranks] = None) -> Dict:
    """Caption embeddings per unit from the captions in the metadata tables (no image is read again), each
    rank its share of the units. The hashed TF-IDF's document frequencies are counted per unit
    (``df/``), summed over the processes as integers, and turned into ``idf.npy`` once."""
    ranks = ranks or Ranks()
    e = cfg.embed

    def captions(u: int) -> List[str]:
        return load_table(embed_dir / "meta" / f"{u:06d}.parquet", ["caption"])["caption"]

    encoder = load_text_encoder(e.text_encoder, e.text_dim, e.text_ngrams, e.text_kwargs, trust_code)
    if isinstance(encoder, HashedTfidfEncoder):
        idf_path = text_dir / "idf.npy"
        if not ranks.on_zero(idf_path.is_file):  # IDF over the whole pool first: every unit gets the same weights
            df, n = np.zeros(1 << FEATURE_BITS, dtype=np.int64), 0
            for u in ranks.share(len(units), count=False):
                path = text_dir / "df" / f"{u:06d}.npz"
                if not path.is_file():
                    ids, counts, rows = encoder.document_frequency(captions(u))
                    save_npz(path, {"ids": ids, "counts": counts, "rows": np.array([rows], np.int64)})
                with load_array(path) as part:
                    df[part["ids"]] += part["counts"]
                    n += int(part["rows"][0])
            df = ranks.all_reduce(df)
            n = int(ranks.all_reduce(np.array([n], np.int64))[0])
            encoder.set_document_frequency(df, n)
            ranks.on_zero(save_npy, idf_path, encoder.idf)
        encoder.idf = load_array(idf_path)
    width = encode_checked(encoder, ["a photo"], e.text_encoder).shape[1]  # every shard must have this width
    outs = shard_paths(text_dir, len(units))
    for u in ranks.share(len(units)):
        if outs[u].is_file():
            continue
        texts = captions(u)
        chunks = [encode_checked(encoder, texts[i:i + e.text_batch_size], e.text_encoder, width)
                  for i in range(0, len(texts), e.text_batch_size)]
        emb = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
        save_npy(outs[u], emb.astype(np.float16))
    return {"encoder": e.text_encoder, "dim": int(width)}


class PoolIndex:
    """The embedded pool's metadata, read where it lies: one parquet table per unit (``embed/meta``), rows in
    pool order (row i of the pool = row i of the concatenated embedding shards). Nothing pool-wide is held but
    the samples-per-unit offsets; ``columns(rows, names)`` reads the units those rows live in.

    Args:
        embed_dir: the embed stage's folder.
        units: the pool units.
    """

    def __init__(self, embed_dir: Path, units: List[DataUnit]):
        self.embed_dir, self.units = Path(embed_dir), units
        if (self.embed_dir / "rows.npy").is_file():
            counts = load_array(self.embed_dir / "rows.npy")
        else:  # embedded by an earlier version, which wrote no rows.npy
            counts = np.array([read_json(self.embed_dir / "meta" / f"{u.index:06d}.json")["rows"]
                               for u in units], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self._cached: Dict[int, Dict] = {}

    def __len__(self) -> int:
        return self.n

    def table(self, unit: int) -> Dict:
        """The unit's whole metadata table (the last few are kept)."""
        if unit not in self._cached:
            if len(self._cached) >= 4:
                self._cached.pop(next(iter(self._cached)))
            self._cached[unit] = load_table(self.embed_dir / "meta" / f"{unit:06d}.parquet")
        return self._cached[unit]

    def columns(self, rows: np.ndarray, names=("uid", "key", "caption", "source")) -> Dict:
        """The columns ``names`` of the pool ``rows`` (sorted): int64 arrays for uid/unit, lists for the text."""
        rows = np.asarray(rows, dtype=np.int64)
        unit_of = np.searchsorted(self.offsets, rows, side="right") - 1
        out: Dict[str, list] = {name: [] for name in names}
        bounds = np.flatnonzero(np.diff(unit_of)) + 1
        for piece in np.split(np.arange(len(rows)), bounds):
            if not len(piece):
                continue
            u = int(unit_of[piece[0]])
            table = self.table(u)
            local = rows[piece] - self.offsets[u]
            for name in names:
                column = table[name]
                out[name].append(column[local] if isinstance(column, np.ndarray) else [column[i] for i in local])
        return {name: (np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))
                if name in ("uid", "unit") else [x for p in parts for x in p] for name, parts in out.items()}

    def uids(self, rows: np.ndarray) -> np.ndarray:
        return self.columns(rows, ("uid",))["uid"]


def read_skipped(embed_dir: Path, units: List[DataUnit]) -> Dict[str, int]:
    """The samples the embed stage skipped, by reason (the reasons that occurred)."""
    total: Counter = Counter()
    for u in units:
        total.update(read_json(embed_dir / "meta" / f"{u.index:06d}.json")["skipped"])
    return {k: int(total[k]) for k in SKIP_REASONS if total.get(k)}
