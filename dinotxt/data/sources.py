"""Where training pairs come from: webdataset shards (img2dataset layout) or a manifest.

Shards are tar files whose members are grouped by key: ``key.jpg|png|webp`` with the
caption in ``key.txt`` or in a field of ``key.json`` (img2dataset writes both). A
manifest is a CSV or parquet file with ``image_path`` and ``caption`` columns (paths
relative to the manifest's folder are allowed).
"""
from __future__ import annotations

import glob
import logging
import re
import tarfile
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

log = logging.getLogger(__name__)

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _brace_expand(pattern: str) -> List[str]:
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(_brace_expand(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


def expand_shards(spec: Union[str, Sequence[str]], key: str = "data.train") -> List[str]:
    """Shard list from ``dir/{00000..00099}.tar``, a glob, a directory of .tar files, a
    ``::``-separated string or a list of any of these. Missing shards are an error that names
    the config ``key`` the shards came from."""
    if spec is None:
        raise ValueError(f"no data: set {key} to shards (dir/{{00000..00009}}.tar) or a .csv/.parquet manifest")
    items = [spec] if isinstance(spec, str) else list(spec)
    shards: List[str] = []
    for item in items:
        for part in str(item).split("::"):
            p = Path(part)
            if p.is_dir():
                found = sorted(str(x) for x in p.glob("*.tar"))
                if not found:
                    raise FileNotFoundError(f"no .tar shards in directory {p}; check {key}")
                shards.extend(found)
            elif any(c in part for c in "*?["):
                found = sorted(glob.glob(part))
                if not found:
                    raise FileNotFoundError(f"no shards match {part}; check {key}")
                shards.extend(found)
            else:
                shards.extend(_brace_expand(part))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}; check {key}")
    return shards


def is_manifest(spec) -> bool:
    return isinstance(spec, str) and spec.endswith((".csv", ".parquet", ".tsv"))


def read_manifest(path: str, image_column: str = "image_path", caption_column: str = "caption") -> List[Tuple[str, str]]:
    """Rows (absolute image path, caption) of a CSV / TSV / parquet manifest."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        columns = table.column_names
        get = lambda c: table.column(c).to_pylist()  # noqa: E731
    else:
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ","))
        columns = list(rows[0].keys()) if rows else []
        get = lambda c: [r[c] for r in rows]  # noqa: E731
    for c in (image_column, caption_column):
        if c not in columns:
            raise ValueError(f"manifest {p} has no column '{c}' (columns: {columns}); set data.manifest_*_column")
    images, captions = get(image_column), get(caption_column)
    if not images:
        raise ValueError(f"manifest {p} has no rows")
    base = p.parent
    return [(str(Path(i) if Path(i).is_absolute() else base / i), c or "") for i, c in zip(images, captions)]


def iter_tar_samples(path: str, errors: Dict[str, int]) -> Iterator[Dict[str, bytes]]:
    """Group consecutive tar members by key (the part of the name before the first dot).

    A truncated or corrupt tar ends that shard with a counted error instead of a crash.
    """
    current: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                key = f"{dirname}/{stem}" if dirname else stem
                if current and current["__key__"] != key:
                    yield current  # complete before the next member is read, so damage there cannot drop it
                    current = {}
                current["__key__"] = key
                current[ext.lower()] = tar.extractfile(member).read()
        problem = None if _has_end_marker(path) else "no end-of-archive marker"
    except (tarfile.TarError, OSError, EOFError) as e:
        problem = str(e)
        current = {}  # the sample being read when the shard broke may be incomplete
    if current:
        yield current
    if problem:
        errors["corrupt_shard"] = errors.get("corrupt_shard", 0) + 1
        log.warning(f"shard {path} is corrupt or truncated ({problem}); "
              "used the samples before the damage")


def _has_end_marker(path: str) -> bool:
    """A complete tar ends with two zero blocks; a truncated copy usually does not."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 1024:
            return False
        f.seek(-1024, 2)
        return f.read(1024) == bytes(1024)
