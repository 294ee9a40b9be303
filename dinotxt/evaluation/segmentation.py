"""Open-vocabulary semantic segmentation evaluation (METHOD.md section 4).

Every image is segmented with ``dinotxt.inference.dense`` (class embeddings computed once),
the prediction is compared with the label map at the label's size, and one confusion
matrix (rows: ground truth, columns: prediction; ignore index 255) accumulates over the
dataset. Metrics follow mmsegmentation: per-class IoU = TP / (TP + FP + FN), mean IoU over
the classes with a non-empty union (a class absent from both the labels and the
predictions does not count), pixel accuracy and mean class accuracy.

Next to the model, the report gives a trivial baseline computed from the same label
statistics: predicting the most frequent class everywhere (and, when the dataset has a
background class, predicting background everywhere), so a reader can judge the number.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..utils.fileio import atomic_write_json, atomic_write_text
from ..inference.dense import DEFAULTS, DenseSettings, dense_classifier, segment_batch
from ..inference.settings import EXAMPLE_OVERLAYS
from .datasets import IGNORE_INDEX, SegmentationDataset

log = logging.getLogger(__name__)


def confusion_matrix(pred: Union[np.ndarray, torch.Tensor], target: Union[np.ndarray, torch.Tensor], num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(K, K) int64 counts, rows = ground-truth class, columns = predicted class; ignored pixels skipped."""
    pred = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(np.int64).ravel()
    target = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels but the label map {target.size}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"label value {int(target.max())} is outside 0..{num_classes - 1} and not the ignore index {ignore_index}")
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted class {int(pred.max())} is outside 0..{num_classes - 1}")
    return np.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray, class_names: Optional[Sequence[str]] = None) -> Dict:
    """mIoU, pixel accuracy (aAcc), mean class accuracy (mAcc) and the per-class table of a confusion matrix."""
    conf = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(1)
    pred = conf.sum(0)
    union = gt + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = conf.sum()
    return {
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "macc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "aacc": float(tp.sum() / total) if total else float("nan"),
        "per_class": [{"name": n, "iou": _num(i), "acc": _num(a), "pixels": int(g)} for n, i, a, g in zip(names, iou, acc, gt)],
    }


def _num(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def constant_prediction_miou(confusion: np.ndarray, cls: int) -> float:
    """mIoU of predicting class ``cls`` on every (non-ignored) pixel, from the label counts alone."""
    gt = np.asarray(confusion).sum(1).astype(np.float64)
    total = gt.sum()
    if total == 0:
        return float("nan")
    present = gt > 0
    present[cls] = True  # the constant class is predicted, so its union is never empty
    return float((gt[cls] / total) / present.sum())


def per_class_table(metrics: Dict, title: str = "") -> str:
    """Markdown table of per-class IoU / accuracy / pixel share, worst IoU first."""
    rows = metrics["per_class"]
    total = sum(r["pixels"] for r in rows) or 1
    lines = [f"### {title}" if title else "", "", "| class | IoU | acc | pixels |", "|---|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["iou"] is None, r["iou"] if r["iou"] is not None else 0)):
        lines.append(f"| {r['name']} | {fmt(r['iou'])} | {fmt(r['acc'])} | {100 * r['pixels'] / total:.2f}% |")
    lines.append(f"| **mean** | **{100 * metrics['miou']:.1f}** | {100 * metrics['macc']:.1f} | |")
    return "\n".join(l for l in lines if l is not None).lstrip("\n") + "\n"


@torch.no_grad()
def evaluate_segmentation(model, tokenizer: Optional[Callable], dataset: SegmentationDataset,
                          settings: DenseSettings = DEFAULTS, limit: Optional[int] = None,
                          out_dir: Optional[Union[str, Path]] = None, num_examples: int = EXAMPLE_OVERLAYS,
                          classifier: Optional[torch.Tensor] = None, progress: bool = True) -> Dict:
    """Segment every image of ``dataset`` and score it against its label map.

    Args:
        model, tokenizer: a dinotxt model and its tokenizer.
        dataset: a ``SegmentationDataset`` (see ``segmentation_dataset``).
        settings: ``DenseSettings`` (mode, short side, window, stride, templates, ...). Its
            ``background_threshold`` is for datasets whose label 0 is background: the other classes
            are queried and background is predicted where the best probability is below it.
        limit: evaluate only the first ``limit`` images (quick checks).
        out_dir: when given, writes ``metrics.json``, ``per_class_iou.md``, ``confusion.png`` and
            overlays of the first ``num_examples`` images (prediction | ground truth).
        classifier: precomputed class embeddings (C, D) for the queried classes.
    """
    names = list(dataset.class_names)
    mode, templates, background_threshold = settings.mode, settings.templates, settings.background_threshold
    if background_threshold is not None:
        if not dataset.has_background:
            raise ValueError(f"a background threshold needs a dataset whose label 0 is background; {dataset.name} has none "
                             "(use voc21, demo_bg, or custom with --has-background)")
        queried = names[1:]
    else:
        queried = names
    if classifier is None:
        classifier = dense_classifier(model, tokenizer, queried, templates)
    num = len(dataset) if limit is None else min(limit, len(dataset))
    conf = np.zeros((len(names), len(names)), dtype=np.int64)
    examples: List = []
    start = time.time()
    done = 0
    per_call = settings.batch_size if mode == "whole" else 1
    for first in range(0, num, per_call):
        samples = [dataset[i] for i in range(first, min(num, first + per_call))]
        results = segment_batch(model, [s.image for s in samples], classifier, queried, settings,
                                [s.labels.shape for s in samples], keep_scores=False)
        for sample, result in zip(samples, results):
            conf += confusion_matrix(result.labels.numpy(), sample.labels, len(names))
            if out_dir is not None and len(examples) < num_examples:
                examples.append((sample, result.labels.numpy()))
        step = max(1, num // 10)
        if progress and (done + len(samples)) // step > done // step:
            log.info(f"segmentation {dataset.name}: {done + len(samples)}/{num} images, "
                  f"{time.time() - start:.0f} s")
        done += len(samples)
    metrics = segmentation_metrics(conf, names)
    gt = conf.sum(1)
    metrics.update({
        "dataset": dataset.name,
        "num_images": num,
        "num_classes": len(names),
        "mode": mode,
        "templates": templates if isinstance(templates, str) else f"{len(templates)} custom",
        "background_threshold": background_threshold,
        "baseline_majority_class": names[int(gt.argmax())] if gt.sum() else None,
        "baseline_majority_miou": constant_prediction_miou(conf, int(gt.argmax())) if gt.sum() else float("nan"),
        "seconds": round(time.time() - start, 1),
        "confusion": conf.tolist(),
    })
    if dataset.has_background:
        metrics["baseline_all_background_miou"] = constant_prediction_miou(conf, 0)
    if out_dir is not None:
        write_segmentation_report(metrics, names, Path(out_dir), examples)
    return metrics


def write_segmentation_report(metrics: Dict, class_names: Sequence[str], out_dir: Path, examples: Sequence = ()) -> None:
    """metrics.json, per_class_iou.md, confusion.png and example overlays (prediction | ground truth)."""
    from PIL import Image

    from ..inference.visualize import confusion_matrix_figure, overlay_segmentation, save_image

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    title = (f"{metrics['dataset']}: mIoU {100 * metrics['miou']:.1f} over {metrics['num_classes']} classes, "
             f"{metrics['num_images']} images ({metrics['mode']})")
    atomic_write_text(out_dir / "per_class_iou.md", per_class_table(metrics, title))
    from ..utils.plugins import module_installed

    if not module_installed("matplotlib"):  # the core install has no plotting library
        log.warning(f"matplotlib is not installed: {out_dir / 'confusion.png'} not drawn (pip install 'dinotxt[train]'); "
                    "the matrix is in metrics.json")
    else:
        confusion_matrix_figure(metrics["confusion"], class_names, out_dir / "confusion.png",
                                title=f"{metrics['dataset']} confusion (rows: ground truth, row-normalised)")
    names = list(class_names)
    shown = names + ["ignored"] if IGNORE_INDEX >= len(names) else names
    for sample, pred in examples:
        gt = sample.labels.copy()
        gt[gt == IGNORE_INDEX] = len(names)  # shown as its own legend entry
        left = overlay_segmentation(sample.image, pred, shown, title="prediction")
        right = overlay_segmentation(sample.image, gt, shown, title="ground truth",
                                     background_index=len(names) if (gt == len(names)).any() else None)
        pair = Image.new("RGB", (left.width + right.width + 8, max(left.height, right.height)), (255, 255, 255))
        pair.paste(left, (0, 0))
        pair.paste(right, (left.width + 8, 0))
        save_image(pair, out_dir / "examples" / f"{Path(sample.name).name}.png")
