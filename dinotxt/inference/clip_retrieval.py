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
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from ..data.sources import member_key
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
    """Samples in a unit without reading their data (tar headers only); what ``iter_unit`` yields."""
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
            if position // part_size not in done:
                yield position, sample, unit
            position += 1
        start += count


@torch.no_grad()
def embed_dataset(checkpoint: str, data: Union[str, List[str]], out: Union[str, Path], batch_size: int = 256,
                  part_size: int = 100_000, dtype: str = "float16", num_workers: int = 4, device: Optional[str] = None,
                  backbone_weights: Optional[str] = None, trust_code: bool = False, text: bool = True,
                  cache_dir: Optional[str] = None, fmt=None) -> Dict[str, Any]:
    """Write the embeddings of ``data`` (shards or a manifest) by ``checkpoint`` to ``out``; see the module
    docstring. Returns ``{"out", "parts", "parts_written", "samples", "skipped", "seconds"}``."""
    from ..checkpoint import load
    from ..config import DataConfig

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use {' or '.join(DTYPES)}")
    if part_size < 1 or batch_size < 1:
        raise ValueError("--part-size and --batch-size must be at least 1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ImportError("dinotxt embed writes parquet metadata: pip install pyarrow (in the [train] extra)") from None
    fmt = fmt if fmt is not None else OmegaConf.structured(DataConfig)
    units = data_units(data, fmt, part_size, key="--data")
    counts = [_count_samples(u) for u in units]
    total = sum(counts)
    if total == 0:
        raise ValueError(f"--data {data}: no samples found")
    num_parts = math.ceil(total / part_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, transform, tokenizer = load(checkpoint, device=device, backbone_weights=backbone_weights,
                                       trust_code=trust_code, cache_dir=cache_dir)
    out = Path(out)
    state = _check_state(out, _fingerprint(model, str(checkpoint), units, counts, part_size, dtype, text))
    done = {i for i in range(num_parts) if part_paths(out, i, num_parts)["meta"].is_file()}
    if done:
        log.info(f"{len(done)} of {num_parts} parts already in {out}; continuing")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STATE_NAME, state)

    np_dtype, dim = DTYPES[dtype], int(model.embed_dim)
    pool = ThreadPoolExecutor(max(1, int(num_workers))) if num_workers > 0 else None
    start_time, written, errors = time.time(), 0, {}
    current: Optional[int] = None
    buf: Dict[str, Any] = {}

    def new_part(i: int) -> Dict[str, Any]:
        return {"part": i, "img": [], "txt": [], "batch": [], "skipped": {},
                "rows": {"image_path": [], "caption": [], "key": [], "uid": [], "shard": []}}

    def decode(sample):
        try:
            return transform(decode_image(sample.image))
        except Exception:  # PIL raises many types for broken files; all mean "skip it"
            return None

    def flush_batch(b: Dict[str, Any]) -> None:
        batch, b["batch"] = b["batch"], []
        if not batch:
            return
        images = list(pool.map(decode, [s for s, _ in batch])) if pool else [decode(s) for s, _ in batch]
        keep = [(img, s, u) for img, (s, u) in zip(images, batch) if img is not None]
        if len(keep) < len(batch):
            b["skipped"]["bad_image"] = b["skipped"].get("bad_image", 0) + len(batch) - len(keep)
        if not keep:
            return
        x = torch.stack([k[0] for k in keep]).to(device)
        b["img"].append(model.encode_image(x, normalize=True).float().cpu().numpy().astype(np_dtype))
        if text:
            ids = tokenizer([s.caption for _, s, _ in keep]).to(device)
            b["txt"].append(model.encode_text(ids, normalize=True).float().cpu().numpy().astype(np_dtype))
        for _, s, u in keep:
            b["rows"]["image_path"].append(s.raw.get("__path__") or s.key)
            b["rows"]["caption"].append(s.caption)
            b["rows"]["key"].append(s.key)
            b["rows"]["uid"].append(int(s.uid))
            b["rows"]["shard"].append(u.name)

    def finish(b: Dict[str, Any]) -> None:
        nonlocal written
        flush_batch(b)
        paths = part_paths(out, b["part"], num_parts)
        _write_part(paths, b["img"], b["txt"], b["rows"], np_dtype, dim, text)
        state["parts"][part_name(b["part"], num_parts)] = {"rows": len(b["rows"]["uid"]), "skipped": b["skipped"]}
        atomic_write_json(out / STATE_NAME, state)
        written += 1
        log.info(f"part {b['part'] + 1}/{num_parts}: {len(b['rows']['uid'])} samples -> {paths['meta'].name}")

    try:
        for position, sample, unit in _samples(units, counts, fmt, done, part_size, errors):
            part = position // part_size
            if part != current:
                if current is not None:
                    finish(buf)
                current, buf = part, new_part(part)
            if sample.caption is None or sample.image is None:
                reason = "no_caption" if sample.caption is None else "no_image"
                buf["skipped"][reason] = buf["skipped"].get(reason, 0) + 1
                continue
            buf["batch"].append((sample, unit))
            if len(buf["batch"]) >= batch_size:
                flush_batch(buf)
        if current is not None:
            finish(buf)
    finally:
        if pool:
            pool.shutdown()
    for i in range(num_parts):  # a source shorter than its headers said (a damaged shard): empty parts
        if not part_paths(out, i, num_parts)["meta"].is_file():
            b = new_part(i)
            b["skipped"] = {"unread": min(part_size, total - i * part_size)}
            finish(b)
    if errors:
        state["source_errors"] = {k: state.get("source_errors", {}).get(k, 0) + v for k, v in errors.items()}
        atomic_write_json(out / STATE_NAME, state)
        log.warning(f"damaged data: {errors}; the samples before the damage were embedded")
    rows = sum(p["rows"] for p in state["parts"].values())
    skipped: Dict[str, int] = {}
    for p in state["parts"].values():
        for k, v in p["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    return {"out": str(out), "parts": num_parts, "parts_written": written, "samples": rows, "skipped": skipped,
            "seconds": round(time.time() - start_time, 1)}


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
