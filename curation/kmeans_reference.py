"""Plain pure-torch k-means: the reference for ``curation/kmeans.py``.

The same algorithm as the faiss implementation (k-means++ seeding on a random subset,
Lloyd with float64 centroid sums, empty clusters keep their centroid, resampling steps,
levels on the previous level's centroids), written the obvious way: the whole data as
one float32 tensor, distances by matrix product. It is the baseline of
``bench/curation_bench.py`` and the parity reference of the tests; it is not used by
the pipeline (it needs the pool in RAM, twice: fp16 on disk becomes fp32 here).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    c_sq = (c * c).sum(1)
    idx, dist = [], []
    for s in range(0, len(x), chunk):
        xb = x[s:s + chunk]
        d = (xb * xb).sum(1, keepdim=True) - 2 * xb @ c.T + c_sq
        m = d.min(1)
        idx.append(m.indices)
        dist.append(m.values.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def torch_kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = len(x)
    centers = torch.empty(k, x.shape[1])
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = x[first]
    closest = ((x - x[first]) ** 2).sum(1).double()
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(closest / total, 1, generator=generator))
        centers[i] = x[pick]
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1).double())
    return centers


def torch_lloyd(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centroids, assignment, squared distance) after ``iters`` Lloyd iterations (early stop when stable)."""
    c = centroids.clone().float()
    previous = None
    for _ in range(iters):
        a, d = _nearest(x, c)
        if previous is not None and torch.equal(a, previous):
            return c, a, d
        sums = torch.zeros(c.shape, dtype=torch.float64).index_add_(0, a, x.double())
        counts = torch.bincount(a, minlength=len(c))
        filled = counts > 0
        c[filled] = (sums[filled] / counts[filled, None]).float()
        previous = a
    a, d = _nearest(x, c)
    return c, a, d


def torch_kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0, init_sample_per_centroid: int = 64,
                 init: Optional[torch.Tensor] = None):
    """k-means++ (on a random subset) + Lloyd; ``init`` skips the seeding (parity tests)."""
    if init is None:
        g = torch.Generator().manual_seed(seed)
        n = len(x)
        m = min(n, max(k, init_sample_per_centroid * k))
        rows = torch.randperm(n, generator=g)[:m].sort().values
        init = torch_kmeans_plusplus(x[rows], k, g)
    return torch_lloyd(x, init, iters)


def torch_hierarchical_kmeans(x: torch.Tensor, levels: Sequence[int], iters: int, resampling_steps: Sequence[int],
                              sample_sizes: Sequence[Optional[int]], seed: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(centroids, assignment)] per level, bottom first, with resampling as in ``curation.kmeans``."""
    out = []
    items = x
    for level, k in enumerate(levels):
        c, a, d = torch_kmeans(items, k, iters, seed=seed * 1000 + level)
        s = sample_sizes[level] or max(1, math.ceil(len(items) / k / 2))
        for step in range(resampling_steps[level]):
            order = torch.argsort(d + a.double() * (d.max() + 1).double())  # by cluster, then distance
            ca = a[order]
            starts = torch.searchsorted(ca, ca)
            keep = order[(torch.arange(len(ca)) - starts) < s]
            c, _, _ = torch_kmeans(items[keep], k, iters, seed=seed * 1000 + level * 100 + step + 1)
            a, d = _nearest(items, c)
        out.append((c, a))
        items = c
    return out
