"""``dinotxt embed``: image and caption embeddings of a data source in clip-retrieval's layout.

clip-retrieval's ``clip-retrieval inference`` writes, and its ``index`` step (autofaiss) and
``back`` server read::

    OUT/img_emb/img_emb_{i}.npy         (n_i, E) image embeddings, L2-normalised (float16, or --dtype float32)
    OUT/text_emb/text_emb_{i}.npy       (n_i, E) caption embeddings, same rows
    OUT/metadata/metadata_{i}.parquet   image_path, caption (+ key, uid, shard), same rows  <- written LAST
    OUT/embed.json                      the settings the parts depend on, and each finished part's counts

Part ``i`` holds the samples at positions ``[i * part_size, (i + 1) * part_size)`` of the source in
reading order (shards as listed or sorted, members in file order; manifest rows in order), less
the samples that cannot be embedded (no caption, no image, an image that does not decode),
which are counted per part. ``{i}`` is zero-padded as clip-retrieval pads it (to the digits of
the number of parts). Every file is written atomically and a part's parquet table comes last,
so a part whose table exists is complete: a rerun skips those parts (whole shards without
reading them when all their samples fall in finished parts) and continues with the rest. The
settings the embeddings depend on (model weights and config, data, part size, dtype) are
recorded in ``embed.json``; a rerun with other settings stops instead of mixing two kinds of parts.

The layout needs the number of samples before the first part is written: a local shard's come from its
tar headers, a manifest's from its rows, and a streamed shard (``pipe:COMMAND``, a URL) is read through
once to count them (on ``num_workers`` threads) and again for its embeddings; a rerun into the same
folder takes those counts from ``embed.json`` instead, and stops if a shard it reads holds more samples
than counted (the source changed).

The embeddings are the model's ``encode_image(transform(image), normalize=True)`` on the
evaluation transform and ``encode_text(tokenizer(caption), normalize=True)``, ``batch_size``
samples per forward, images decoded on ``num_workers`` threads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from ..data.sources import is_pipe, is_url, iter_tar_samples, member_key
from ..data.stream import decode_image
from ..data.units import DataUnit, data_units, iter_unit
from ..utils.fileio import atomic_output, atomic_write_json

log = logging.getLogger(__name__)

DTYPES = {"float16": np.float16, "float32": np.float32}
STATE_NAME = "embed.json"


def part_name(i: int, num_parts: int) -> str:
    """clip-retrieval's zero padding: ``str(i).zfill(int(log10(number of parts)) + 1)``."""
    return str(i).zfill(int(math.log10(max(1, num_parts))) + 1)


def part_paths(out: Union[str, Path], i: int, num_parts: int) -> Dict[str, Path]:
    out, name = Path(out), part_name(i, num_parts)
    return {"img": out / "img_emb" / f"img_emb_{name}.npy", "text": out / "text_emb" / f"text_emb_{name}.npy",
            "meta": out / "metadata" / f"metadata_{name}.parquet"}


def _count_samples(unit: DataUnit) -> int:
    """Samples in a local unit without reading their data (tar headers only); what ``iter_unit`` yields."""
    if unit.is_manifest:
        return unit.stop - unit.start
    count, last = 0, None
    try:
        with tarfile.open(unit.path, "r:*") as tar:
            for member in tar:
                named = member_key(member)
                if named is not None and named[0] != last:
                    count, last = count + 1, named[0]
    except (tarfile.TarError, OSError, EOFError):
        pass  # a damaged shard: iter_unit yields what it can read and counts the damage
    return count


def _is_streamed(unit: DataUnit) -> bool:
    """A ``pipe:`` or URL shard: read front to back as a stream, its size unknown until read."""
    return not unit.is_manifest and (is_pipe(unit.path) or is_url(unit.path))


def _count_streamed(unit: DataUnit) -> int:
    """Samples in a streamed shard, counted by reading it through as ``iter_unit`` will (its damage is
    counted when it is read for the embeddings, not here)."""
    return sum(1 for _ in iter_tar_samples(unit.path, {}))


def _recorded_counts(out: Path, units: List[DataUnit]) -> Optional[List[int]]:
    """The per-unit sample counts ``out``'s ``embed.json`` recorded for these same units, if it has them."""
    try:
        data = json.loads((out / STATE_NAME).read_text())["settings"]["data"]
        if [(d["name"], d["start"], d["stop"]) for d in data] == [(u.name, u.start, u.stop) for u in units]:
            return [int(d["samples"]) for d in data]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _count_units(units: List[DataUnit], out: Path, num_workers: int) -> List[int]:
    """Samples per unit: local shards from their tar headers, manifests from their rows, streamed shards
    (``pipe:``, URLs) read through on ``num_workers`` threads, or taken from ``out``'s record on a rerun."""
    counts: List[Optional[int]] = [None if _is_streamed(u) else _count_samples(u) for u in units]
    streamed = [i for i, c in enumerate(counts) if c is None]
    if not streamed:
        return counts
    recorded = _recorded_counts(out, units)
    if recorded is not None:
        return [recorded[i] if c is None else c for i, c in enumerate(counts)]
    log.info(f"counting the samples of {len(streamed)} streamed shard(s); they are read again for the embeddings")
    with ThreadPoolExecutor(max(1, min(int(num_workers), len(streamed)))) as pool:
        for i, count in zip(streamed, pool.map(_count_streamed, [units[i] for i in streamed])):
            counts[i] = count
    return counts


def _fingerprint(model, checkpoint: str, units: List[DataUnit], counts: List[int], part_size: int, dtype: str,
                 text: bool) -> Dict[str, Any]:
    digest = hashlib.sha256()
    for key, value in sorted(model.trainable_state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"checkpoint": checkpoint,
            "model": OmegaConf.to_container(model.config, resolve=True),
            "weights_sha256": digest.hexdigest(),
            "data": [{"name": u.name, "start": u.start, "stop": u.stop, "samples": c} for u, c in zip(units, counts)],
            "part_size": int(part_size), "dtype": dtype, "text": bool(text)}


def _check_state(out: Path, settings: Dict[str, Any]) -> Dict[str, Any]:
    path = out / STATE_NAME
    if not path.is_file():
        return {"settings": settings, "parts": {}}
    state = json.loads(path.read_text())
    old = state.get("settings", {})
    for key in ("weights_sha256", "model", "data", "part_size", "dtype", "text"):
        if old.get(key) != settings[key]:
            what = {"weights_sha256": "model weights", "model": "model config"}.get(key, key.replace("_", " "))
            shown = "" if key in ("weights_sha256", "model", "data") else f" ({old.get(key)} there, {settings[key]} now)"
            raise ValueError(f"{out} holds embeddings made with another {what}{shown}; use a new --out, or the "
                             "same settings to continue it")
    return state


def _write_part(paths: Dict[str, Path], img: List[np.ndarray], txt: List[np.ndarray], rows: Dict[str, list],
                dtype, dim: int, text: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def save(path: Path, chunks: List[np.ndarray]) -> None:
        array = np.concatenate(chunks) if chunks else np.zeros((0, dim), dtype=dtype)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:  # a file object, or np.save appends ".npy" to the temporary name
                np.save(f, np.ascontiguousarray(array.astype(dtype)))

    save(paths["img"], img)
    if text:
        save(paths["text"], txt)
    table = pa.table({"image_path": pa.array(rows["image_path"], pa.string()),
                      "caption": pa.array(rows["caption"], pa.string()),
                      "key": pa.array(rows["key"], pa.string()),
                      "uid": pa.array(rows["uid"], pa.int64()),
                      "shard": pa.array(rows["shard"], pa.string())})
    with atomic_output(paths["meta"]) as tmp:
        pq.write_table(table, str(tmp))


def _samples(units: List[DataUnit], counts: List[int], fmt, done: set, part_size: int, errors: Dict[str, int]
             ) -> Iterator[Tuple[int, Any, DataUnit]]:
    """(position, sample, unit) of every sample whose part is not done; units entirely inside finished
    parts are not read."""
    start = 0
    for unit, count in zip(units, counts):
        parts = range(start // part_size, (start + max(count, 1) - 1) // part_size + 1)
        if count and all(p in done for p in parts):
            start += count
            continue
        position = start
        for sample in iter_unit(unit, fmt, errors):
            if position - start >= count:  # later samples would take the positions of the next unit's
                raise ValueError(f"shard {unit.name} now holds more than the {count} samples counted for it: the "
                                 "source changed since it was counted (or since the output folder was started); "
                                 "use a new --out")
            if position // part_size not in done:
                yield position, sample, unit
            position += 1
        start += count


def _check_arguments(dtype: str, part_size: int, batch_size: int) -> None:
    """Refuse an unknown dtype, sizes below 1 and a missing pyarrow, before any work."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use {' or '.join(DTYPES)}")
    if part_size < 1 or batch_size < 1:
        raise ValueError("--part-size and --batch-size must be at least 1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("dinotxt embed writes parquet metadata: pip install pyarrow (in the [train] extra)") from None


@dataclass
class _Embedder:
    """What every batch needs: the model, its transform and tokenizer, where they run, how rows are stored."""

    model: Any
    transform: Any
    tokenizer: Any
    device: str
    pool: Optional[ThreadPoolExecutor]
    np_dtype: Any
    text: bool


@dataclass
class _Output:
    """Where the parts go, how many there are, and the state recorded in ``embed.json`` after each."""

    out: Path
    num_parts: int
    dim: int
    state: Dict[str, Any]
    written: int = 0


@dataclass
class _Part:
    """One part being filled: its embeddings so far, the batch waiting, its rows and what was skipped."""

    index: int
    img: List[np.ndarray] = field(default_factory=list)
    txt: List[np.ndarray] = field(default_factory=list)
    batch: List[Tuple[Any, DataUnit]] = field(default_factory=list)
    skipped: Dict[str, int] = field(default_factory=dict)
    rows: Dict[str, list] = field(default_factory=lambda: {"image_path": [], "caption": [], "key": [], "uid": [],
                                                          "shard": []})


def _open_output(out: Path, settings: Dict[str, Any], num_parts: int) -> Tuple[Dict[str, Any], set]:
    """The state of ``out`` (new, or a matching earlier run's) and the parts already finished there."""
    state = _check_state(out, settings)
    done = {i for i in range(num_parts) if part_paths(out, i, num_parts)["meta"].is_file()}
    if done:
        log.info(f"{len(done)} of {num_parts} parts already in {out}; continuing")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STATE_NAME, state)
    return state, done


def _decode(transform, sample) -> Optional[torch.Tensor]:
    """The sample's image decoded and transformed, or None when it does not decode."""
    try:
        return transform(decode_image(sample.image))
    except Exception:  # PIL raises many types for broken files; all mean "skip it"
        return None


def _skip(part: _Part, reason: str, n: int = 1) -> None:
    """Count ``n`` samples of ``part`` that cannot be embedded, by reason."""
    part.skipped[reason] = part.skipped.get(reason, 0) + n


def _embed_batch(emb: _Embedder, part: _Part) -> None:
    """Embed the part's waiting batch (images decoded on the pool; the ones that fail are skipped) and add its rows."""
    batch, part.batch = part.batch, []
    if not batch:
        return
    samples = [s for s, _ in batch]
    images = list(emb.pool.map(lambda s: _decode(emb.transform, s), samples)) if emb.pool else \
        [_decode(emb.transform, s) for s in samples]
    keep = [(img, s, u) for img, (s, u) in zip(images, batch) if img is not None]
    if len(keep) < len(batch):
        _skip(part, "bad_image", len(batch) - len(keep))
    if not keep:
        return
    x = torch.stack([k[0] for k in keep]).to(emb.device)
    part.img.append(emb.model.encode_image(x, normalize=True).float().cpu().numpy().astype(emb.np_dtype))
    if emb.text:
        ids = emb.tokenizer([s.caption for _, s, _ in keep]).to(emb.device)
        part.txt.append(emb.model.encode_text(ids, normalize=True).float().cpu().numpy().astype(emb.np_dtype))
    for _, s, u in keep:
        part.rows["image_path"].append(s.raw.get("__path__") or s.key)
        part.rows["caption"].append(s.caption)
        part.rows["key"].append(s.key)
        part.rows["uid"].append(int(s.uid))
        part.rows["shard"].append(u.name)


def _finish_part(emb: _Embedder, output: _Output, part: _Part) -> None:
    """Embed what is left of the part, write its files (the table last) and record it in ``embed.json``."""
    _embed_batch(emb, part)
    paths = part_paths(output.out, part.index, output.num_parts)
    _write_part(paths, part.img, part.txt, part.rows, emb.np_dtype, output.dim, emb.text)
    output.state["parts"][part_name(part.index, output.num_parts)] = {"rows": len(part.rows["uid"]),
                                                                      "skipped": part.skipped}
    atomic_write_json(output.out / STATE_NAME, output.state)
    output.written += 1
    log.info(f"part {part.index + 1}/{output.num_parts}: {len(part.rows['uid'])} samples -> {paths['meta'].name}")


def _embed_parts(emb: _Embedder, output: _Output, samples: Iterator[Tuple[int, Any, DataUnit]], part_size: int,
                 batch_size: int) -> None:
    """Embed the samples in batches, part by part, writing each part when the next one starts."""
    part: Optional[_Part] = None
    for position, sample, unit in samples:
        index = position // part_size
        if part is None or index != part.index:
            if part is not None:
                _finish_part(emb, output, part)
            part = _Part(index)
        if sample.caption is None or sample.image is None:
            _skip(part, "no_caption" if sample.caption is None else "no_image")
            continue
        part.batch.append((sample, unit))
        if len(part.batch) >= batch_size:
            _embed_batch(emb, part)
    if part is not None:
        _finish_part(emb, output, part)


def _fill_unread_parts(emb: _Embedder, output: _Output, total: int, part_size: int) -> None:
    """Write the parts no sample reached (a source shorter than its count, a damaged shard) empty, as unread."""
    for i in range(output.num_parts):
        if not part_paths(output.out, i, output.num_parts)["meta"].is_file():
            _finish_part(emb, output, _Part(i, skipped={"unread": min(part_size, total - i * part_size)}))


def _record_source_errors(output: _Output, errors: Dict[str, int]) -> None:
    """Add the damage found in the source to ``embed.json``'s running totals, and warn."""
    if not errors:
        return
    state = output.state
    state["source_errors"] = {k: state.get("source_errors", {}).get(k, 0) + v for k, v in errors.items()}
    atomic_write_json(output.out / STATE_NAME, state)
    log.warning(f"damaged data: {errors}; the samples before the damage were embedded")


def _report(output: _Output, start_time: float) -> Dict[str, Any]:
    """What ``embed_dataset`` returns: the rows and skips of all parts, the parts written now, the time."""
    parts = output.state["parts"].values()
    skipped: Dict[str, int] = {}
    for p in parts:
        for k, v in p["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return {"out": str(output.out), "parts": output.num_parts, "parts_written": output.written,
            "samples": sum(p["rows"] for p in parts), "skipped": skipped,
            "seconds": round(time.time() - start_time, 1)}


@torch.no_grad()
def embed_dataset(checkpoint: str, data: Union[str, List[str]], out: Union[str, Path], batch_size: int = 256,
                  part_size: int = 100_000, dtype: str = "float16", num_workers: int = 4, device: Optional[str] = None,
                  backbone_weights: Optional[str] = None, trust_code: bool = False, text: bool = True,
                  cache_dir: Optional[str] = None, fmt=None) -> Dict[str, Any]:
    """Write the embeddings of ``data`` (shards or a manifest) by ``checkpoint`` to ``out``; see the module
    docstring. Returns ``{"out", "parts", "parts_written", "samples", "skipped", "seconds"}``."""
    from ..checkpoint import load
    from ..config import DataConfig

    _check_arguments(dtype, part_size, batch_size)
    fmt = fmt if fmt is not None else OmegaConf.structured(DataConfig)
    out = Path(out)
    units = data_units(data, fmt, part_size, key="--data")
    counts = _count_units(units, out, num_workers)
    total = sum(counts)
    if total == 0:
        raise ValueError(f"--data {data}: no samples found")
    num_parts = math.ceil(total / part_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, transform, tokenizer = load(checkpoint, device=device, backbone_weights=backbone_weights,
                                       trust_code=trust_code, cache_dir=cache_dir)
    settings = _fingerprint(model, str(checkpoint), units, counts, part_size, dtype, text)
    state, done = _open_output(out, settings, num_parts)
    output = _Output(out, num_parts, int(model.embed_dim), state)
    pool = ThreadPoolExecutor(max(1, int(num_workers))) if num_workers > 0 else None
    emb = _Embedder(model, transform, tokenizer, device, pool, DTYPES[dtype], text)
    start_time, errors = time.time(), {}
    try:
        _embed_parts(emb, output, _samples(units, counts, fmt, done, part_size, errors), part_size, batch_size)
    finally:
        if pool:
            pool.shutdown()
    _fill_unread_parts(emb, output, total, part_size)
    _record_source_errors(output, errors)
    return _report(output, start_time)


def read_embeddings(out: Union[str, Path]) -> Dict[str, Any]:
    """``{"img": (N, E), "text": (N, E) or None, "metadata": {column: list}}`` of a folder written by
    ``embed_dataset`` (parts in order), for checks and small indexes."""
    import pyarrow.parquet as pq

    out = Path(out)
    img = sorted((out / "img_emb").glob("img_emb_*.npy"))
    if not img:
        raise FileNotFoundError(f"{out} has no img_emb/img_emb_*.npy")
    txt = sorted((out / "text_emb").glob("text_emb_*.npy"))
    meta = sorted((out / "metadata").glob("metadata_*.parquet"))
    tables = [pq.read_table(str(p)).to_pydict() for p in meta]
    return {"img": np.concatenate([np.load(p) for p in img]),
            "text": np.concatenate([np.load(p) for p in txt]) if txt else None,
            "metadata": {k: sum((t[k] for t in tables), []) for k in (tables[0] if tables else {})}}


__all__ = ["embed_dataset", "read_embeddings", "part_name", "part_paths", "DTYPES"]
