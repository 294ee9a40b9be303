"""Zero-shot classification (OpenAI CLIP protocol, METHOD.md section 4): the one evaluation that
serves the command line (``dinotxt eval zeroshot``), the suite and the validation steps of
training (``ZeroShotTask`` + ``zeroshot_metrics``).

Images of a folder (one sub-folder per class) or of the ImageNet validation layout (synset
folders, class names shipped in ``dinotxt/assets``) are scored against the prompt-ensemble
classifier. Works with any model exposing ``encode_image`` / ``encode_text``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ..data.folder import GROUPS_FILE, ImageFolderDataset
from ..inference.classifier import load_classnames, load_templates, zero_shot_classifier


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk=(1, 5)) -> List[float]:
    """Fraction of samples whose target is among the top-k logits, for each k."""
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == targets[:, None]
    return [hit[:, : min(k, maxk)].any(1).float().mean().item() for k in topk]


def mean_per_class_recall(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    pred = logits.argmax(1)
    recalls = [(pred[targets == c] == c).float().mean().item() for c in range(num_classes) if (targets == c).any()]
    return float(sum(recalls) / max(1, len(recalls)))


@dataclass
class ZeroShotTask:
    """Classes, prompts and tokenizer of a zero-shot evaluation (for the classifier)."""

    classnames: List[str]
    templates: Sequence[str]
    tokenizer: Callable

    def classifier(self, model, device=None) -> torch.Tensor:
        return zero_shot_classifier(model, self.tokenizer, self.classnames, list(self.templates), device=device)


def zeroshot_metrics(logits: torch.Tensor, targets: torch.Tensor, classnames: Sequence[str]) -> Dict:
    """Top-1 / top-5 / mean per-class recall, chance and the confusion matrix of (N, C) logits."""
    top1, top5 = accuracy(logits, targets, (1, 5))
    confusion = torch.zeros(len(classnames), len(classnames), dtype=torch.long)
    confusion.index_put_((targets, logits.argmax(1)), torch.ones_like(targets), accumulate=True)
    return {
        "top1": top1,
        "top5": top5,
        "mean_per_class_recall": mean_per_class_recall(logits, targets, len(classnames)),
        "chance_top1": 1.0 / len(classnames),
        "num_images": int(len(targets)),
        "num_classes": len(classnames),
        "classnames": list(classnames),
        "confusion": confusion.tolist(),  # rows: true class, columns: predicted class
    }


def read_groups(path, folder: ImageFolderDataset) -> List[str]:
    """The group of every image of ``folder`` (in its sample order) from a CSV with the columns
    ``path,label,group``: ``path`` relative to the folder, ``label`` its class folder (checked), ``group``
    any name. Every image must be listed, and every listed image must be in the folder."""
    import csv
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"groups file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label", "group"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} needs the columns path,label,group (missing: {', '.join(sorted(missing))})")
        rows = list(reader)
    root = folder.root.resolve()
    listed: Dict[Path, str] = {}
    for n, row in enumerate(rows, start=2):
        image = (root / row["path"]).resolve()
        if not image.is_file():
            raise FileNotFoundError(f"{path} line {n}: image {row['path']} is not in {folder.root}")
        if image.parent.name != row["label"]:
            raise ValueError(f"{path} line {n}: {row['path']} lies in the class folder '{image.parent.name}', "
                             f"not '{row['label']}'")
        listed[image] = row["group"]
    groups = []
    for sample, _ in folder.samples:
        group = listed.get(Path(sample).resolve())
        if group is None:
            raise ValueError(f"{path} gives no group for {Path(sample).relative_to(folder.root)}: "
                             "list every image of the folder (path,label,group)")
        groups.append(group)
    return groups


def group_metrics(logits: torch.Tensor, targets: torch.Tensor, groups: Sequence[str]) -> Dict:
    """Top-1 per group, the worst group's (Sagawa et al., ICLR 2020: the Waterbirds protocol) and the
    mean over groups, next to the average over images that ``zeroshot_metrics`` reports."""
    hit = (logits.argmax(1) == targets).double()
    per_group = []
    for name in sorted(set(groups)):
        mask = torch.tensor([g == name for g in groups])
        per_group.append({"group": name, "images": int(mask.sum()), "top1": float(hit[mask].mean())})
    worst = min(per_group, key=lambda g: (g["top1"], g["group"]))
    return {"worst_group_top1": worst["top1"], "worst_group": worst["group"],
            "group_mean_top1": sum(g["top1"] for g in per_group) / len(per_group), "groups": per_group}


def zeroshot_task(data_dir: str, tokenizer: Callable, classnames=None, templates="imagenet", dataset: str = "folder"):
    """(image folder, ZeroShotTask) of a folder or ImageNet layout; ``classnames`` may be a list or a file."""
    from .datasets import zeroshot_folder

    data_dir, classnames = zeroshot_folder(dataset, data_dir, classnames)
    folder = ImageFolderDataset(data_dir)
    if classnames is None:
        classnames = [c.replace("_", " ") for c in folder.classes]
    elif isinstance(classnames, str):
        classnames = load_classnames(classnames)
    if len(classnames) != len(folder.classes):
        raise ValueError(f"{len(classnames)} class names for {len(folder.classes)} class folders in {data_dir}")
    if not classnames:
        raise ValueError("empty class-name list")
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    return data_dir, ZeroShotTask(list(classnames), template_list, tokenizer)


@torch.no_grad()
def evaluate_zeroshot(model, transform, tokenizer, data_dir: str, classnames: Optional[List[str]] = None,
                      templates: str = "imagenet", batch_size: int = 64, num_workers: int = 2,
                      device: Optional[str] = None, dataset: str = "folder", groups: Optional[str] = None) -> Dict[str, float]:
    """Top-1 / top-5 / mean per-class recall and the confusion matrix. Class names default to the folder names
    (underscores read as spaces), or to the ImageNet names of the synset folders with ``dataset="imagenet"``
    (``data_dir`` holding ``val/<wnid>/`` or the synset folders); ``classnames`` may be a list or a file path.

    Groups (the spurious-correlation protocol): when the folder holds a ``groups.csv`` (or ``groups`` names
    one; ``read_groups``), the result adds the top-1 of every group, the worst group's and their mean."""
    from pathlib import Path

    data_dir, task = zeroshot_task(data_dir, tokenizer, classnames, templates, dataset)
    device = device or next(model.parameters()).device
    folder = ImageFolderDataset(data_dir, transform)
    groups_file = Path(groups) if groups else Path(data_dir) / GROUPS_FILE
    image_groups = read_groups(groups_file, folder) if groups or groups_file.is_file() else None
    classifier = task.classifier(model, device)
    logits, targets = [], []
    for images, labels in DataLoader(folder, batch_size=batch_size, num_workers=num_workers):
        feats = model.encode_image(images.to(device), normalize=True).float()
        logits.append((feats @ classifier.t()).cpu())
        targets.append(labels)
    logits, targets = torch.cat(logits), torch.cat(targets)
    res = zeroshot_metrics(logits, targets, task.classnames)
    res["templates"] = templates if isinstance(templates, str) else f"{len(task.templates)} custom"
    if image_groups is not None:
        res.update(group_metrics(logits, targets, image_groups), groups_file=str(groups_file))
    return res
