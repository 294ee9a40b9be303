"""Data in *units*, with a stable id for every sample: how the feature extraction stage (the
feature cache, the curation embeddings) and the curation stages walk a data source.

A source is the training-data format of dinotxt: webdataset shards in the img2dataset layout
(local, fsspec URLs or ``pipe:`` commands, ``dinotxt.data.sources``), or a CSV / TSV / parquet manifest. A unit is one shard, or a slice of manifest rows, so that
every output is sharded the same way, written atomically per unit, and a rerun skips the
units already done.

``fmt`` below is any settings object with the reading fields of ``data`` / ``pool`` sections:
``image_keys``, ``caption_key``, ``caption_json_field``, ``manifest_image_column``,
``manifest_caption_column``.

Sample ids: ``sample_uid`` hashes the shard's *file name* and the sample key (or the
manifest's file name, image path and caption) to an int64, so an id depends only on the
sample, never on reading order, worker split or the folder the pool was moved to. The
k-th repeat of a key inside one unit gets the key ``"<key>#k"``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .sources import expand_shards, is_manifest, iter_tar_samples, read_manifest, shard_name
from .stream import extract_caption


def sample_uid(unit_name: str, key: str) -> int:
    """Signed int64 id of sample ``key`` of the shard (or manifest) named ``unit_name``."""
    digest = hashlib.blake2b(f"{unit_name}\x00{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class DataUnit:
    """One shard, or the manifest rows ``[start, stop)``."""

    index: int
    name: str  # shard file name, or the manifest file name
    path: str
    start: int = 0
    stop: int = 0

    @property
    def is_manifest(self) -> bool:
        return self.stop > self.start


def data_units(spec, fmt, rows_per_unit: int, key: str = "data.train") -> List[DataUnit]:
    """The units of the source ``spec`` in a fixed order (shards as listed/sorted, manifest slices of
    ``rows_per_unit`` rows in row order); ``key`` names the setting in error messages."""
    if is_manifest(spec):
        rows = len(_manifest_rows(spec, fmt.manifest_image_column, fmt.manifest_caption_column))
        step = max(1, int(rows_per_unit))
        return [DataUnit(i, Path(spec).name, str(spec), start, min(rows, start + step))
                for i, start in enumerate(range(0, rows, step))]
    shards = expand_shards(list(spec) if not isinstance(spec, str) else spec, key=key)
    seen: Dict[str, str] = {}
    for s in shards:
        name = shard_name(s)  # a URL's or a pipe:cat's file name too, so served shards keep their sample ids
        if name in seen and seen[name] != s:
            raise ValueError(f"shards {seen[name]} and {s} have the same file name; sample ids are built from the "
                             "shard file name and the key, so rename one of them")
        seen[name] = s
    return [DataUnit(i, shard_name(s), s) for i, s in enumerate(shards)]


_MANIFEST_CACHE: Dict[Tuple[str, str, str], List[Tuple[str, str, str]]] = {}


def _manifest_rows(path: str, image_column: str, caption_column: str) -> List[Tuple[str, str, str]]:
    """(image path, caption, identity) per row; the identity (path relative to the manifest + caption, with
    ``#k`` on the k-th identical repeat) is what the uid hashes."""
    key = (str(Path(path).resolve()), image_column, caption_column)
    if key not in _MANIFEST_CACHE:
        _MANIFEST_CACHE.clear()  # one manifest at a time is all a run needs
        base = Path(path).parent
        seen: Dict[str, int] = {}
        rows = []
        for image, caption in read_manifest(path, image_column, caption_column):
            try:
                rel = str(Path(image).relative_to(base))
            except ValueError:
                rel = image
            rows.append((image, caption, _unique_keys(seen, f"{rel}\x00{caption}")))
        _MANIFEST_CACHE[key] = rows
    return _MANIFEST_CACHE[key]


def _unique_keys(keys: Dict[str, int], key: str) -> str:
    n = keys.get(key, 0)
    keys[key] = n + 1
    return key if n == 0 else f"{key}#{n}"


@dataclass
class UnitSample:
    """A raw sample: undecoded image bytes (None when absent) and its caption (None when missing or empty)."""

    uid: int
    key: str
    caption: Optional[str]
    image: Optional[bytes]
    raw: Dict  # the tar members (for rewriting shards), or {"__path__": image path}

    def missing(self) -> Optional[str]:
        """The reason this sample is skipped before any decoding (``no_caption``, ``no_image``, ``missing_file``:
        a manifest row whose image file cannot be read), or None."""
        if self.caption is None:
            return "no_caption"
        if self.image is None:
            return "missing_file" if "__path__" in self.raw else "no_image"
        return None


def iter_unit(unit: DataUnit, fmt, errors: Dict[str, int]) -> Iterator[UnitSample]:
    """Samples of one unit in file order. A truncated shard ends early with ``errors['corrupt_shard']``
    counted (by ``iter_tar_samples``); an unreadable manifest image yields ``image=None``."""
    seen: Dict[str, int] = {}
    image_keys = [k.lower() for k in fmt.image_keys]
    if unit.is_manifest:
        rows = _manifest_rows(unit.path, fmt.manifest_image_column, fmt.manifest_caption_column)
        for path, caption, ident in rows[unit.start:unit.stop]:
            uid = sample_uid(unit.name, ident)
            try:
                with open(path, "rb") as f:
                    image = f.read()
            except OSError:
                image = None
            text = extract_caption({"__caption__": caption}, rng=random.Random(uid))
            yield UnitSample(uid, ident.split("\x00")[0], text, image, {"__path__": path, "__caption__": caption})
        return
    for sample in iter_tar_samples(unit.path, errors):
        key = _unique_keys(seen, sample["__key__"])
        uid = sample_uid(unit.name, key)
        caption = extract_caption(sample, fmt.caption_key, fmt.caption_json_field, rng=random.Random(uid))
        image = next((sample[k] for k in image_keys if k in sample), None)
        yield UnitSample(uid, key, caption, image, sample)
