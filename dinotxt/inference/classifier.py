"""Zero-shot classification (OpenAI CLIP protocol, METHOD.md section 4).

Each class embedding is the average of the L2-normalised embeddings of the class name
in every template, renormalised (on the full text embedding). ``half="patch"`` uses
``text[:, D:]`` instead, the half aligned with patch tokens, for dense prediction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..utils.precision import at_least_fp32

DATA_DIR = Path(__file__).parents[1] / "assets"  # dinotxt/assets: templates and class-name lists


TEMPLATE_SETS = ("imagenet", "ovseg")  # files dinotxt/assets/<name>_templates.txt


def read_lines(path: Union[str, Path]) -> List[str]:
    """Non-empty lines of a text data file, without ``#`` comment lines (asset files name their source there)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def load_templates(name_or_path: str = "imagenet") -> List[str]:
    """``imagenet`` (the 80 OpenAI templates), ``ovseg`` (OVSeg's 14 ViLD templates), ``simple``
    ("a photo of a {}."), or a file with one template per line."""
    if name_or_path == "simple":
        return ["a photo of a {}."]
    path = DATA_DIR / f"{name_or_path}_templates.txt" if name_or_path in TEMPLATE_SETS else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"template set '{name_or_path}' not found: use {', '.join(TEMPLATE_SETS)}, simple, "
                                "or a text file path with one template per line")
    templates = read_lines(path)
    if not templates:
        raise ValueError(f"template file {path} is empty")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} in {path} has no '{{}}' placeholder for the class name")
    return templates


def load_classnames(path: Union[str, Path]) -> List[str]:
    """Class names, one per line (``#`` lines are comments). Accepts a file path or the name of a
    list shipped in ``dinotxt/assets`` (``ade20k``, ``imagenet``, ``voc21``, ... = ``<name>_classes.txt``)."""
    path = Path(path)
    if not path.is_file():
        for shipped in (DATA_DIR / f"{path.name}_classes.txt", DATA_DIR / f"{path.name}_classnames.txt"):
            if shipped.is_file() and len(path.parts) == 1:
                path = shipped
                break
        else:
            raise FileNotFoundError(f"class-name file not found: {path}")
    names = read_lines(path)
    if not names:
        raise ValueError(f"class-name file {path} is empty")
    return names


@torch.no_grad()
def zero_shot_classifier(model, tokenizer: Callable, classnames: Sequence[str], templates: Optional[Sequence[str]] = None,
                         half: str = "full", batch_size: int = 256, device: Union[str, torch.device] = None) -> torch.Tensor:
    """Class embeddings (num_classes, E), one column per class after ``.t()``.

    Works with any model exposing ``encode_text`` (ours or an open_clip model).
    """
    if not classnames:
        raise ValueError("zero-shot classifier needs at least one class name")
    templates = list(templates) if templates is not None else load_templates("imagenet")
    device = device or next(model.parameters()).device
    weights = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        feats = []
        for i in range(0, len(texts), batch_size):
            feats.append(at_least_fp32(model.encode_text(tokenizer(texts[i:i + batch_size]).to(device))))
        feats = torch.cat(feats)
        if half == "patch":
            feats = model.dense_text(feats, normalize=False)
        elif half != "full":
            raise ValueError(f"half must be 'full' or 'patch', got {half!r}")
        weights.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1))
    return torch.stack(weights)
