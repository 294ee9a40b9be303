"""Perceptual grouping scored as unsupervised segmentation (CLIPpy's bottom-up evaluation).

Every image of a segmentation dataset (any layout ``evaluation/datasets.py`` reads) is grouped into K
segments without text (``dinotxt.inference.grouping``). Segments carry no class, so each image's
segments are matched one-to-one to the classes present in its label map by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) maximising the summed IoU (ignored pixels left out); a
matched segment predicts its class, an unmatched one predicts nothing (its pixels count against their
true class). The matched predictions accumulate into one confusion over the dataset, and the report
gives mmsegmentation's mIoU over the classes with a non-empty union, and pixel accuracy.

Next to the model, with the SAME K per image, the same patch grid and the same upsampling:

- ``random_voronoi``: K seed cells drawn uniformly from the patch grid, every cell joining its nearest
  seed: a random partition into K spatially coherent segments (the strongest random partition here);
- ``random_cells``: every patch cell drawn uniformly from the K segments;
- ``colour_kmeans``: the same k-means over the mean colour of every patch cell: what grouping by raw
  pixel colour alone achieves (on the demo world, whose objects are saturated colours on muted
  backgrounds, a strong baseline).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.fileio import atomic_write_json
from ..inference.grouping import cluster_patches, patch_features_batch, renumber, upsample_segments
from ..inference.settings import EXAMPLE_OVERLAYS
from .datasets import IGNORE_INDEX, SegmentationDataset

log = logging.getLogger(__name__)

BASELINES = ("random_voronoi", "random_cells", "colour_kmeans")


def segment_class_iou(segments: np.ndarray, labels: np.ndarray, k: int, num_classes: int,
                      ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(k, num_classes) IoU of every segment with every class over the non-ignored pixels."""
    keep = labels != ignore_index
    seg, lab = segments[keep].astype(np.int64), labels[keep].astype(np.int64)
    inter = np.bincount(seg * num_classes + lab, minlength=k * num_classes).reshape(k, num_classes).astype(np.float64)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def hungarian_match(iou: np.ndarray, classes: Optional[Sequence[int]] = None) -> Dict[int, int]:
    """{segment: class} one-to-one, maximising the summed IoU (over ``classes`` only, when given)."""
    from scipy.optimize import linear_sum_assignment

    cols = np.arange(iou.shape[1]) if classes is None else np.asarray(list(classes), dtype=np.int64)
    if len(cols) == 0 or iou.shape[0] == 0:
        return {}
    rows, picked = linear_sum_assignment(iou[:, cols], maximize=True)
    return {int(r): int(cols[c]) for r, c in zip(rows, picked)}


def matched_confusion(segments: np.ndarray, labels: np.ndarray, k: int, num_classes: int,
                      ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C + 1) counts of one image after the Hungarian matching: rows = true class, columns = the
    matched segment's class, the last column = pixels of unmatched segments."""
    keep = labels != ignore_index
    present = np.unique(labels[keep])
    match = hungarian_match(segment_class_iou(segments, labels, k, num_classes, ignore_index), present)
    lookup = np.full(k, num_classes, dtype=np.int64)
    for seg, cls in match.items():
        lookup[seg] = cls
    pred = lookup[segments[keep].astype(np.int64)]
    truth = labels[keep].astype(np.int64)
    return np.bincount(truth * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1)).reshape(
        num_classes, num_classes + 1)


def matched_metrics(confusion: np.ndarray) -> Dict[str, float]:
    """mIoU (classes with a non-empty union) and pixel accuracy of a (C, C + 1) matched confusion."""
    conf = np.asarray(confusion, dtype=np.float64)
    c = conf.shape[0]
    tp = np.diag(conf[:, :c])
    union = conf.sum(1) + conf[:, :c].sum(0) - tp
    iou = tp[union > 0] / union[union > 0]
    total = conf.sum()
    return {"miou": float(iou.mean()) if len(iou) else float("nan"), "aacc": float(tp.sum() / total) if total else float("nan")}


def random_voronoi(h: int, w: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """(h, w) partition into ``k`` cells around seed cells drawn uniformly without replacement."""
    seeds = rng.choice(h * w, size=k, replace=False)
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (yy.reshape(-1, 1) - seeds[None] // w) ** 2 + (xx.reshape(-1, 1) - seeds[None] % w) ** 2
    return renumber(torch.from_numpy(d2.argmin(1).reshape(h, w)))


def random_cells(h: int, w: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """(h, w) partition with every cell drawn uniformly from ``k`` segments."""
    return torch.from_numpy(rng.integers(0, k, size=(h, w)))


def cell_colours(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(h*w, 3) mean colour of every patch cell of a prepared (1, 3, H, W) image."""
    return F.avg_pool2d(image.double(), patch)[0].flatten(1).t()


@torch.no_grad()
def evaluate_grouping(model, dataset: SegmentationDataset, segments: Union[int, str] = 4, method: str = "kmeans",
                      short_side: Optional[int] = None, seed: int = 0, max_segments: int = 8,
                      limit: Optional[int] = None, out_dir: Optional[Union[str, Path]] = None,
                      num_examples: int = EXAMPLE_OVERLAYS,
                      progress: bool = True) -> Dict:
    """Group every image of ``dataset`` and score it as unsupervised segmentation (see the module docstring).

    Args:
        model: a dinotxt model.
        dataset: a ``SegmentationDataset`` (``segmentation_dataset``: ADE20K, VOC, ..., the demo world).
        segments: K for every image, or ``"auto"`` (chosen per image; the baselines use the same K).
        method: ``kmeans`` or ``spectral``.
        short_side: the images' short side before the model (default: its training resolution).
        seed: seeds the k-means seeding and the random partitions (image i uses ``seed + i``).
        limit: the first ``limit`` images only.
        out_dir: when given, writes ``metrics.json`` and overlays of the first ``num_examples`` images.
    """
    num = len(dataset) if limit is None else min(limit, len(dataset))
    names = list(dataset.class_names)
    c = len(names)
    conf = {name: np.zeros((c, c + 1), dtype=np.int64) for name in ("model",) + BASELINES}
    ks: List[int] = []
    examples = []
    start = time.time()
    chunk: List = []
    for i in range(num):
        if not chunk:  # the model runs over a few images at a time (same-size images batch)
            samples = [dataset[j] for j in range(i, min(num, i + 16))]
            chunk = list(zip(samples, patch_features_batch(model, [s.image for s in samples], short_side)))
        sample, (feats, image, _) = chunk.pop(0)
        labels = np.asarray(sample.labels)
        size = labels.shape
        h, w, d = feats.shape
        flat, k = cluster_patches(feats.reshape(h * w, d), segments, method, seed + i, max_segments)
        grid = renumber(flat.reshape(h, w))
        rng = np.random.default_rng(seed + i)
        colour, _ = cluster_patches(cell_colours(image, model.patch_size), k, "kmeans", seed + i)
        partitions = {"model": grid, "random_voronoi": random_voronoi(h, w, k, rng), "random_cells": random_cells(h, w, k, rng),
                      "colour_kmeans": renumber(colour.reshape(h, w))}
        for name, part in partitions.items():
            conf[name] += matched_confusion(upsample_segments(part, k, size).numpy(), labels, k, c)
        ks.append(k)
        if out_dir is not None and len(examples) < num_examples:
            examples.append((sample, upsample_segments(grid, k, size).numpy(), k, names))
        if progress and (i + 1) % max(1, num // 10) == 0:
            log.info(f"grouping {dataset.name}: {i + 1}/{num} images, {time.time() - start:.0f} s")
    metrics = {name: matched_metrics(m) for name, m in conf.items()}
    res = {"dataset": dataset.name, "num_images": num, "num_classes": c, "method": method,
           "segments": segments if segments == "auto" else int(segments), "mean_k": float(np.mean(ks)),
           "miou": metrics["model"]["miou"], "aacc": metrics["model"]["aacc"],
           **{f"{b}_miou": metrics[b]["miou"] for b in BASELINES}, "seconds": round(time.time() - start, 1),
           "seed": seed}
    if out_dir is not None:
        write_grouping_report(res, Path(out_dir), examples)
    return res


def write_grouping_report(metrics: Dict, out_dir: Path, examples: Sequence[Tuple]) -> None:
    """metrics.json and, per example, the segments next to the label map."""
    from PIL import Image

    from ..inference.visualize import overlay_segmentation, save_image

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    for n, (sample, segs, k, names) in enumerate(examples):
        left = overlay_segmentation(sample.image, segs, [f"segment {j + 1}" for j in range(k)], title=f"{k} segments")
        truth = np.where(sample.labels == IGNORE_INDEX, len(names), sample.labels)
        right = overlay_segmentation(sample.image, truth, list(names) + ["(ignored)"], title="label map")
        sheet = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), (255, 255, 255))
        sheet.paste(left, (0, 0))
        sheet.paste(right, (left.width + 8, 0))
        save_image(sheet, out_dir / "examples" / f"{n:02d}_{Path(str(sample.name)).name}.png")
