"""Combine the two balancings and write the curated subset.

dino.txt keeps the pairs selected by BOTH the text balancing and the image balancing
(``intersection``); ``union`` and either modality alone are there for ablations. The
curated subset is written as

    curated/uids.npy          sorted int64 sample ids
    curated/manifest.parquet  one row per pair in pool order: uid, source (shard or image file), key,
                              caption (+ image_path for a manifest pool, so training reads it directly)
    curated/shards/*.tar      optional: the pairs' original tar members, renamed to the uid in hex,
                              in the img2dataset layout training reads (``data.train=.../shards``)

Shards are planned up front (pool order, ``samples_per_shard`` each) and written one by
one atomically, so a rerun writes only the missing ones.
"""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from dinotxt.fileio import add_tar_member, atomic_output

from dinotxt.data.units import DataUnit, iter_unit
from .store import save_npy, save_table


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


def write_subset(out_dir: Path, rows: np.ndarray, pool: Dict, units: List[DataUnit], pool_cfg,
                 write_shards: bool = False, samples_per_shard: int = 1000) -> Dict:
    """Write uids.npy, manifest.parquet and (optionally) shards for the pool ``rows``.

    Args:
        out_dir: destination folder.
        rows: sorted pool rows of the subset.
        pool: the pool index (``uid``, ``unit``, ``key``, ``caption``, ``source`` per row).
        units: the pool units (to re-read the samples for shards).
        pool_cfg: the recipe's ``pool`` section.
        write_shards: also write webdataset shards.
        samples_per_shard: pairs per written shard.
    """
    out_dir = Path(out_dir)
    rows = np.asarray(rows, dtype=np.int64)
    uids = pool["uid"][rows]
    save_npy(out_dir / "uids.npy", np.sort(uids))
    unit_of = pool["unit"][rows]
    columns = {"uid": uids, "source": [pool["source"][r] for r in rows], "key": [pool["key"][r] for r in rows],
               "caption": [pool["caption"][r] for r in rows]}
    if units and units[0].is_manifest:  # image files: ``data.train=curated/manifest.parquet`` trains on it directly
        columns["image_path"] = [str(Path(p).resolve()) for p in columns["source"]]
    save_table(out_dir / "manifest.parquet", columns)
    shards = 0
    if write_shards:
        shard_dir = out_dir / "shards"
        for i, start in enumerate(range(0, len(rows), samples_per_shard)):
            path = shard_dir / f"{i:06d}.tar"
            shards += 1
            if path.is_file():
                continue
            chunk = slice(start, start + samples_per_shard)
            wanted = {int(u): j for j, u in enumerate(uids[chunk])}
            _write_shard(path, wanted, [units[u] for u in np.unique(unit_of[chunk])], pool_cfg)
    return {"samples": int(len(rows)), "shards": shards}
