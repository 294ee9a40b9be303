"""Near-duplicate removal on image embeddings with faiss.

Every sample's ``neighbors`` nearest neighbours by cosine similarity (inner product of the
L2-normalised embeddings) are searched; pairs at or above ``threshold`` are linked and the
connected components are the duplicate groups (so a group can be larger than the
neighbour list). One representative per group is kept: the member with the smallest
sample id, a choice that depends only on the group, not on reading order.

Index: exact search (``flat``) stores the embeddings as float16 in faiss
(``IndexScalarQuantizer(QT_fp16)``: lossless, since they are float16 on disk); large
pools use an inverted file (``ivf``: ``IndexIVFScalarQuantizer``, ``nlist`` lists trained
on a sample, ``nprobe`` probed), which finds near duplicates reliably because they fall
in the same or neighbouring lists. On GPU, faiss replicates the index over all GPUs.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numpy as np


def _union_find_groups(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (its smallest member position) of every item for the edges (a_i, b_i)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(a.tolist(), b.tolist()):
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.fromiter((root(i) for i in range(n)), dtype=np.int64, count=n)


def _return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_index(store, kind: str, nlist, nprobe: int, chunk_size: int, seed: int, gpus: int = 0):
    """A faiss inner-product index holding every row of ``store`` (float16 inside faiss), and the
    rows' L2 norms (float64), computed in the same pass over the store."""
    import faiss

    n, d = len(store), store.dim
    fp16 = faiss.ScalarQuantizer.QT_fp16
    if kind == "flat":
        index = faiss.IndexScalarQuantizer(d, fp16, faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = int(nlist or max(1, min(n // 39, int(4 * math.sqrt(n)))))  # faiss wants >= 39 points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, fp16, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng([seed, 11])
        sample = np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))
        index.train(store.take(sample))
        index.nprobe = int(min(nprobe, nlist))
    if gpus > 0:  # GPU flat indexes hold float16 through the cloner option instead of a scalar quantizer
        options = faiss.GpuMultipleClonerOptions()
        options.useFloat16 = True
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d) if kind == "flat" else index, co=options)
    norms = []
    for _, x in store.chunks(chunk_size):
        index.add(x)
        norms.append(np.linalg.norm(x.astype(np.float64), axis=1))
    return index, np.concatenate(norms) if norms else np.zeros(0)


def near_duplicates(store, uids: np.ndarray, threshold: float = 0.95, neighbors: int = 16, index: str = "auto",
                    flat_max: int = 200_000, nlist=None, nprobe: int = 16, chunk_size: int = 16384, seed: int = 0,
                    gpus: int = 0) -> Tuple[np.ndarray, Dict]:
    """(keep mask over the rows of ``store``, statistics).

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
    """
    n = len(store)
    if n == 0:
        return np.zeros(0, dtype=bool), {"groups": 0, "removed": 0, "kept": 0, "group_sizes": {}}
    kind = index if index != "auto" else ("flat" if n <= flat_max else "ivf")
    faiss_index, norms = build_index(store, kind, nlist, nprobe, chunk_size, seed, gpus)
    k = min(n, neighbors + 1)  # +1: a sample finds itself
    # float16 rows are unit length only to ~1e-4: the inner product of a row with its exact copy can be
    # 0.9999, which would hide exact duplicates at threshold 1.0. Divide by the norms (cosine proper) and
    # allow float32 rounding of the inner product (1e-5).
    norms = np.maximum(norms, 1e-12)
    edges_a, edges_b = [], []
    for start, x in store.chunks(chunk_size):
        sims, idx = faiss_index.search(x, k)
        rows = np.arange(start, start + len(x))[:, None].repeat(k, 1)
        cosine = sims / (norms[start:start + len(x), None] * norms[np.maximum(idx, 0)])
        hit = (cosine >= threshold - 1e-5) & (idx >= 0) & (idx != rows)
        edges_a.append(rows[hit])
        edges_b.append(idx[hit])
    a, b = np.concatenate(edges_a), np.concatenate(edges_b)
    del faiss_index
    _return_freed_memory()  # the index's pages would otherwise stay in this process during clustering
    # label every component by its smallest position, then keep its smallest uid
    component = _union_find_groups(n, a, b)
    uids = np.asarray(uids, dtype=np.int64)
    order = np.lexsort((uids, component))
    first = np.ones(n, dtype=bool)
    first[1:] = component[order][1:] != component[order][:-1]
    keep = np.zeros(n, dtype=bool)
    keep[order[first]] = True
    sizes = np.bincount(component, minlength=n)
    group_sizes = sizes[sizes > 1]
    hist = {int(s): int(c) for s, c in zip(*np.unique(group_sizes, return_counts=True))}
    return keep, {"index": kind, "groups": int(len(group_sizes)), "removed": int(n - keep.sum()),
                  "kept": int(keep.sum()), "group_sizes": hist}
