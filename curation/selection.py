"""The ``q_c`` items of every cluster c with the smallest key, over items spread across processes.

Two stages pick "the points of each cluster closest to its centroid": a k-means resampling step
(``s`` per cluster, ``kmeans.py``) and balanced sampling in the leaves (a budget per leaf cluster,
``sampling.py``). On one machine that is a sort by (cluster, key, position). Across processes
nothing is gathered: each rank holds the (cluster, key, position) of its own grid chunks, and a
per-cluster bisection on the key finds the threshold ``tau_c`` where the all-reduced count of
items with ``key <= tau_c`` first reaches ``q_c`` (at most 64 rounds of one integer all-reduce
of k counts). Items on the threshold are then split by a second bisection on the global position,
so ties go to the lower position, exactly as the sort would. Keys are non-negative integers
whose order is the order wanted: the bits of a non-negative float32 distance (``distance_keys``),
or the 53 bits of a uniform draw (``uniform_keys``).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from .ranks import Ranks


def distance_keys(dist2: np.ndarray) -> np.ndarray:
    """Order-preserving int64 keys of non-negative float32 distances (their IEEE bit patterns; -0.0 -> 0)."""
    d = np.asarray(dist2, dtype=np.float32)
    d = np.where(d > 0, d, np.float32(0))
    return d.view(np.uint32).astype(np.int64)


def uniform_keys(seed, start: int, count: int) -> np.ndarray:
    """int64 keys of the uniform draws ``start .. start + count - 1`` of ``np.random.default_rng(seed).random``:
    a seekable generator (PCG64 ``advance``), so any process draws its own range of one pool-wide stream."""
    bits = np.random.PCG64(seed)
    bits.advance(int(start))
    u = np.random.Generator(bits).random(int(count))
    return (u * float(1 << 53)).astype(np.int64)  # exact: the doubles are multiples of 2**-53


Chunk = Tuple[np.ndarray, np.ndarray, np.ndarray]  # (cluster, key, global position) of one chunk's items


def smallest_per_cluster(ranks: Ranks, chunks: Dict[int, Chunk], quota: np.ndarray) -> Dict[int, np.ndarray]:
    """{chunk: mask of its items chosen}: in every cluster c, the ``quota[c]`` items with the smallest
    (key, position) over all processes' chunks (all of them when the cluster is smaller).

    Args:
        ranks: the processes; every rank calls this with its own chunks.
        chunks: this rank's chunks, ``{j: (cluster, key, position)}``; keys and positions are int64 >= 0.
        quota: items wanted per cluster (length = number of clusters, the same on every rank).
    """
    quota = np.asarray(quota, dtype=np.int64)
    k = len(quota)
    order = sorted(chunks)
    if order:
        cluster = np.concatenate([chunks[j][0] for j in order]).astype(np.int64)
        key = np.concatenate([chunks[j][1] for j in order]).astype(np.int64)
        pos = np.concatenate([chunks[j][2] for j in order]).astype(np.int64)
    else:
        cluster = key = pos = np.zeros(0, dtype=np.int64)

    def count(mask: np.ndarray) -> np.ndarray:
        return ranks.all_reduce(np.bincount(cluster[mask], minlength=k).astype(np.int64))

    sizes = count(np.ones(len(cluster), dtype=bool))
    wanted = np.minimum(quota, sizes)
    active = wanted > 0
    top = ranks.all_reduce(np.array([key.max() if len(key) else 0, pos.max() if len(pos) else 0], np.int64), "max")
    # tau_c: the smallest key with #{key <= tau_c} >= wanted_c
    lo, hi = np.zeros(k, np.int64), np.full(k, top[0], np.int64)
    while (active & (lo < hi)).any():
        open_ = active & (lo < hi)
        mid = lo + (hi - lo) // 2
        enough = count(key <= mid[cluster]) >= wanted
        hi = np.where(open_ & enough, mid, hi)
        lo = np.where(open_ & ~enough, mid + 1, lo)
    tau = lo
    below = key < tau[cluster]
    on = key == tau[cluster]
    need = wanted - count(below)
    ties = active & (need < count(on))
    cut = np.full(k, top[1], np.int64)  # the last position taken on the threshold
    if ties.any():
        lo, hi = np.zeros(k, np.int64), np.full(k, top[1], np.int64)
        while (ties & (lo < hi)).any():
            open_ = ties & (lo < hi)
            mid = lo + (hi - lo) // 2
            enough = count(on & (pos <= mid[cluster])) >= need
            hi = np.where(open_ & enough, mid, hi)
            lo = np.where(open_ & ~enough, mid + 1, lo)
        cut = np.where(ties, lo, cut)
    chosen = active[cluster] & (below | (on & (pos <= cut[cluster])))
    out, start = {}, 0
    for j in order:
        n = len(chunks[j][0])
        out[j] = chosen[start:start + n]
        start += n
    return out


__all__ = ["smallest_per_cluster", "distance_keys", "uniform_keys"]
