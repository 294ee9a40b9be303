"""Sharded, memory-mapped embedding storage (the clip-retrieval / img2dataset layout).

Every embedding stage writes one ``.npy`` (float16, L2-normalised rows) and one ``.parquet``
metadata table per pool unit, keyed by the stable sample id. ``EmbeddingStore`` reads the
shards as ONE ``(N, D)`` matrix without loading it: each shard is ``np.load(mmap_mode="r")``
and consumers walk it in float32 chunks (k-means, de-duplication) or gather rows
(``take``), so the pool is never held twice in RAM.

Writers go through ``dinotxt.utils.fileio.atomic_output``: a file is either complete or absent.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from dinotxt.utils.fileio import atomic_output
from dinotxt.utils.log import error_line

PathLike = Union[str, Path]

DAMAGED = "delete it (or the stage's folder) and rerun the same command to write it again"


def load_array(path: PathLike, mmap_mode: Optional[str] = None):
    """``np.load`` of a file a stage wrote (never pickles); a missing or damaged file is one line naming it."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {DAMAGED}") from None
    except (OSError, ValueError, EOFError) as e:  # empty, truncated, foreign bytes, a folder in its place
        raise ValueError(f"{path} is not a readable array file ({error_line(e)}): {DAMAGED}") from None


def read_table(path: PathLike, columns: Optional[Sequence[str]] = None):
    """A parquet file a stage wrote, as an Arrow table; a missing or damaged file is one line naming it."""
    import pyarrow.parquet as pq

    if Path(path).is_dir():
        raise ValueError(f"{path} is a folder where a parquet table should be: {DAMAGED}")
    try:
        return pq.read_table(str(path), columns=list(columns) if columns else None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {DAMAGED}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable parquet table ({error_line(e)}): {DAMAGED}") from None


def read_json(path: PathLike):
    """A JSON record a stage wrote; a missing or damaged file is one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: {DAMAGED}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON record ({error_line(e)}): {DAMAGED}") from None



def save_npy(path: PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, or np.save appends ".npy" to the temporary name
            np.save(f, np.ascontiguousarray(array))


def save_npz(path: PathLike, arrays: dict) -> None:
    """``np.savez`` of named arrays through a temporary file and a rename."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_table(path: PathLike, columns: dict) -> None:
    """Write ``{name: list or array}`` as a parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({k: pa.array(v) for k, v in columns.items()})
    with atomic_output(path) as tmp:
        pq.write_table(table, str(tmp))


def concatenate_tables(parts: Sequence[PathLike], path: PathLike) -> int:
    """The parquet parts, in order, as ONE parquet file (streamed a part at a time, atomically); returns rows."""
    import pyarrow.parquet as pq

    rows, writer, empty = 0, None, None
    with atomic_output(path) as tmp:
        try:
            for p in parts:
                table = read_table(p)
                if not table.num_rows:  # an empty part's text columns have no type; it adds nothing
                    empty = table if empty is None else empty
                    continue
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table.cast(writer.schema))
                rows += table.num_rows
            if writer is None and empty is not None:
                pq.write_table(empty, str(tmp))
        finally:
            if writer is not None:
                writer.close()
    return rows


def load_table(path: PathLike, columns: Optional[Sequence[str]] = None) -> dict:
    """A parquet table as ``{name: numpy array or list}`` (numbers as arrays, strings as lists)."""
    import pyarrow.parquet as pq

    table = read_table(path, columns)
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

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.array[start:stop], dtype=np.float32)

    def subset(self, rows: np.ndarray) -> "ArrayView":
        return ArrayView(self.array[np.asarray(rows)])

    @property
    def fixed_point(self) -> bool:
        """Whether every value is a multiple of 2**-24 (float16 data): sums can then be carried exactly in int64."""
        return self.array.dtype == np.float16


class KeptRows:
    """The rows of a table of ``total`` rows that are not in ``removed`` (sorted), as a read-only index:
    ``kept[p]`` is the p-th kept row, for an int array or a slice of positions, without an array of
    length ``total`` (the pool after de-duplication is 10^9 rows; the removed ones are a few percent)."""

    def __init__(self, total: int, removed: np.ndarray):
        self.total = int(total)
        self.removed = np.asarray(removed, dtype=np.int64)
        # removed[j] - j kept rows lie before the j-th removed row: position p maps to p + #{j: removed[j] - j <= p}
        self._before = self.removed - np.arange(len(self.removed), dtype=np.int64)

    def __len__(self) -> int:
        return self.total - len(self.removed)

    def __getitem__(self, positions) -> np.ndarray:
        if isinstance(positions, slice):
            positions = np.arange(*positions.indices(len(self)), dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        return positions + np.searchsorted(self._before, positions, side="right")


_OPEN_MAPS = 256


def npy_header(path: PathLike):
    """(shape, dtype) of a ``.npy`` file from its header, without reading or mapping the data."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"a .npy file of version {version}, which this reader does not know")
            shape, _, dtype = read(f)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable array file ({error_line(e)}): {DAMAGED}") from None
    return shape, np.dtype(dtype)


class EmbeddingStore:
    """Read-only view of sharded ``.npy`` files as one ``(N, D)`` matrix, memory-mapped.

    Args:
        paths: the shard files, in pool order.
        rows: optional sorted global row indices (an array, or a ``KeptRows``); the view then shows only
            those rows (in that order), e.g. the pool after de-duplication.
        expect_dim: width every shard must have (a clear error otherwise).
    """

    def __init__(self, paths: Sequence[PathLike], rows: Optional[np.ndarray] = None, expect_dim: Optional[int] = None):
        if not paths:
            raise ValueError("no embedding shards to read")
        self.paths = [Path(p) for p in paths]
        shapes, dtypes = [], set()
        for p in self.paths:  # the headers only: a pool of 10^5 shards is not 10^5 memory maps
            if not p.is_file():
                raise FileNotFoundError(f"embedding shard {p} is missing: {DAMAGED}")
            shape, dtype = npy_header(p)
            if len(shape) != 2:
                raise ValueError(f"embedding shard {p} has shape {shape}; expected (rows, dim)")
            shapes.append(shape)
            dtypes.add(dtype)
        dims = {s[1] for s in shapes if s[0]} or {shapes[0][1]}
        width = expect_dim or shapes[0][1]
        bad = [(p, s[1]) for p, s in zip(self.paths, shapes) if s[0] and s[1] != width]
        if bad or len(dims) > 1:
            p, w = bad[0] if bad else (self.paths[0], shapes[0][1])
            raise ValueError(f"embedding shard {p} has width {w} but {width} was expected: all shards must come from "
                             "the same encoder (delete the stage folder to recompute)")
        self._maps: "OrderedDict[int, np.ndarray]" = OrderedDict()  # the shards mapped last (at most _OPEN_MAPS)
        self.dim = int(width)
        self.offsets = np.cumsum([0] + [s[0] for s in shapes])
        self.total = int(self.offsets[-1])
        self.rows = None if rows is None else rows if isinstance(rows, KeptRows) else np.asarray(rows, dtype=np.int64)
        if isinstance(self.rows, KeptRows):
            if self.rows.total != self.total:
                raise ValueError(f"a row map of {self.rows.total} rows for an embedding store of {self.total} rows")
        elif self.rows is not None and len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= self.total):
            raise ValueError(f"row index out of range for an embedding store of {self.total} rows")
        self.n = self.total if self.rows is None else len(self.rows)
        self.fixed_point = dtypes == {np.dtype(np.float16)}  # multiples of 2**-24: exact int64 sums

    def __len__(self) -> int:
        return self.n

    def shard(self, s: int) -> np.ndarray:
        """Shard ``s``, memory-mapped on first use; the least recently used map is closed past ``_OPEN_MAPS``
        (Linux allows 65,530 maps per process)."""
        arr = self._maps.pop(s, None)
        if arr is None:
            arr = load_array(self.paths[s], mmap_mode="r")
            if len(self._maps) >= _OPEN_MAPS:
                self._maps.popitem(last=False)
        self._maps[s] = arr
        return arr

    def subset(self, rows: np.ndarray) -> "EmbeddingStore":
        """A view of the given positions of THIS view (composes with an existing subset)."""
        view = EmbeddingStore.__new__(EmbeddingStore)
        view.__dict__.update(self.__dict__)
        view._maps = OrderedDict()
        if isinstance(rows, KeptRows):
            if self.rows is not None or rows.total != self.total:
                raise ValueError("a KeptRows view applies to the whole store only")
            view.rows = rows
        else:
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
            out[piece_pos] = self.shard(s)[piece_rows - self.offsets[s]]
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        """Global rows [start, stop) by slicing the shards (sequential reads, no index arrays)."""
        out = np.empty((stop - start, self.dim), dtype=np.float32)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        for s in range(first, len(self.paths)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo >= stop:
                break
            if hi > lo:
                out[lo - start:hi - start] = self.shard(s)[lo - self.offsets[s]:hi - self.offsets[s]]
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows (positions in this view) as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._gather(rows if self.rows is None else self.rows[rows])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Positions ``[start, stop)`` of this view as float32."""
        stop = min(stop, self.n)
        if self.rows is None:
            return self._read_range(start, stop)
        return self._gather(self.rows[start:stop])

    def chunks(self, chunk_size: int = 65536) -> Iterator[Tuple[int, np.ndarray]]:
        """``(start, float32 block)`` over the view in order; at most ``chunk_size`` rows in RAM at a time."""
        for start in range(0, self.n, chunk_size):
            yield start, self.read(start, start + chunk_size)


def shard_paths(folder: PathLike, count: int, suffix: str = ".npy") -> List[Path]:
    """``folder/000000.npy ...`` for ``count`` units (the naming every sharded stage uses)."""
    return [Path(folder) / f"{i:06d}{suffix}" for i in range(count)]


class Grid:
    """Fixed chunks of ``n`` items, ``size`` each (the last one shorter): chunk j is ``[j * size, (j + 1) * size)``.

    The work items of the stages that walk the de-duplicated pool: a chunk is searched in one faiss call,
    reduced, and written as one part file, whatever the number of processes (only which process runs a
    chunk depends on it), so every output is the same for 1 or N processes."""

    def __init__(self, n: int, size: int):
        self.n, self.size = int(n), max(1, int(size))
        self.count = -(-self.n // self.size)

    def __len__(self) -> int:
        return self.count

    def bounds(self, j: int) -> Tuple[int, int]:
        return j * self.size, min(self.n, (j + 1) * self.size)


def part_path(folder: PathLike, j: int, suffix: str = ".npy") -> Path:
    """The part of work item ``j`` in a folder of per-item parts (``folder/000012.npy``)."""
    return Path(folder) / f"{j:06d}{suffix}"


def missing_parts(folder: PathLike, count: int, suffix: str = ".npy") -> List[int]:
    """Items ``0 <= j < count`` whose part is not on disk."""
    return [j for j in range(count) if not part_path(folder, j, suffix).is_file()]


def read_parts(folder: PathLike, count: int) -> np.ndarray:
    """The ``count`` per-item ``.npy`` parts of a folder, concatenated in item order (for small outputs,
    the report and tests; large ones are read part by part)."""
    parts = [load_array(part_path(folder, j)) for j in range(count)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------- sorted int64 ids in buckets
UID_BUCKET_ROWS = 1 << 24  # ids per bucket (128 MiB of int64), so one bucket fits any rank


def uid_bucket_count(total: int, rows_per_bucket: int = UID_BUCKET_ROWS) -> int:
    """How many equal ranges of the int64 space to cut ``total`` uniformly spread ids (sample ids are hashes) into."""
    return max(1, -(-int(total) // int(rows_per_bucket)))


def uid_bucket(parts: Sequence[PathLike], b: int, buckets: int) -> np.ndarray:
    """The ids in the b-th of ``buckets`` equal ranges of the int64 space, from every part (each a SORTED int64
    ``.npy``), sorted. Only the bucket's slice of each part is read (memory-mapped, binary search)."""
    lo = -(1 << 63) + (b << 64) // buckets
    hi = -(1 << 63) + ((b + 1) << 64) // buckets  # exclusive; 2**63 for the last bucket
    pieces = []
    for path in parts:
        ids = load_array(path, mmap_mode="r")
        start = int(np.searchsorted(ids, lo, side="left"))
        stop = len(ids) if hi >= 1 << 63 else int(np.searchsorted(ids, hi, side="left"))
        if stop > start:
            pieces.append(np.array(ids[start:stop]))
    return np.sort(np.concatenate(pieces)) if pieces else np.zeros(0, dtype=np.int64)


def concatenate_npy(parts: Sequence[PathLike], path: PathLike, dtype=np.int64) -> int:
    """Write the 1-D ``.npy`` parts, in order, as ONE ``.npy`` (streamed through a memory map, atomically)."""
    sizes = [int(load_array(p, mmap_mode="r").shape[0]) for p in parts]
    with atomic_output(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(sum(sizes),))
        start = 0
        for p, size in zip(parts, sizes):
            out[start:start + size] = load_array(p, mmap_mode="r")
            start += size
        out.flush()
        del out
    return sum(sizes)
