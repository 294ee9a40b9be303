"""Near-duplicate removal on image embeddings with faiss, on one process or many.

Every sample's ``neighbors`` nearest other samples by cosine similarity (inner product of the
L2-normalised embeddings, divided by the stored rows' norms) are searched; pairs at or above
``threshold`` are linked and the connected components are the duplicate groups (so a group can
be larger than the neighbour list). One representative per group is kept: the member with the
smallest sample id, a choice that depends only on the group, not on reading order.

Index: exact search (``flat``) stores the embeddings as float16 in faiss
(``IndexScalarQuantizer(QT_fp16)``: lossless, since they are float16 on disk); large
pools use an inverted file (``ivf``: ``IndexIVFScalarQuantizer``, ``nlist`` lists trained
on a sample, ``nprobe`` probed), which finds near duplicates reliably because they fall
in the same or neighbouring lists.

Past one machine the index is cut into fixed shards of ``shard_rows`` pool rows (the IVF lists are
trained once, by rank 0, and shared), and the pool's rows, cut the same way, are the queries. A work
item is one (index shard, query shard) pair: every query shard is searched against every index shard,
in faiss calls of ``chunk_size`` rows fixed by the data, and the pair's hits above the threshold are
written to ``hits/``. Each query shard then merges its hits over the index shards by
(-similarity, row), keeps its ``neighbors`` best per sample (``edges/``), and rank 0 labels the
duplicate groups with ``scipy.sparse.csgraph.connected_components`` over the rows that have an edge.
The number of processes only decides who runs which pair: the result is the same for 1 or N.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .kmeans import fixed_add, fixed_search, to_gpus
from .ranks import Ranks
from .store import Grid, load_array


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def index_kind(n: int, index: str, flat_max: int) -> str:
    return index if index != "auto" else ("flat" if n <= flat_max else "ivf")


def default_nlist(n: int) -> int:
    return max(1, min(n // 39, int(4 * math.sqrt(n))))  # faiss wants >= 39 points per list


def train_ivf(store, nlist, seed: int) -> bytes:
    """The IVF index's trained, empty form (serialised): ``nlist`` lists fitted on a seeded sample of the pool."""
    import faiss

    n, d = len(store), store.dim
    nlist = int(nlist or default_nlist(n))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng([seed, 11])
    sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
    index.train(store.take(sample))
    return faiss.serialize_index(index).tobytes()


def build_index(store, rows: Tuple[int, int], kind: str, trained: Optional[bytes], nprobe: int, chunk_size: int,
                gpus=0):
    """A faiss inner-product index holding the store's rows ``[start, stop)`` (float16 inside faiss), and those
    rows' L2 norms (float64), computed in the same pass, in chunks fixed by the shard."""
    import faiss

    d = store.dim
    if kind == "flat":
        index = faiss.IndexFlatIP(d) if gpus else faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16,
                                                                               faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        index.nprobe = int(min(nprobe, index.nlist))
    # GPU flat indexes hold float16 through the cloner option instead of a scalar quantizer
    index = to_gpus(index, gpus, float16=True)
    norms = []
    for start in range(rows[0], rows[1], chunk_size):
        x = store.read(start, min(rows[1], start + chunk_size))
        fixed_add(index, x, bool(gpus))
        norms.append(np.linalg.norm(x.astype(np.float64), axis=1))
    return index, np.concatenate(norms) if norms else np.zeros(0)


def search_pair(index, index_rows: Tuple[int, int], index_norms: np.ndarray, store, query_rows: Tuple[int, int],
                neighbors: int, threshold: float, chunk_size: int, gpu: bool = False) -> Dict[str, np.ndarray]:
    """Hits of the query rows ``[start, stop)`` in one index shard: each query's ``neighbors + 1`` best in the
    shard (+1: it may find itself), itself left out, those at cosine >= threshold kept."""
    k = min(index_rows[1] - index_rows[0], neighbors + 1)
    found = {"query": [], "row": [], "cosine": []}
    for start in range(query_rows[0], query_rows[1], chunk_size):  # one faiss call per chunk, fixed by the data
        x = store.read(start, min(query_rows[1], start + chunk_size))
        sims, idx = fixed_search(index, x, k, gpu)
        norms = np.maximum(np.linalg.norm(x.astype(np.float64), axis=1), 1e-12)
        rows = np.arange(start, start + len(x))[:, None].repeat(k, 1)
        valid = idx >= 0
        # float16 rows are unit length only to ~1e-4: the inner product of a row with its exact copy can be
        # 0.9999, which would hide exact duplicates at threshold 1.0. Divide by the norms (cosine proper) and
        # allow float32 rounding of the inner product (1e-5).
        cosine = sims / (norms[:, None] * np.maximum(index_norms[np.where(valid, idx, 0)], 1e-12))
        other = idx + index_rows[0]
        hit = valid & (other != rows) & (cosine >= threshold - 1e-5)
        found["query"].append(rows[hit])
        found["row"].append(other[hit])
        found["cosine"].append(cosine[hit])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in found.items()}


def merge_hits(hits: List[Dict[str, np.ndarray]], neighbors: int) -> np.ndarray:
    """(2, m) edges: every query's ``neighbors`` best hits over all index shards, by (-cosine, row)."""
    query = np.concatenate([h["query"] for h in hits]).astype(np.int64) if hits else np.zeros(0, np.int64)
    row = np.concatenate([h["row"] for h in hits]).astype(np.int64) if hits else np.zeros(0, np.int64)
    cosine = np.concatenate([h["cosine"] for h in hits]) if hits else np.zeros(0)
    order = np.lexsort((row, -cosine, query))
    query, row = query[order], row[order]
    place = np.arange(len(query)) - np.searchsorted(query, query, side="left")
    best = place < neighbors
    return np.stack([query[best], row[best]])


def duplicate_groups(edges: np.ndarray, uid_of: Callable[[np.ndarray], np.ndarray]) -> Tuple[np.ndarray, Dict]:
    """(sorted rows removed, statistics) for the (2, m) edges: connected components over the rows that have
    an edge (``scipy.sparse.csgraph``); each keeps the member with the smallest uid (``uid_of(rows)``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(edges)
    if not len(nodes):
        return np.zeros(0, np.int64), {"groups": 0, "removed": 0, "group_sizes": {}}
    a, b = np.searchsorted(nodes, edges[0]), np.searchsorted(nodes, edges[1])
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(nodes), len(nodes)))
    count, component = connected_components(graph, directed=True, connection="weak")
    uids = np.asarray(uid_of(nodes), dtype=np.int64)
    order = np.lexsort((uids, component))
    first = np.ones(len(nodes), dtype=bool)
    first[1:] = component[order][1:] != component[order][:-1]
    keep = np.zeros(len(nodes), dtype=bool)
    keep[order[first]] = True
    sizes = np.bincount(component, minlength=count)
    hist = {int(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))}
    return nodes[~keep], {"groups": int(count), "removed": int((~keep).sum()), "group_sizes": hist}


class DedupSettings:
    """The ``dedup`` recipe section, resolved for a pool of ``n`` rows."""

    def __init__(self, n: int, threshold: float = 0.95, neighbors: int = 16, index: str = "auto",
                 flat_max: int = 200_000, nlist=None, nprobe: int = 16, chunk_size: int = 16384,
                 shard_rows: int = 4_194_304, seed: int = 0, gpus=0):
        self.threshold, self.neighbors, self.nlist, self.nprobe = threshold, neighbors, nlist, nprobe
        self.kind = index_kind(n, index, flat_max)
        self.chunk_size, self.seed, self.gpus = int(chunk_size), seed, gpus
        self.shards = Grid(n, shard_rows)


def dedup_stage(ranks: Ranks, store, folder: Path, s: DedupSettings, uid_of: Callable[[np.ndarray], np.ndarray],
                log=print) -> Tuple[np.ndarray, Dict]:
    """The de-duplication of ``store`` by the processes, through per-item files in ``folder`` (a rerun, with
    any number of processes, skips the items done): (sorted pool rows removed, statistics), on every rank."""
    from .store import save_npy, save_npz

    folder = Path(folder)
    trained = None
    if s.kind == "ivf":
        def train() -> bytes:
            path = folder / "ivf_trained.faiss"
            if not path.is_file():
                from dinotxt.utils.fileio import atomic_write_bytes

                atomic_write_bytes(path, train_ivf(store, s.nlist, s.seed))
            return path.read_bytes()
        trained = ranks.on_zero(train)  # trained once, the same lists for every shard
    shards = len(s.shards)
    pairs = [(i, t) for i in range(shards) for t in range(shards)]  # index-shard major: a rank builds few indexes
    if ranks.is_zero:
        log(f"dedup: {s.kind} index in {shards} shard(s) of <= {s.shards.size:,} rows: {len(pairs)} (index, query) "
            "shard pairs")
    built = (None, None)
    for p in ranks.share(len(pairs)):
        i, t = pairs[p]
        out = folder / "hits" / f"{i:06d}_{t:06d}.npz"
        if out.is_file():
            continue
        if built[0] != i:
            built = (None, None)
            _return_freed_memory()
            built = (i, build_index(store, s.shards.bounds(i), s.kind, trained, s.nprobe, s.chunk_size, s.gpus))
        index, norms = built[1]
        hits = search_pair(index, s.shards.bounds(i), norms, store, s.shards.bounds(t), s.neighbors, s.threshold,
                           s.chunk_size, bool(s.gpus))
        save_npz(out, hits)
    built = None
    _return_freed_memory()  # the index's pages would otherwise stay in this process during clustering
    ranks.barrier()
    for t in ranks.share(shards, count=False):
        out = folder / "edges" / f"{t:06d}.npy"
        if not out.is_file():
            hits = [dict(load_array(folder / "hits" / f"{i:06d}_{t:06d}.npz")) for i in range(shards)]
            save_npy(out, merge_hits(hits, s.neighbors))
    ranks.barrier()

    def groups():
        edges = np.concatenate([load_array(folder / "edges" / f"{t:06d}.npy") for t in range(shards)], axis=1)
        removed, stats = duplicate_groups(edges, uid_of)
        save_npy(folder / "removed.npy", removed)
        return removed, stats
    removed, stats = ranks.on_zero(groups)
    n = s.shards.n
    return removed, {"index": s.kind, "shards": shards, **stats, "kept": int(n - len(removed))}


def near_duplicates(store, uids: np.ndarray, threshold: float = 0.95, neighbors: int = 16, index: str = "auto",
                    flat_max: int = 200_000, nlist=None, nprobe: int = 16, chunk_size: int = 16384, seed: int = 0,
                    gpus=0, shard_rows: Optional[int] = None) -> Tuple[np.ndarray, Dict]:
    """(keep mask over the rows of ``store``, statistics), in one process and in memory.

    Args:
        store: EmbeddingStore (L2-normalised rows).
        uids: sample id of every row (the representative of a group is its smallest uid).
        threshold: cosine similarity at or above which two samples are duplicates.
        neighbors: neighbours searched per sample.
        index: ``flat`` | ``ivf`` | ``auto`` (flat up to ``flat_max`` rows).
        nlist, nprobe: IVF settings (nlist default 4 sqrt(N)).
        chunk_size: query rows per search call.
        seed: IVF training sample.
        gpus: faiss GPUs (0 = CPU).
        shard_rows: index shards of this many rows (default: one shard).
    """
    n = len(store)
    s = DedupSettings(n, threshold, neighbors, index, flat_max, nlist, nprobe, chunk_size, shard_rows or max(1, n),
                      seed, gpus)
    if n == 0:
        return np.zeros(0, dtype=bool), {"index": s.kind, "groups": 0, "removed": 0, "kept": 0, "group_sizes": {}}
    trained = train_ivf(store, nlist, seed) if s.kind == "ivf" else None
    hits: Dict[int, List] = {t: [] for t in range(len(s.shards))}
    for i in range(len(s.shards)):
        faiss_index, norms = build_index(store, s.shards.bounds(i), s.kind, trained, nprobe, s.chunk_size, gpus)
        for t in range(len(s.shards)):
            hits[t].append(search_pair(faiss_index, s.shards.bounds(i), norms, store, s.shards.bounds(t), neighbors,
                                       threshold, s.chunk_size, bool(gpus)))
        del faiss_index
    edges = np.concatenate([merge_hits(hits[t], neighbors) for t in hits], axis=1)
    uids = np.asarray(uids, dtype=np.int64)
    removed, stats = duplicate_groups(edges, lambda rows: uids[rows])
    keep = np.ones(n, dtype=bool)
    keep[removed] = False
    return keep, {"index": s.kind, **stats, "kept": int(keep.sum())}
