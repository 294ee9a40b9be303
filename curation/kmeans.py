"""Hierarchical k-means with resampling on faiss.

Vo et al., "Automatic Data Curation for Self-Supervised Learning: A Clustering-Based
Approach" (TMLR 2024), as used by dino.txt's image-based curation (METHOD.md section 7):

- Level 1 clusters the data; level l clusters the centroids of level l-1.
- Every k-means run: k-means++ seeding (on a random subset of at most
  ``init_sample_per_centroid * k`` points, so seeding stays cheap at scale), Lloyd
  iterations with centroids accumulated in float64, and empty clusters keeping their
  centroid (no splitting: a cluster never silently changes meaning).
- Then R resampling steps: take the s points of each cluster closest to its centroid,
  refit k-means (fresh k-means++) on that balanced sample, and reassign ALL points.
  Resampling spreads the centroids uniformly over the support of the data instead of
  piling them onto its dense modes.

faiss does the expensive part, the exact nearest-centroid search (``IndexFlatL2``; on GPU,
``index_cpu_to_all_gpus`` replicates the centroids and splits the queries, or shards the
centroids when they do not fit one GPU). The data is read in float32 chunks from a
memory-mapped ``EmbeddingStore``, so the pool is never loaded as a whole. Every phase of
every level (initial fit, each resampling step) is saved atomically and a rerun continues
from the last finished phase with identical results (all randomness derives from
``(seed, level, phase)``). ``kmeans_reference.py`` is the plain pure-torch version of the
same algorithm used as the benchmark baseline and the parity reference in tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .store import ArrayView


@dataclass
class KMeansOptions:
    """How every k-means run of the hierarchy is computed.

    Args:
        iters: Lloyd iterations (stops early once no point changes cluster: the result is the same).
        init: ``kmeans++`` or ``random`` (k distinct random points).
        init_sample_per_centroid: k-means++ seeds on at most this many points per centroid.
        chunk_size: rows assigned at a time (memory bound).
        gpus: faiss GPUs to use (0 = CPU).
        gpu_shard: with several GPUs, shard the centroids instead of replicating them.
    """

    iters: int = 50
    init: str = "kmeans++"
    init_sample_per_centroid: int = 64
    chunk_size: int = 65536
    gpus: int = 0
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


class NearestCentroid:
    """Exact squared-L2 nearest-centroid search with faiss (CPU, or all GPUs).

    Args:
        centroids: (k, d) float32.
        gpus: 0 for CPU; otherwise the index is cloned to all GPUs.
        shard: split the centroids across GPUs (for k * d too large for one) instead of replicating them.
    """

    def __init__(self, centroids: np.ndarray, gpus: int = 0, shard: bool = False):
        import faiss

        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        if gpus > 0:
            options = faiss.GpuMultipleClonerOptions()
            options.shard = shard
            index = faiss.index_cpu_to_all_gpus(index, co=options)
        self.index = index

    def search(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(squared distance, centroid index) of every row of ``x``."""
        dist2, idx = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
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


def assign(data, centroids: np.ndarray, opts: KMeansOptions) -> Tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and squared distance for every row of ``data`` (an EmbeddingStore or ArrayView)."""
    search = NearestCentroid(centroids, opts.gpus, opts.gpu_shard)
    assignment = np.empty(len(data), dtype=np.int64)
    dist2 = np.empty(len(data), dtype=np.float32)
    for start, x in data.chunks(opts.chunk_size):
        d, a = search.search(x)
        assignment[start:start + len(x)], dist2[start:start + len(x)] = a, d
    return assignment, dist2


_SUM_ROWS = 4096


def lloyd(data, centroids: np.ndarray, opts: KMeansOptions, assign_all: bool = True) -> KMeansLevel:
    """Lloyd iterations from ``centroids``; float64 sums; an empty cluster keeps its centroid.
    ``assign_all=False`` skips the final assignment pass (callers that only need the centroids)."""
    k, d = centroids.shape
    centroids = np.array(centroids, dtype=np.float32)
    previous = None
    for _ in range(opts.iters):
        search = NearestCentroid(centroids, opts.gpus, opts.gpu_shard)
        sums = torch.zeros(k, d, dtype=torch.float64)
        counts = np.zeros(k, dtype=np.int64)
        assignment = np.empty(len(data), dtype=np.int64)
        dist2 = np.empty(len(data), dtype=np.float32)
        for start, x in data.chunks(opts.chunk_size):
            dd, a = search.search(x)
            assignment[start:start + len(x)], dist2[start:start + len(x)] = a, dd
            a_t, x_t = torch.from_numpy(a), torch.from_numpy(x)
            for i in range(0, len(x), _SUM_ROWS):  # float64 copies of a few rows at a time, not of the chunk
                sums.index_add_(0, a_t[i:i + _SUM_ROWS], x_t[i:i + _SUM_ROWS].double())
            counts += np.bincount(a, minlength=k)
        if previous is not None and np.array_equal(previous, assignment):
            # converged: the update would reproduce the centroids this assignment was made with
            return KMeansLevel(centroids, assignment, dist2)
        filled = counts > 0
        centroids[filled] = (sums.numpy()[filled] / counts[filled, None]).astype(np.float32)
        previous = assignment
    if not assign_all:
        return KMeansLevel(centroids, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
    assignment, dist2 = assign(data, centroids, opts)
    return KMeansLevel(centroids, assignment, dist2)


def kmeans(data, k: int, opts: KMeansOptions, rng: np.random.Generator, assign_all: bool = True) -> KMeansLevel:
    """One k-means run: seeding on a random subset, then Lloyd over all of ``data``."""
    n = len(data)
    sample = min(n, max(k, opts.init_sample_per_centroid * k))
    rows = np.sort(rng.choice(n, size=sample, replace=False)) if sample < n else np.arange(n)
    points = data.take(rows)
    if opts.init == "kmeans++":
        init = kmeans_plusplus(points, k, rng)
    else:
        init = points[rng.choice(len(points), size=k, replace=len(points) < k)]
    return lloyd(data, init, opts, assign_all)


def rank_within_clusters(assignment: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank of every item inside its cluster when ordered by ``key`` (ties: lower position first)."""
    n = len(assignment)
    order = np.lexsort((np.arange(n), key, assignment))  # by cluster, then key, then position
    clusters = assignment[order]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.searchsorted(clusters, clusters, side="left")
    return rank


def closest_per_cluster(assignment: np.ndarray, dist2: np.ndarray, s: int) -> np.ndarray:
    """Sorted positions of the (at most) ``s`` items of every cluster closest to its centroid."""
    return np.flatnonzero(rank_within_clusters(assignment, dist2) < s)


def default_sample_size(n: int, k: int) -> int:
    """Half the mean cluster size: small enough that the resampled set is balanced across clusters."""
    return max(1, math.ceil(n / k / 2))


def _phase_path(folder: Optional[Path], phase: int) -> Optional[Path]:
    return None if folder is None else Path(folder) / f"phase_{phase:03d}.npz"


def _save_phase(path: Optional[Path], level: KMeansLevel) -> None:
    if path is None:
        return
    from dinotxt.fileio import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, centroids=level.centroids, assignment=level.assignment, dist2=level.dist2)


def _load_phase(path: Optional[Path], n: int, dim: int) -> Optional[KMeansLevel]:
    if path is None or not path.is_file():
        return None
    with np.load(path) as z:
        level = KMeansLevel(z["centroids"], z["assignment"], z["dist2"])
    if level.centroids.shape[1] != dim or len(level.assignment) != n:
        raise ValueError(f"{path} was computed on {len(level.assignment)} items of width {level.centroids.shape[1]}, "
                         f"not {n} of width {dim}; delete the cluster folder to recompute")
    return level


def kmeans_level(data, k: int, opts: KMeansOptions, resampling_steps: int, sample_size: Optional[int],
                 seed: int, level: int, checkpoint: Optional[Path] = None, log=print) -> KMeansLevel:
    """One level: k-means, then ``resampling_steps`` resample-refit-reassign steps.

    Args:
        data: the items of this level (EmbeddingStore view or ArrayView).
        k: clusters.
        opts: k-means options.
        resampling_steps: R.
        sample_size: s points per cluster per resampling step (None: half the mean cluster size).
        seed, level: every random choice of phase p derives from ``(seed, level, p)``.
        checkpoint: folder for ``phase_NNN.npz`` files; finished phases are loaded, not recomputed.
    """
    n = len(data)
    if k > n:
        raise ValueError(f"level {level} asks for {k} clusters of only {n} items; lower cluster.levels")
    s = int(sample_size) if sample_size else default_sample_size(n, k)
    current = None
    for phase in range(resampling_steps + 1):
        path = _phase_path(checkpoint, phase)
        loaded = _load_phase(path, n, data.dim)
        if loaded is not None:
            current = loaded
            continue
        rng = np.random.default_rng([seed, level, phase])
        if phase == 0:
            log(f"level {level}: k-means, {k} clusters of {n:,} items")
            current = kmeans(data, k, opts, rng)
        else:
            rows = closest_per_cluster(current.assignment, current.dist2, s)
            log(f"level {level}: resampling step {phase}/{resampling_steps}: refit on {len(rows):,} items "
                f"(<= {s} per cluster), reassign all {n:,}")
            # a view of the pool, not a copy: the refit set can be half the pool
            refit = kmeans(data.subset(rows), k, opts, rng, assign_all=False)  # all items are assigned next
            assignment, dist2 = assign(data, refit.centroids, opts)
            current = KMeansLevel(refit.centroids, assignment, dist2)
        _save_phase(path, current)
    return current


def hierarchical_kmeans(data, levels: Sequence[int], opts: KMeansOptions, resampling_steps: Sequence[int],
                        sample_sizes: Sequence[Optional[int]], seed: int = 0, checkpoint_dir: Optional[Path] = None,
                        log=print) -> List[KMeansLevel]:
    """All levels, bottom first; level l runs on the centroids of level l-1."""
    out: List[KMeansLevel] = []
    for i, k in enumerate(levels):
        items = data if i == 0 else ArrayView(out[-1].centroids)
        folder = None if checkpoint_dir is None else Path(checkpoint_dir) / f"level{i + 1}"
        out.append(kmeans_level(items, k, opts, resampling_steps[i], sample_sizes[i], seed, i + 1, folder, log))
    return out


def cluster_sizes(levels: Sequence[KMeansLevel]) -> List[np.ndarray]:
    """Number of DATA points under every cluster of every level (what balanced sampling caps)."""
    sizes = [np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))]
    for lvl in levels[1:]:
        sizes.append(np.bincount(lvl.assignment, weights=sizes[-1], minlength=len(lvl.centroids)).astype(np.int64))
    return sizes
