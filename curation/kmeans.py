"""Hierarchical k-means with resampling on faiss, on one process or many.

Vo et al., "Automatic Data Curation for Self-Supervised Learning: A Clustering-Based
Approach" (TMLR 2024), as used by dino.txt's image-based curation (METHOD.md section 7):

- Level 1 clusters the data; level l clusters the centroids of level l-1.
- Every k-means run: k-means++ seeding (on a random subset of at most
  ``init_sample_per_centroid * k`` points, so seeding stays cheap at scale), Lloyd
  iterations with exact centroid sums, and empty clusters keeping their centroid (no
  splitting: a cluster never silently changes meaning).
- Then R resampling steps: take the s points of each cluster closest to its centroid,
  refit k-means (fresh k-means++) on that balanced sample, and reassign ALL points.
  Resampling spreads the centroids uniformly over the support of the data instead of
  piling them onto its dense modes.

faiss does the expensive part, the exact nearest-centroid search (``IndexFlatL2``; on GPU, the
process's own GPU, or with one process all GPUs: ``index_cpu_to_all_gpus`` replicates the centroids
and splits the queries, or shards the centroids when they do not fit one GPU). The data is read in
float32 chunks from a memory-mapped ``EmbeddingStore``, so the pool is never loaded as a whole.

Several processes (``ranks.Ranks``; facebookresearch/ssl-data-curation's distributed k-means is the
model): the items are cut into a fixed grid of ``chunk_size`` chunks, each rank assigns its share of
the chunks, and only centroid sums and counts cross between processes, as integers. float16
embeddings are multiples of 2**-24, so their sums are carried exactly in int64 fixed point: the same
in any order, so the centroids are the same bits for 1 or N processes. Seeding runs on rank 0 over a
sample rank 0 draws; the resampling step's "s closest per cluster" is a distributed selection
(``selection.py``). Every phase of every level (initial fit, each resampling step) saves its
centroids atomically and a rerun, with any number of processes, continues from the last finished
phase with identical results (all randomness derives from ``(seed, level, phase)``).
``kmeans_reference.py`` is the plain pure-torch version of the same algorithm used as the benchmark
baseline and the parity reference in tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .ranks import Ranks
from .selection import distance_keys, smallest_per_cluster
from .store import ArrayView, Grid, load_array


@dataclass
class KMeansOptions:
    """How every k-means run of the hierarchy is computed.

    Args:
        iters: Lloyd iterations (stops early once no point changes cluster: the result is the same).
        init: ``kmeans++`` or ``random`` (k distinct random points).
        init_sample_per_centroid: k-means++ seeds on at most this many points per centroid.
        chunk_size: rows per grid chunk: one faiss search, one work item (memory bound).
        gpus: faiss GPUs to use: a count (0 = CPU: every visible GPU up to it) or a list of GPU ids.
        gpu_shard: with several GPUs, shard the centroids instead of replicating them.
    """

    iters: int = 50
    init: str = "kmeans++"
    init_sample_per_centroid: int = 64
    chunk_size: int = 65536
    gpus: Union[int, List[int]] = 0
    gpu_shard: bool = False


@dataclass
class KMeansLevel:
    """One level of the hierarchy: ``assignment[i]`` is the cluster of item i of this level (a data point at
    level 1, a level-(l-1) centroid above), ``dist2[i]`` its squared L2 distance to that centroid."""

    centroids: np.ndarray  # (k, d) float32
    assignment: np.ndarray  # (n_items,) int64
    dist2: np.ndarray  # (n_items,) float32


def faiss_gpus(device: str) -> int:
    """Number of GPUs faiss may use for ``cluster.device`` (auto / cpu / cuda)."""
    if device == "cpu":
        return 0
    import faiss

    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and count == 0:
        raise ValueError("cluster.device=cuda, but faiss sees no GPU: install faiss with GPU support "
                         "(pip install 'dinotxt[gpu]') or use cluster.device=auto")
    return count


SEARCH_ROWS = 4096  # queries per faiss call: fixed by the data, like the grid chunks they are cut from
_POOL: List = [0, None]  # (threads, executor) of the searches below


def _one_faiss_thread() -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # OpenMP's thread count is per calling thread: only this worker's calls


def _search_pool():
    """A pool of as many workers as this process has threads for faiss, each running single-threaded faiss calls."""
    import faiss

    threads = max(1, faiss.omp_get_max_threads())
    if _POOL[1] is None or _POOL[0] != threads:
        from concurrent.futures import ThreadPoolExecutor

        _POOL[:] = [threads, ThreadPoolExecutor(threads, initializer=_one_faiss_thread)]
    return _POOL[1]


def fixed_search(index, x: np.ndarray, k: int, gpu: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``index.search(x, k)`` whose results depend on the rows of ``x`` only: faiss's BLAS distances change in
    their last bits with its thread count and with the set of rows searched in one call, so the rows go in fixed
    blocks of ``SEARCH_ROWS``, each searched by a single-threaded faiss call, the blocks in parallel on the
    process's threads (as fast as faiss's own threading). Then 1 process with 16 threads and 16 processes with
    1 thread each find the same bits. A GPU index is searched as it is."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if gpu:
        return index.search(x, k)
    starts = range(0, len(x), SEARCH_ROWS)
    parts = list(_search_pool().map(lambda s: index.search(x[s:s + SEARCH_ROWS], k), starts))
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def fixed_add(index, x: np.ndarray, gpu: bool = False) -> None:
    """``index.add(x)`` with the coarse assignment of an IVF index made the same way: single-threaded calls on
    fixed blocks (one at a time: adding is not thread-safe)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if gpu:
        index.add(x)
        return
    for s in range(0, len(x), SEARCH_ROWS):
        _search_pool().submit(index.add, x[s:s + SEARCH_ROWS]).result()


def to_gpus(index, gpus: Union[int, List[int]], shard: bool = False, float16: bool = False):
    """A faiss index on GPUs: ``gpus`` is a count (every visible GPU) or a list of ids (a process's own GPU
    when several processes share a machine); 0 or [] leaves it on the CPU."""
    if not gpus:
        return index
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    options.useFloat16 = float16
    if isinstance(gpus, int):
        return faiss.index_cpu_to_all_gpus(index, co=options)
    resources = [faiss.StandardGpuResources() for _ in gpus]
    return faiss.index_cpu_to_gpu_multiple_py(resources, index, co=options, gpus=list(gpus))


class NearestCentroid:
    """Exact squared-L2 nearest-centroid search with faiss (CPU, or all GPUs).

    Args:
        centroids: (k, d) float32.
        gpus: 0 for CPU; a count: the index is cloned to all GPUs; a list: to those GPU ids.
        shard: split the centroids across GPUs (for k * d too large for one) instead of replicating them.
    """

    def __init__(self, centroids: np.ndarray, gpus: Union[int, List[int]] = 0, shard: bool = False):
        import faiss

        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        self.index = to_gpus(index, gpus, shard=shard)
        self.gpu = bool(gpus)

    def search(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(squared distance, centroid index) of every row of ``x``."""
        dist2, idx = fixed_search(self.index, x, 1, self.gpu)
        return np.maximum(dist2[:, 0], 0.0), idx[:, 0].astype(np.int64)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre is drawn with probability
    proportional to the squared distance to the nearest centre chosen so far. When every point already
    coincides with a centre (fewer distinct points than k), the rest are drawn uniformly."""
    n = len(x)
    x = np.asarray(x, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    closest = np.maximum(sq - 2.0 * (x @ x[first]) + sq[first], 0.0)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:
            pick = int(rng.integers(n))
        else:
            pick = int(np.searchsorted(np.cumsum(closest), rng.random() * total, side="right"))
            pick = min(pick, n - 1)
        centers[i] = x[pick]
        closest = np.minimum(closest, np.maximum(sq - 2.0 * (x @ x[pick]) + sq[pick], 0.0))
    return centers


# ---------------------------------------------------------------------------- chunks
# A chunk is the fixed set of items one faiss call searches: a (start, stop) range of the data, or an array of
# positions (a resampling refit: the items of one grid chunk that were resampled). faiss's distances change in
# their last bits with the set of rows in one call, so the chunks never depend on the number of processes.
Chunk = Union[Tuple[int, int], np.ndarray]


def grid_chunks(n: int, opts: KMeansOptions, ranks: Optional[Ranks] = None) -> Dict[int, Chunk]:
    """This rank's chunks of the fixed grid of ``opts.chunk_size`` items over ``n`` items (all of them for one process)."""
    grid = Grid(n, opts.chunk_size)
    return {j: grid.bounds(j) for j in (ranks or Ranks()).share(len(grid), count=False)}


def chunk_positions(chunk: Chunk) -> np.ndarray:
    return np.arange(*chunk, dtype=np.int64) if isinstance(chunk, tuple) else np.asarray(chunk, dtype=np.int64)


def read_chunk(data, chunk: Chunk) -> np.ndarray:
    return data.read(*chunk) if isinstance(chunk, tuple) else data.take(chunk)


def chunk_len(chunk: Chunk) -> int:
    return chunk[1] - chunk[0] if isinstance(chunk, tuple) else len(chunk)


@dataclass
class LevelResult:
    """k-means centroids and, for this rank's chunks, every item's cluster and squared distance to it.

    ``assignment`` / ``dist2`` concatenate the chunks (all of them in a one-process run: a ``KMeansLevel``)."""

    centroids: np.ndarray
    chunks: Dict[int, Chunk]
    assigned: Dict[int, Tuple[np.ndarray, np.ndarray]]  # chunk -> (assignment int64, dist2 float32)

    def _cat(self, i: int, dtype) -> np.ndarray:
        parts = [self.assigned[j][i] for j in sorted(self.assigned)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    @property
    def assignment(self) -> np.ndarray:
        return self._cat(0, np.int64)

    @property
    def dist2(self) -> np.ndarray:
        return self._cat(1, np.float32)

    def level(self) -> KMeansLevel:
        return KMeansLevel(self.centroids, self.assignment, self.dist2)


# ---------------------------------------------------------------------------- exact sums
_SUM_ROWS = 4096
_FIXED = float(1 << 24)  # float16 values are multiples of 2**-24 (its smallest subnormal)


def _accumulate(sums: torch.Tensor, a: np.ndarray, x: np.ndarray, fixed: bool) -> None:
    """Add the rows ``x`` into ``sums[a]``: int64 fixed point (x * 2**24, exact for float16 data, so the sum
    is the same in any order, over any split into chunks and processes), else float64 (one process)."""
    a_t = torch.from_numpy(a)
    for i in range(0, len(x), _SUM_ROWS):  # a few rows at a time, not a second copy of the chunk
        rows = x[i:i + _SUM_ROWS]
        if fixed:
            if len(rows) and float(np.abs(rows).max()) > 1.0:
                raise ValueError("k-means on float16 embeddings expects L2-normalised rows (|x| <= 1); these are "
                                 "not: re-run the embed stage")
            sums.index_add_(0, a_t[i:i + _SUM_ROWS], torch.from_numpy(rows * _FIXED).to(torch.int64))
        else:
            sums.index_add_(0, a_t[i:i + _SUM_ROWS], torch.from_numpy(rows).double())


def _means(sums: torch.Tensor, counts: np.ndarray, centroids: np.ndarray, fixed: bool) -> np.ndarray:
    """The new centroids (float32); an empty cluster keeps its centroid."""
    out = centroids.copy()
    filled = counts > 0
    total = sums.numpy()[filled].astype(np.float64)
    if fixed:
        total /= _FIXED
    out[filled] = (total / counts[filled, None]).astype(np.float32)
    return out


def _check_single(data, ranks: Ranks) -> None:
    if ranks.world > 1 and not data.fixed_point:
        raise ValueError("k-means over several processes needs float16 data (exact int64 sums); this level's items "
                         "are float32: run it on one process")


# ---------------------------------------------------------------------------- k-means
def assign(data, centroids: np.ndarray, opts: KMeansOptions, ranks: Optional[Ranks] = None,
           chunks: Optional[Dict[int, Chunk]] = None) -> LevelResult:
    """Nearest centroid and squared distance of every item of this rank's chunks (default: the grid)."""
    chunks = grid_chunks(len(data), opts, ranks) if chunks is None else chunks
    search = NearestCentroid(centroids, opts.gpus, opts.gpu_shard)
    assigned = {}
    for j, chunk in chunks.items():
        d, a = search.search(read_chunk(data, chunk))
        assigned[j] = (a, d)
    return LevelResult(np.asarray(centroids, dtype=np.float32), chunks, assigned)


def lloyd(data, centroids: np.ndarray, opts: KMeansOptions, assign_all: bool = True, ranks: Optional[Ranks] = None,
          chunks: Optional[Dict[int, Chunk]] = None) -> LevelResult:
    """Lloyd iterations from ``centroids`` over this rank's chunks (default: the grid of ``opts.chunk_size``):
    centroid sums and counts all-reduced as integers, an empty cluster keeps its centroid, stop when no item
    changed cluster (an all-reduced count). ``assign_all=False`` skips the final assignment pass."""
    ranks = ranks or Ranks()
    _check_single(data, ranks)
    chunks = grid_chunks(len(data), opts, ranks) if chunks is None else chunks
    k, d = centroids.shape
    centroids = np.array(centroids, dtype=np.float32)
    fixed = bool(data.fixed_point)
    previous = None
    for _ in range(opts.iters):
        search = NearestCentroid(centroids, opts.gpus, opts.gpu_shard)
        sums = torch.zeros(k, d, dtype=torch.int64 if fixed else torch.float64)
        counts = np.zeros(k, dtype=np.int64)
        assigned = {}
        for j, chunk in chunks.items():
            x = read_chunk(data, chunk)
            dd, a = search.search(x)
            assigned[j] = (a, dd)
            _accumulate(sums, a, x, fixed)
            counts += np.bincount(a, minlength=k)
        if previous is not None:
            changed = sum(int((previous[j][0] != assigned[j][0]).sum()) for j in chunks)
            if int(ranks.all_reduce(np.array([changed], np.int64))[0]) == 0:
                # converged: the update would reproduce the centroids this assignment was made with
                return LevelResult(centroids, chunks, assigned)
        if ranks.world > 1:
            sums = torch.from_numpy(ranks.all_reduce(sums.numpy()))
            counts = ranks.all_reduce(counts)
        centroids = _means(sums, counts, centroids, fixed)
        previous = assigned
    if not assign_all:
        return LevelResult(centroids, chunks, {})
    return assign(data, centroids, opts, ranks, chunks)


def _resolve(ranks: Ranks, chunks: Dict[int, Chunk], lengths: np.ndarray, virtual: np.ndarray) -> np.ndarray:
    """Data positions of the items at ``virtual`` positions of the concatenated chunks (chunk 0's items
    first); each rank fills in those of its own chunks and an integer all-reduce joins them."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    chunk_of = np.searchsorted(offsets, virtual, side="right") - 1
    out = np.zeros(len(virtual), dtype=np.int64)
    for j, chunk in chunks.items():
        mine = np.flatnonzero(chunk_of == j)
        if len(mine):
            out[mine] = chunk_positions(chunk)[virtual[mine] - offsets[j]]
    return ranks.all_reduce(out)


def kmeans(data, k: int, opts: KMeansOptions, rng: np.random.Generator, assign_all: bool = True,
           ranks: Optional[Ranks] = None, chunks: Optional[Dict[int, Chunk]] = None,
           num_chunks: Optional[int] = None) -> LevelResult:
    """One k-means run over the items of the chunks (default: all of ``data`` on the grid): k-means++
    seeding on rank 0 over a random subset drawn by rank 0 (``rng`` is only used there), the seeds
    broadcast, then distributed Lloyd.

    Args:
        chunks: this rank's chunks of the items to cluster; ``num_chunks``: how many the run has in all.
    """
    ranks = ranks or Ranks()
    if chunks is None:
        chunks, num_chunks = grid_chunks(len(data), opts, ranks), len(Grid(len(data), opts.chunk_size))
    lengths = np.zeros(num_chunks if num_chunks is not None else len(chunks), dtype=np.int64)
    for j, chunk in chunks.items():
        lengths[j] = chunk_len(chunk)
    lengths = ranks.all_reduce(lengths)
    n = int(lengths.sum())
    sample = min(n, max(k, opts.init_sample_per_centroid * k))

    def draw() -> np.ndarray:
        return np.sort(rng.choice(n, size=sample, replace=False)) if sample < n else np.arange(n)

    positions = _resolve(ranks, chunks, lengths, ranks.on_zero(draw))

    def seed() -> np.ndarray:
        points = data.take(positions)
        if opts.init == "kmeans++":
            return kmeans_plusplus(points, k, rng)
        return points[rng.choice(len(points), size=k, replace=len(points) < k)]

    init = ranks.on_zero(seed)  # rank 0 seeds; the seeds (or its error) reach every rank
    return lloyd(data, init, opts, assign_all, ranks, chunks)


def rank_within_clusters(assignment: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank of every item inside its cluster when ordered by ``key`` (ties: lower position first)."""
    n = len(assignment)
    order = np.lexsort((np.arange(n), key, assignment))  # by cluster, then key, then position
    clusters = assignment[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.searchsorted(clusters, clusters, side="left")
    return rank


def closest_per_cluster(assignment: np.ndarray, dist2: np.ndarray, s: int) -> np.ndarray:
    """Sorted positions of the (at most) ``s`` items of every cluster closest to its centroid (one process;
    ``selection.smallest_per_cluster`` is the same choice over several)."""
    return np.flatnonzero(rank_within_clusters(assignment, dist2) < s)


def default_sample_size(n: int, k: int) -> int:
    """Half the mean cluster size: small enough that the resampled set is balanced across clusters."""
    return max(1, math.ceil(n / k / 2))


def _phase_path(folder: Optional[Path], phase: int) -> Optional[Path]:
    return None if folder is None else Path(folder) / f"phase_{phase:03d}.npz"


def _save_phase(path: Optional[Path], centroids: np.ndarray, items: int) -> None:
    """A finished phase: its centroids and the number of items they cluster (the assignment is one pass
    away: ``assign`` on the same chunks)."""
    if path is None:
        return
    from .store import save_npz

    save_npz(path, {"centroids": centroids, "items": np.array([items], np.int64)})


def _load_phase(path: Optional[Path], k: int, n: int, dim: int) -> Optional[np.ndarray]:
    if path is None or not path.is_file():
        return None
    with load_array(path) as z:
        centroids, items = z["centroids"], int(z["items"][0])
    if centroids.shape != (k, dim) or items != n:
        raise ValueError(f"{path} holds {centroids.shape[0]} centroids of width {centroids.shape[1]} for {items} items, "
                         f"not {k} of width {dim} for {n}; delete the cluster folder to recompute")
    return centroids


def kmeans_level(data, k: int, opts: KMeansOptions, resampling_steps: int, sample_size: Optional[int],
                 seed: int, level: int, checkpoint: Optional[Path] = None, log=print,
                 ranks: Optional[Ranks] = None) -> LevelResult:
    """One level: k-means, then ``resampling_steps`` resample-refit-reassign steps, over the fixed grid of
    ``opts.chunk_size`` items (each rank runs its share of the chunks).

    Args:
        data: the items of this level (EmbeddingStore view or ArrayView).
        k: clusters.
        opts: k-means options.
        resampling_steps: R.
        sample_size: s points per cluster per resampling step (None: half the mean cluster size).
        seed, level: every random choice of phase p derives from ``(seed, level, p)`` (drawn on rank 0).
        checkpoint: folder for the ``phase_NNN.npz`` centroids (written by rank 0); finished phases are loaded,
            not recomputed.
        ranks: the processes sharing the work (one when None).
    Returns this rank's chunks' assignment (all of it for one process) and the centroids.
    """
    ranks = ranks or Ranks()
    n = len(data)
    if k > n:
        raise ValueError(f"level {level} asks for {k} clusters of only {n} items; lower cluster.levels")
    s = int(sample_size) if sample_size else default_sample_size(n, k)
    grid = Grid(n, opts.chunk_size)
    chunks = grid_chunks(n, opts, ranks)
    ranks.items += len(chunks)
    centroids: Optional[np.ndarray] = None
    current: Optional[LevelResult] = None  # the assignment to ``centroids``, computed when needed
    for phase in range(resampling_steps + 1):
        path = _phase_path(checkpoint, phase)
        loaded = ranks.on_zero(_load_phase, path, k, n, data.dim)
        if loaded is not None:
            centroids, current = loaded, None
            continue
        rng = np.random.default_rng([seed, level, phase])
        if phase == 0:
            log(f"level {level}: k-means, {k} clusters of {n:,} items")
            current = kmeans(data, k, opts, rng, ranks=ranks, chunks=chunks, num_chunks=len(grid))
        else:
            current = current or assign(data, centroids, opts, ranks, chunks)
            keys = {j: (a, distance_keys(d), chunk_positions(chunks[j])) for j, (a, d) in current.assigned.items()}
            picked = smallest_per_cluster(ranks, keys, np.full(k, s, dtype=np.int64))
            refit_chunks = {j: chunk_positions(chunks[j])[m] for j, m in picked.items()}
            resampled = int(ranks.all_reduce(np.array([sum(int(m.sum()) for m in picked.values())], np.int64))[0])
            log(f"level {level}: resampling step {phase}/{resampling_steps}: refit on {resampled:,} items "
                f"(<= {s} per cluster), reassign all {n:,}")
            # the refit set is the resampled items of every grid chunk: the same chunks for any process count
            refit = kmeans(data, k, opts, rng, assign_all=False, ranks=ranks, chunks=refit_chunks,
                           num_chunks=len(grid))
            current = assign(data, refit.centroids, opts, ranks, chunks)
        centroids = current.centroids
        if ranks.is_zero:
            _save_phase(path, centroids, n)
    return current or assign(data, centroids, opts, ranks, chunks)


def hierarchical_kmeans(data, levels: Sequence[int], opts: KMeansOptions, resampling_steps: Sequence[int],
                        sample_sizes: Sequence[Optional[int]], seed: int = 0, checkpoint_dir: Optional[Path] = None,
                        log=print) -> List[KMeansLevel]:
    """All levels, bottom first, in one process; level l runs on the centroids of level l-1."""
    out: List[KMeansLevel] = []
    for i, k in enumerate(levels):
        items = data if i == 0 else ArrayView(out[-1].centroids)
        folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"level{i + 1}"
        out.append(kmeans_level(items, k, opts, resampling_steps[i], sample_sizes[i], seed, i + 1, folder,
                                log).level())
    return out


def cluster_sizes(levels: Sequence[KMeansLevel]) -> List[np.ndarray]:
    """Number of DATA points under every cluster of every level (what balanced sampling caps)."""
    sizes = [np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))]
    for lvl in levels[1:]:
        sizes.append(np.bincount(lvl.assignment, weights=sizes[-1], minlength=len(lvl.centroids)).astype(np.int64))
    return sizes
