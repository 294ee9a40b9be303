"""Balanced hierarchical sampling from a k-means hierarchy (Vo et al. 2024; METHOD.md section 7).

For a target size T: at the top level, find the integer cap c with sum_i min(c, size_i) <= T
as large as possible (binary search; size_i counts the DATA points under cluster i), give
each cluster min(c, size_i), and spread the remainder T - sum one point at a time over the
clusters that still have points left (most points left first, ties by lower cluster
index, so the result is a pure function of the sizes). Each cluster's budget is then
split the same way among its children one level down, and in a leaf (level-1) cluster
the points closest to the centroid are taken first (``closest``) or a seeded random
subset (``random``). Small clusters are kept whole; large ones are capped: the sample is
as uniform over the clusters as the data allows.

Over several processes (``balanced_selection``) the budgets come from all-reduced leaf sizes and
the small upper levels, and the leaves' "closest first" (or random) choice is the distributed
selection of ``selection.py``: the same items as the one-process sort, whatever the process count.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .kmeans import KMeansLevel
from .ranks import Ranks
from .selection import distance_keys, smallest_per_cluster, uniform_keys


def find_cap(sizes: np.ndarray, target: int) -> int:
    """Largest integer c >= 0 with sum(min(c, size_i)) <= target."""
    sizes = np.asarray(sizes, dtype=np.int64)
    lo, hi = 0, int(sizes.max()) if len(sizes) else 0
    while lo < hi:  # invariant: total(lo) <= target
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocate(sizes: np.ndarray, target: int) -> np.ndarray:
    """Per-cluster budgets summing to ``min(target, sum(sizes))``: the cap, then the remainder spread."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target >= sizes.sum():
        return sizes.copy()
    cap = find_cap(sizes, target)
    budget = np.minimum(sizes, cap)
    remainder = int(target - budget.sum())
    if remainder:
        # fewer than len(open) by construction: cap + 1 would overshoot the target
        open_ = np.flatnonzero(sizes > cap)
        order = open_[np.lexsort((open_, -(sizes[open_] - cap)))]
        budget[order[:remainder]] += 1
    return budget


def upper_sizes(leaf_sizes: np.ndarray, parents: Sequence[np.ndarray], widths: Sequence[int]) -> List[np.ndarray]:
    """Number of DATA points under every cluster of every level, bottom first, from the leaf sizes and each
    upper level's assignment of the clusters below it (``parents[i]``, level i + 2, ``widths[i]`` clusters)."""
    sizes = [np.asarray(leaf_sizes, dtype=np.int64)]
    for parent_of, width in zip(parents, widths):
        sizes.append(np.bincount(parent_of, weights=sizes[-1], minlength=width).astype(np.int64))
    return sizes


def leaf_budgets(levels: Sequence[KMeansLevel], target: int, leaf_sizes: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """Budget of every cluster at every level (bottom first), from the top level down. ``leaf_sizes``: the
    level-1 cluster sizes when ``levels[0]`` carries no assignment (it lives in the processes' chunks)."""
    if leaf_sizes is None:
        leaf_sizes = np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))
    sizes = upper_sizes(leaf_sizes, [lvl.assignment for lvl in levels[1:]], [len(lvl.centroids) for lvl in levels[1:]])
    budgets: List[Optional[np.ndarray]] = [None] * len(levels)
    budgets[-1] = allocate(sizes[-1], target)
    for lvl in range(len(levels) - 1, 0, -1):
        parent_of = levels[lvl].assignment  # level-(lvl) cluster of every level-(lvl-1) cluster
        child_budget = np.zeros(len(parent_of), dtype=np.int64)
        order = np.argsort(parent_of, kind="stable")
        bounds = np.searchsorted(parent_of[order], np.arange(len(budgets[lvl]) + 1))
        for parent, b in enumerate(budgets[lvl]):
            children = order[bounds[parent]:bounds[parent + 1]]
            if b and len(children):
                child_budget[children] = allocate(sizes[lvl - 1][children], int(b))
        budgets[lvl - 1] = child_budget
    return budgets


def balanced_selection(ranks: Ranks, leaves: Dict[int, Tuple[np.ndarray, np.ndarray, int]], upper: Sequence[KMeansLevel],
                       num_leaves: int, target: int, strategy: str = "closest", seed: int = 0) -> Dict[int, np.ndarray]:
    """{chunk: mask of its items in the balanced sample of ``target`` points}, over the processes' chunks.

    Args:
        ranks: the processes; each passes its own grid chunks of the level-1 items.
        leaves: ``{j: (assignment, dist2, start)}``: the level-1 cluster and squared distance of the items of
            chunk j, which are the consecutive level-1 items ``start, start + 1, ...``.
        upper: levels 2.. of the hierarchy (their assignments of the level below; small, on every rank).
        num_leaves: the number of level-1 clusters.
        target: T; must not exceed the number of points.
        strategy: ``closest`` (to the leaf centroid first) or ``random`` within leaves (ties: lower position).
        seed: for ``random``: the draws are one stream over the level-1 items, ``default_rng([seed, 7])``.
    """
    if strategy not in ("closest", "random"):
        raise ValueError(f"unknown sampling strategy {strategy!r}: use closest or random")
    leaf_sizes = ranks.all_reduce(sum((np.bincount(a, minlength=num_leaves) for a, _, _ in leaves.values()),
                                      np.zeros(num_leaves, dtype=np.int64)).astype(np.int64))
    n = int(leaf_sizes.sum())
    if target > n:
        raise ValueError(f"target size {target:,} is larger than the pool ({n:,} samples after de-duplication); "
                         "lower image_balance.target_size")
    stub = KMeansLevel(np.zeros((num_leaves, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
    budget = leaf_budgets([stub, *upper], target, leaf_sizes)[0]
    keys = {}
    for j, (a, dist2, start) in leaves.items():
        key = distance_keys(dist2) if strategy == "closest" else uniform_keys([seed, 7], start, len(a))
        keys[j] = (a, key, np.arange(start, start + len(a), dtype=np.int64))
    return smallest_per_cluster(ranks, keys, budget)


def balanced_sample(levels: Sequence[KMeansLevel], target: int, strategy: str = "closest",
                    seed: int = 0) -> np.ndarray:
    """Sorted positions (into the level-1 data) of a balanced sample of ``target`` points, in one process.

    Args:
        levels: the hierarchy, bottom level first (``hierarchical_kmeans``).
        target: T; must not exceed the number of points.
        strategy: ``closest`` (to the leaf centroid first) or ``random`` within leaves.
        seed: for ``random``.
    """
    first = levels[0]
    picked = balanced_selection(Ranks(), {0: (first.assignment, first.dist2, 0)}, levels[1:], len(first.centroids),
                                target, strategy, seed)[0]
    return np.flatnonzero(picked)


def normalized_entropy(counts: np.ndarray) -> float:
    """Entropy of a count distribution divided by ln(number of bins): 1.0 is perfectly uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) < 2 or counts.sum() <= 0:
        return 1.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))
