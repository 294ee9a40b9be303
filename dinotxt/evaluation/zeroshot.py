"""Zero-shot classification (OpenAI CLIP protocol, METHOD.md section 4) on an image folder
(one sub-folder per class) or the ImageNet validation layout (synset folders, class names
shipped in ``dinotxt/assets``). Works with any model exposing ``encode_image`` / ``encode_text``."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from ..data.folder import ImageFolderDataset
from ..inference.classifier import accuracy, load_classnames, load_templates, mean_per_class_recall, zero_shot_classifier


@torch.no_grad()
def evaluate_zeroshot(model, transform, tokenizer, data_dir: str, classnames: Optional[List[str]] = None,
                      templates: str = "imagenet", batch_size: int = 64, num_workers: int = 2,
                      device: Optional[str] = None, dataset: str = "folder") -> Dict[str, float]:
    """Top-1 / top-5 / mean per-class recall and the confusion matrix. Class names default to the folder names
    (underscores read as spaces), or to the ImageNet names of the synset folders with ``dataset="imagenet"``
    (``data_dir`` holding ``val/<wnid>/`` or the synset folders); ``classnames`` may be a list or a file path."""
    from .datasets import zeroshot_folder

    data_dir, classnames = zeroshot_folder(dataset, data_dir, classnames)
    folder = ImageFolderDataset(data_dir, transform)
    if classnames is None:
        classnames = [c.replace("_", " ") for c in folder.classes]
    elif isinstance(classnames, str):
        classnames = load_classnames(classnames)
    if len(classnames) != len(folder.classes):
        raise ValueError(f"{len(classnames)} class names for {len(folder.classes)} class folders in {data_dir}")
    if not classnames:
        raise ValueError("empty class-name list")
    device = device or next(model.parameters()).device
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    classifier = zero_shot_classifier(model, tokenizer, classnames, template_list, device=device)
    logits, targets = [], []
    loader = DataLoader(folder, batch_size=batch_size, num_workers=num_workers)
    for images, labels in loader:
        feats = model.encode_image(images.to(device), normalize=True).float()
        logits.append((feats @ classifier.t()).cpu())
        targets.append(labels)
    logits, targets = torch.cat(logits), torch.cat(targets)
    top1, top5 = accuracy(logits, targets, (1, 5))
    confusion = torch.zeros(len(classnames), len(classnames), dtype=torch.long)
    confusion.index_put_((targets, logits.argmax(1)), torch.ones_like(targets), accumulate=True)
    return {
        "top1": top1,
        "top5": top5,
        "mean_per_class_recall": mean_per_class_recall(logits, targets, len(classnames)),
        "chance_top1": 1.0 / len(classnames),
        "num_images": len(folder),
        "num_classes": len(classnames),
        "templates": templates if isinstance(templates, str) else f"{len(template_list)} custom",
        "classnames": list(classnames),
        "confusion": confusion.tolist(),  # rows: true class, columns: predicted class
    }
