"""Sharded, memory-mapped embedding storage (the clip-retrieval / img2dataset layout).

Every embedding stage writes one ``.npy`` (float16, L2-normalised rows) and one ``.parquet``
metadata table per pool unit, keyed by the stable sample id. ``EmbeddingStore`` reads the
shards as ONE ``(N, D)`` matrix without loading it: each shard is ``np.load(mmap_mode="r")``
and consumers walk it in float32 chunks (k-means, de-duplication) or gather rows
(``take``), so the pool is never held twice in RAM.

Writers go through ``dinotxt.fileio.atomic_output``: a file is either complete or absent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from dinotxt.fileio import atomic_output

PathLike = Union[str, Path]


def save_npy(path: PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, or np.save appends ".npy" to the temporary name
            np.save(f, np.ascontiguousarray(array))


def save_table(path: PathLike, columns: dict) -> None:
    """Write ``{name: list or array}`` as a parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    with atomic_output(path) as tmp:
        pq.write_table(table, str(tmp))


def load_table(path: PathLike, columns: Optional[Sequence[str]] = None) -> dict:
    """A parquet table as ``{name: numpy array or list}`` (numbers as arrays, strings as lists)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path), columns=list(columns) if columns else None)
    out = {}
    for name in table.column_names:
        col = table.column(name)
        out[name] = col.to_numpy() if _is_numeric(col.type) else col.to_pylist()
    return out


def _is_numeric(arrow_type) -> bool:
    import pyarrow.types as t

    return t.is_integer(arrow_type) or t.is_floating(arrow_type) or t.is_boolean(arrow_type)


class ArrayView:
    """An in-memory ``(n, d)`` array behind the chunked interface of ``EmbeddingStore``
    (used for the centroids of a lower k-means level)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)
        self.n, self.dim = self.array.shape

    def __len__(self) -> int:
        return self.n

    def chunks(self, chunk_size: int = 65536) -> Iterator[Tuple[int, np.ndarray]]:
        for start in range(0, self.n, chunk_size):
            yield start, np.ascontiguousarray(self.array[start:start + chunk_size], dtype=np.float32)

    def take(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.array[np.asarray(rows)], dtype=np.float32)

    def subset(self, rows: np.ndarray) -> "ArrayView":
        return ArrayView(self.array[np.asarray(rows)])


class EmbeddingStore:
    """Read-only view of sharded ``.npy`` files as one ``(N, D)`` matrix, memory-mapped.

    Args:
        paths: the shard files, in pool order.
        rows: optional sorted global row indices; the view then shows only those rows
            (in that order), e.g. the pool after de-duplication.
        expect_dim: width every shard must have (a clear error otherwise).
    """

    def __init__(self, paths: Sequence[PathLike], rows: Optional[np.ndarray] = None, expect_dim: Optional[int] = None):
        if not paths:
            raise ValueError("no embedding shards to read")
        self.paths = [Path(p) for p in paths]
        self.shards = []
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"embedding shard not found: {p}")
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 2:
                raise ValueError(f"embedding shard {p} has shape {arr.shape}; expected (rows, dim)")
            self.shards.append(arr)
        dims = {a.shape[1] for a in self.shards if a.shape[0]} or {self.shards[0].shape[1]}
        width = expect_dim or self.shards[0].shape[1]
        bad = [(p, a.shape[1]) for p, a in zip(self.paths, self.shards) if a.shape[0] and a.shape[1] != width]
        if bad or len(dims) > 1:
            p, w = bad[0] if bad else (self.paths[0], self.shards[0].shape[1])
            raise ValueError(f"embedding shard {p} has width {w} but {width} was expected: all shards must come from "
                             "the same encoder (delete the stage folder to recompute)")
        self.dim = int(width)
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.shards])
        self.total = int(self.offsets[-1])
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None and len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self.total):
            raise ValueError(f"row index out of range for an embedding store of {self.total} rows")
        self.n = self.total if self.rows is None else len(self.rows)

    def __len__(self) -> int:
        return self.n

    def subset(self, rows: np.ndarray) -> "EmbeddingStore":
        """A view of the given positions of THIS view (composes with an existing subset)."""
        view = EmbeddingStore.__new__(EmbeddingStore)
        view.__dict__.update(self.__dict__)
        rows = np.asarray(rows, dtype=np.int64)
        view.rows = rows if self.rows is None else self.rows[rows]
        view.n = len(view.rows)
        return view

    def _gather(self, global_rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(global_rows), self.dim), dtype=np.float32)
        if not len(global_rows):
            return out
        order = np.argsort(global_rows, kind="stable")  # sorted reads touch each shard's pages in order
        sorted_rows = global_rows[order]
        shard_of = np.searchsorted(self.offsets, sorted_rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        for piece_rows, piece_pos, s in zip(np.split(sorted_rows, bounds), np.split(order, bounds),
                                            shard_of[np.r_[0, bounds]]):
            out[piece_pos] = self.shards[s][piece_rows - self.offsets[s]]
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Global rows [start, stop) by slicing the shards (sequential reads, no index arrays)."""
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        for s in range(first, len(self.shards)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo >= stop:
                break
            if hi > lo:
                out[lo - start:hi - start] = self.shards[s][lo - self.offsets[s]:hi - self.offsets[s]]
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (positions in this view) as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._gather(rows if self.rows is None else self.rows[rows])

    def chunks(self, chunk_size: int = 65536) -> Iterator[Tuple[int, np.ndarray]]:
        """``(start, float32 block)`` over the view in order; at most ``chunk_size`` rows in RAM at a time."""
        for start in range(0, self.n, chunk_size):
            stop = min(self.n, start + chunk_size)
            if self.rows is None:
                yield start, self._read_range(start, stop)
            else:
                yield start, self._gather(self.rows[start:stop])


def shard_paths(folder: PathLike, count: int, suffix: str = ".npy") -> List[Path]:
    """``folder/000000.npy ...`` for ``count`` units (the naming every sharded stage uses)."""
    return [Path(folder) / f"{i:06d}{suffix}" for i in range(count)]
