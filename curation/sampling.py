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
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from .kmeans import KMeansLevel, cluster_sizes, rank_within_clusters


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


def leaf_budgets(levels: Sequence[KMeansLevel], target: int) -> List[np.ndarray]:
    """Budget of every cluster at every level (bottom first), from the top level down."""
    sizes = cluster_sizes(levels)
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


def balanced_sample(levels: Sequence[KMeansLevel], target: int, strategy: str = "closest",
                    seed: int = 0) -> np.ndarray:
    """Sorted positions (into the level-1 data) of a balanced sample of ``target`` points.

    Args:
        levels: the hierarchy, bottom level first (``hierarchical_kmeans``).
        target: T; must not exceed the number of points.
        strategy: ``closest`` (to the leaf centroid first) or ``random`` within leaves.
        seed: for ``random``.
    """
    n = len(levels[0].assignment)
    if target > n:
        raise ValueError(f"target size {target:,} is larger than the pool ({n:,} samples after de-duplication); "
                         "lower image_balance.target_size")
    if strategy not in ("closest", "random"):
        raise ValueError(f"unknown sampling strategy {strategy!r}: use closest or random")
    leaf = leaf_budgets(levels, target)[0]
    assignment = levels[0].assignment
    if strategy == "closest":
        within = levels[0].dist2.astype(np.float64)
    else:
        within = np.random.default_rng([seed, 7]).random(n)
    return np.flatnonzero(rank_within_clusters(assignment, within) < leaf[assignment])


def normalized_entropy(counts: np.ndarray) -> float:
    """Entropy of a count distribution divided by ln(number of bins): 1.0 is perfectly uniform."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) < 2 or counts.sum() <= 0:
        return 1.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))
