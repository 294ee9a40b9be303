"""Combine the two balancings and write the curated subset.

dino.txt keeps the pairs selected by BOTH the text balancing and the image balancing
(``intersection``); ``union`` and either modality alone are there for ablations. The
curated subset is written as

    curated/uids.npy          sorted int64 sample ids
    curated/manifest.parquet  one row per pair in pool order: uid, source (shard or image file), key,
                              caption (+ image_path for a manifest pool, so training reads it directly)
    curated/shards/*.tar      optional: the pairs' original tar members, renamed to the uid in hex,
                              in the img2dataset layout training reads (``data.train=.../shards``)
    curated/rows/, manifest/, uids/, uid_buckets/   the per-chunk parts these are assembled from

Each process writes the parts of its grid chunks; ``uids.npy`` is sorted through id buckets (each
bucket read from every part by binary search, sorted by one process) and both pool-wide files are
streamed together by rank 0, so no process holds the subset. Shards are planned up front (pool
order, ``samples_per_shard`` each) and written one by one atomically, each process its share,
so a rerun writes only the missing ones.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from dinotxt.data.units import DataUnit, iter_unit
from dinotxt.utils.fileio import add_tar_member, atomic_output

from .ranks import Ranks
from .store import (concatenate_npy, load_array, concatenate_tables, part_path, save_npy, save_table, uid_bucket,
                    uid_bucket_count)


def combine_selections(image_rows: Optional[np.ndarray], text_rows: Optional[np.ndarray], mode: str) -> np.ndarray:
    """Sorted pool rows selected under ``mode`` (intersection | union | image | text)."""
    if mode == "intersection":
        return np.intersect1d(image_rows, text_rows)
    if mode == "union":
        return np.union1d(image_rows, text_rows)
    if mode == "image":
        return np.unique(image_rows)
    if mode == "text":
        return np.unique(text_rows)
    raise ValueError(f"unknown combine mode {mode!r}: use intersection, union, image or text")


def uid_key(uid: int) -> str:
    """A sample's key in the curated shards: its uid as 16 hex digits (unique, and the uid can be read back)."""
    return f"{int(uid) & 0xFFFFFFFFFFFFFFFF:016x}"


def _write_shard(path: Path, wanted: Dict[int, int], units: List[DataUnit], pool_cfg) -> int:
    """Write the samples whose uid is in ``wanted`` (uid -> position in the shard) from ``units``."""
    found: Dict[int, Dict] = {}
    for unit in units:
        for sample in iter_unit(unit, pool_cfg, {}):
            if sample.uid in wanted and sample.uid not in found:
                found[sample.uid] = sample.raw
    missing = [u for u in wanted if u not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} curated samples (e.g. uid {missing[0]}) are no longer in the pool "
                                "shards; the pool changed since it was embedded")
    with atomic_output(path) as tmp:
        with tarfile.open(tmp, "w") as tar:
            for uid in sorted(wanted, key=wanted.get):
                raw, key = found[uid], uid_key(uid)
                if "__path__" in raw:  # manifest pool: the image file and the caption
                    with open(raw["__path__"], "rb") as f:
                        add_tar_member(tar, f"{key}{Path(raw['__path__']).suffix.lower() or '.jpg'}", f.read())
                    add_tar_member(tar, f"{key}.txt", str(raw["__caption__"]).encode("utf-8"))
                    continue
                for ext, data in raw.items():
                    if not ext.startswith("__"):
                        add_tar_member(tar, f"{key}.{ext}", data)
    return len(wanted)


def write_subset_parts(ranks: Ranks, out_dir: Path, parts: Dict[int, np.ndarray], num_parts: int, pool,
                       units: List[DataUnit], pool_cfg, write_shards: bool = False,
                       samples_per_shard: int = 1000) -> Dict:
    """Write a subset of the pool from per-chunk parts, each rank its own: per chunk its rows, its manifest rows
    and its sorted ids (``rows/``, ``manifest/``, ``uids/``); then the pool-wide files, ``uids.npy`` (sorted,
    through id buckets) and ``manifest.parquet`` (pool order, streamed part by part), and the shards (each
    rank its share, planned from the chunks' counts).

    Args:
        ranks: the processes.
        out_dir: destination folder.
        parts: ``{chunk: sorted pool rows of the subset in that chunk}`` for this rank's chunks (a part already
            on disk is kept as it is).
        num_parts: chunks in all.
        pool: the pool's metadata (``embed.PoolIndex``).
        units: the pool units (to re-read the samples for shards).
        pool_cfg: the recipe's ``pool`` section.
        write_shards: also write webdataset shards.
        samples_per_shard: pairs per written shard.
    """
    out_dir = Path(out_dir)
    manifest_pool = bool(units) and units[0].is_manifest  # image files: the manifest trains on them directly
    counts = np.zeros(num_parts, dtype=np.int64)
    for j, rows in parts.items():
        rows = np.asarray(rows, dtype=np.int64)
        if not part_path(out_dir / "manifest", j, ".parquet").is_file():
            columns = pool.columns(rows)
            if manifest_pool:
                columns["image_path"] = [str(Path(p).resolve()) for p in columns["source"]]
            save_npy(part_path(out_dir / "rows", j), rows)
            save_npy(part_path(out_dir / "uids", j), np.sort(columns["uid"]))
            save_table(part_path(out_dir / "manifest", j, ".parquet"), columns)  # the chunk's done marker
        counts[j] = len(load_array(part_path(out_dir / "rows", j), mmap_mode="r"))
    counts = ranks.all_reduce(counts)
    ranks.barrier()  # every chunk's parts are on disk
    uid_parts = [part_path(out_dir / "uids", j) for j in range(num_parts)]
    buckets = uid_bucket_count(int(counts.sum()))
    for b in ranks.share(buckets, count=False):
        path = part_path(out_dir / "uid_buckets", b)
        if not path.is_file():
            save_npy(path, uid_bucket(uid_parts, b, buckets))
    ranks.barrier()

    def pool_wide() -> None:
        if not (out_dir / "uids.npy").is_file():
            concatenate_npy([part_path(out_dir / "uid_buckets", b) for b in range(buckets)], out_dir / "uids.npy")
        if not (out_dir / "manifest.parquet").is_file():
            concatenate_tables([part_path(out_dir / "manifest", j, ".parquet") for j in range(num_parts)],
                               out_dir / "manifest.parquet")
    ranks.on_zero(pool_wide)
    shards = 0
    if write_shards:
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        shards = -(-int(offsets[-1]) // samples_per_shard)
        for i in ranks.share(shards, count=False):
            path = out_dir / "shards" / f"{i:06d}.tar"
            if path.is_file():
                continue
            start, stop = i * samples_per_shard, min(int(offsets[-1]), (i + 1) * samples_per_shard)
            rows = _subset_rows(out_dir, offsets, start, stop)
            table = pool.columns(rows, ("uid",))
            unit_of = np.searchsorted(pool.offsets, rows, side="right") - 1
            wanted = {int(u): p for p, u in enumerate(table["uid"])}
            _write_shard(path, wanted, [units[u] for u in np.unique(unit_of)], pool_cfg)
        ranks.barrier()
    return {"samples": int(counts.sum()), "shards": shards}


def _subset_rows(out_dir: Path, offsets: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Pool rows at positions [start, stop) of the subset, read from the chunks' ``rows/`` parts."""
    first = int(np.searchsorted(offsets, start, side="right") - 1)
    pieces = []
    for j in range(first, len(offsets) - 1):
        if offsets[j] >= stop:
            break
        rows = load_array(part_path(out_dir / "rows", j), mmap_mode="r")
        pieces.append(np.array(rows[max(0, start - offsets[j]):stop - offsets[j]]))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def write_subset(out_dir: Path, rows: np.ndarray, pool, units: List[DataUnit], pool_cfg,
                 write_shards: bool = False, samples_per_shard: int = 1000) -> Dict:
    """Write uids.npy, manifest.parquet and (optionally) shards for the pool ``rows`` (sorted), in one process."""
    return write_subset_parts(Ranks(), out_dir, {0: np.asarray(rows, dtype=np.int64)}, 1, pool, units, pool_cfg,
                              write_shards, samples_per_shard)
