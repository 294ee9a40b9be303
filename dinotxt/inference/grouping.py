"""Bottom-up perceptual grouping: segments from the dense patch features alone, without text.

CLIPpy (Ranasinghe et al., ICCV 2023) asks whether an image-text model groups pixels into objects
on its own. Here the L2-normalised head patch tokens of one image (``encode_patches``, one pass at
``short_side``) are clustered into K segments:

- ``kmeans``: Lloyd's k-means on the normalised features, k-means++ seeding from a seeded generator,
  ``restarts`` seedings with the lowest within-segment sum of squares kept;
- ``spectral`` (Ng, Jordan & Weiss, NIPS 2001): the affinity ``W_ij = max(cos_ij, 0)`` (zero
  diagonal), the eigenvectors of the K smallest eigenvalues of the normalised Laplacian
  ``I - D^-1/2 W D^-1/2``, rows normalised, then the same k-means on them.

K is fixed (``segments=K``) or chosen per image (``segments="auto"``, K in 2..``max_segments``): the
largest mean silhouette (cosine distance) of the k-means partitions, or the largest gap between
consecutive eigenvalues of the Laplacian for spectral clustering (the eigengap heuristic).
Segment ids are renumbered in raster order of first appearance. The patch partition reaches the
pixels as the dense segmentation's scores do: the one-hot segment maps are upsampled bilinearly to
the output size and the argmax taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .dense import ImageLike, prepare_image, snap_to_patch

METHODS = ("kmeans", "spectral")


@dataclass
class GroupingResult:
    """Output of :func:`group_image`.

    Args:
        labels: (H, W) long segment ids at the output size.
        patch_labels: (h, w) segment ids of the patch grid.
        k: the number of segments (chosen per image with ``segments="auto"``).
        method: ``kmeans`` or ``spectral``.
    """

    labels: torch.Tensor
    patch_labels: torch.Tensor
    k: int
    method: str


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.t() + c.pow(2).sum(1)[None]).clamp_min(0)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 100, restarts: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,), centroids (k, D)) of Lloyd's k-means on the rows of ``x`` (float64, k-means++ seeding);
    the best of ``restarts`` seedings by within-cluster sum of squares. A pure function of ``seed``."""
    x = x.detach().double().cpu()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} segments of {n} points: choose 1 <= K <= {n}")
    g = torch.Generator().manual_seed(int(seed))
    best: Optional[Tuple[float, torch.Tensor, torch.Tensor]] = None
    for _ in range(max(1, restarts)):
        centroids = x[torch.randint(n, (1,), generator=g)]
        for _ in range(1, k):
            d2 = _sq_dist(x, centroids).min(1).values
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if float(d2.sum()) > 0 else torch.randint(n, (1,), generator=g)
            centroids = torch.cat([centroids, x[pick]])
        for _ in range(iters):
            labels = _sq_dist(x, centroids).argmin(1)
            onehot = F.one_hot(labels, k).double()
            counts = onehot.sum(0)
            # an emptied cluster keeps its centroid
            moved = torch.where(counts[:, None] > 0, onehot.t() @ x / counts.clamp_min(1)[:, None], centroids)
            if torch.equal(moved, centroids):
                break
            centroids = moved
        labels = _sq_dist(x, centroids).argmin(1)
        inertia = float((x - centroids[labels]).pow(2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centroids)
    return best[1], best[2]


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (Rousseeuw 1987) of a partition of the rows of ``x`` under the cosine distance:
    ``(b - a) / max(a, b)`` per row, ``a`` its mean distance to its own segment, ``b`` to the nearest
    other one; 0 for a row alone in its segment, and 0 for a single segment."""
    x = F.normalize(x.double(), dim=-1)
    dist = (1 - x @ x.t()).clamp_min(0)
    ids, inv = labels.unique(return_inverse=True)
    if len(ids) < 2:
        return 0.0
    rows = torch.arange(len(x))
    sizes = F.one_hot(inv, len(ids)).double().sum(0)
    sums = dist @ F.one_hot(inv, len(ids)).double()  # (N, segments): summed distance to every segment
    own = sizes[inv]
    a = sums[rows, inv] / (own - 1).clamp_min(1)
    other = sums / sizes
    other[rows, inv] = float("inf")
    b = other.min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s[own == 1] = 0
    return float(s.mean())


def laplacian_eigen(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the normalised Laplacian of ``W = max(cos, 0)``."""
    x = F.normalize(x.double(), dim=-1)
    w = (x @ x.t()).clamp_min(0)
    w.fill_diagonal_(0)
    d = w.sum(1).clamp_min(1e-12).rsqrt()
    lap = torch.eye(len(x), dtype=torch.float64) - d[:, None] * w * d[None, :]
    return torch.linalg.eigh(lap)


def renumber(labels: torch.Tensor) -> torch.Tensor:
    """Segment ids in raster order of first appearance (0 = the segment of the first pixel), so colours are stable."""
    flat = labels.flatten()
    order = []
    for v in flat.tolist():
        if v not in order:
            order.append(v)
    lookup = torch.full((int(flat.max()) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(order)] = torch.arange(len(order))
    return lookup[labels]


def cluster_patches(features: torch.Tensor, segments: Union[int, str] = 4, method: str = "kmeans", seed: int = 0,
                    max_segments: int = 8) -> Tuple[torch.Tensor, int]:
    """(segment id per row (N,), K) of patch features (N, D); see the module docstring."""
    if method not in METHODS:
        raise ValueError(f"unknown grouping method '{method}' (use {' or '.join(METHODS)})")
    x = F.normalize(features.detach().double().cpu(), dim=-1)
    n = x.shape[0]
    values, vectors = laplacian_eigen(x) if method == "spectral" else (None, None)
    labels = None
    if segments == "auto":
        top = min(max_segments, n - 1)
        if top < 2:
            raise ValueError(f"--segments auto needs at least 3 patches and max segments >= 2 (have {n} patches)")
        if method == "spectral":
            k = int(torch.argmax(values[2:top + 1] - values[1:top])) + 2  # lambda_(K+1) - lambda_K, 1-indexed
        else:
            # k-means depends only on its seed: the partition scored for the chosen K is the answer
            parts = {kk: kmeans(x, kk, seed)[0] for kk in range(2, top + 1)}
            scores = {kk: silhouette(x, part) for kk, part in parts.items()}
            k = max(scores, key=lambda kk: (scores[kk], -kk))
            labels = parts[k]
    else:
        k = int(segments)
        if not 1 <= k <= n:
            raise ValueError(f"--segments {k}: the image has {n} patches at this size; choose 1 <= K <= {n}")
    if method == "spectral":
        labels, _ = kmeans(F.normalize(vectors[:, :k], dim=-1), k, seed)
    elif labels is None:
        labels, _ = kmeans(x, k, seed)
    return labels, k


def upsample_segments(patch_labels: torch.Tensor, k: int, size: Tuple[int, int]) -> torch.Tensor:
    """(H, W) segment ids: the one-hot maps of an (h, w) partition, upsampled bilinearly, argmax."""
    onehot = F.one_hot(patch_labels.long(), k).permute(2, 0, 1)[None].double()
    if tuple(patch_labels.shape) == tuple(size):
        return patch_labels.long()
    return F.interpolate(onehot, size=tuple(size), mode="bilinear", align_corners=False)[0].argmax(0)


def _prepare(model, image: ImageLike, short_side: Optional[int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    if short_side is None:
        short_side = int(getattr(model.backbone, "img_size", 224))
    x, original = prepare_image(image, short_side)
    size = tuple(snap_to_patch(s, model.patch_size) for s in x.shape[-2:])
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x, original


@torch.no_grad()
def patch_features_batch(model, images: Sequence[ImageLike], short_side: Optional[int] = None,
                         batch_size: int = 16) -> List[Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]]:
    """:func:`patch_features` of several images; those of the same prepared size share forward passes."""
    prepared = [_prepare(model, image, short_side) for image in images]
    param = next(model.parameters())
    feats: List[Optional[torch.Tensor]] = [None] * len(prepared)
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for i, (x, _) in enumerate(prepared):
        groups.setdefault(tuple(x.shape), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            batch = torch.cat([prepared[i][0] for i in chunk]).to(param.device, param.dtype)
            for i, f in zip(chunk, model.encode_patches(batch, normalize=True).float().cpu()):
                feats[i] = f
    return [(f, x.float(), original) for f, (x, original) in zip(feats, prepared)]


def patch_features(model, image: ImageLike, short_side: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]:
    """(normalised head patch tokens (h, w, D), the prepared image (1, 3, h', w') snapped to the patch grid,
    the original (H, W)). ``short_side`` defaults to the model's training resolution."""
    return patch_features_batch(model, [image], short_side)[0]


@torch.no_grad()
def group_image(model, image: ImageLike, segments: Union[int, str] = 4, method: str = "kmeans",
                short_side: Optional[int] = None, seed: int = 0, max_segments: int = 8,
                output_size: Optional[Tuple[int, int]] = None) -> GroupingResult:
    """Group one image's patches into segments (see the module docstring).

    Args:
        model: a dinotxt model (``encode_patches``, ``patch_size``).
        image: PIL image, image path, or a normalised (3, H, W) tensor.
        segments: K, or ``"auto"`` (chosen per image, up to ``max_segments``).
        method: ``kmeans`` or ``spectral``.
        short_side: the image's short side before the model (default: its training resolution).
        seed: seed of the k-means seeding.
        output_size: (H, W) of the returned labels; default: the input image's size.
    """
    feats, _, original = patch_features(model, image, short_side)
    h, w, d = feats.shape
    labels, k = cluster_patches(feats.reshape(h * w, d), segments, method, seed, max_segments)
    grid = renumber(labels.reshape(h, w))
    return GroupingResult(upsample_segments(grid, k, output_size or original), grid, k, method)
