"""On-disk layouts of the standard evaluation datasets, read without extra dependencies.

Segmentation (label maps mapped to ``0..K-1`` with 255 = ignored, the mmsegmentation
conventions that published open-vocabulary numbers use):

=================  ===========================================================  ==========================
name               layout under ``--root``                                      labels
=================  ===========================================================  ==========================
``ade20k``         ``ADEChallengeData2016/{images,annotations}/validation``     0 -> 255, others - 1 (150)
``voc21``          ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass}``,        as stored, 0 = background
                   ``ImageSets/Segmentation/val.txt``
``voc20``          same                                                         0 -> 255, others - 1 (20)
``context59``      ``VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}``, 0 -> 255, others - 1 (59)
                   ``ImageSets/SegmentationContext/val.txt``
``cityscapes``     ``{leftImg8bit,gtFine}/val/<city>/``                         ``*_labelTrainIds.png`` or
                                                                                ``*_labelIds.png`` mapped (19)
``coco_stuff171``  ``{images,annotations}/val2017`` (``*_labelTrainIds.png``)   171 train ids; raw
                   or ``val2017`` + ``stuffthingmaps_trainval2017/val2017``     stuffthingmaps are mapped
``demo``           the demo world's eval shards (``key.jpg`` + ``key.seg.png``) 0 -> 255, others - 1 (24)
``demo_bg``        same                                                         as stored, 0 = background
``custom``         ``images/*`` + ``labels/<same stem>.png``; ``--classnames``  as stored (or reduced)
=================  ===========================================================  ==========================

Zero-shot: ``imagenet`` (``val/<wnid>/*.JPEG`` synset folders, names shipped in
``dinotxt/assets``) and ``folder`` (any ``<class>/<image>`` tree). Retrieval: ``coco`` and
``flickr30k`` (Karpathy ``dataset_*.json`` or the LAVIS / CLIP_benchmark
``*_karpathy_test.json`` list layout) and ``shards`` (webdataset tars whose samples carry
one or several captions).
"""
from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..inference.classifier import DATA_DIR, load_classnames, read_lines

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
Source = Union[Path, bytes]  # a file, or the bytes of a shard member


# ---------------------------------------------------------------------------- label maps


def reduce_zero_label(labels: np.ndarray) -> np.ndarray:
    """0 (background / 'other') -> 255 (ignored), every other label - 1 (ADE20K, VOC20, Context-59)."""
    out = labels.astype(np.int64) - 1
    out[labels == 0] = IGNORE_INDEX
    out[labels == IGNORE_INDEX] = IGNORE_INDEX
    return out


def identity_labels(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.int64)


def lookup_table(pairs: Dict[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for src, dst in pairs.items():
        table[src] = dst
    return lambda labels: table[labels]


# Cityscapes labelIds -> the 19 evaluation trainIds (cityscapesscripts/helpers/labels.py)
CITYSCAPES_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# COCO-Stuff stuffthingmaps store (category id - 1); 80 thing ids in 1..90 (ten ids unused) and 91 stuff
# ids 92..182 become the 171 contiguous train ids (mmsegmentation tools/dataset_converters/coco_stuff164k.py)
_COCO_UNUSED_THING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_STUFF_RAW_TO_TRAIN_ID = {cid - 1: k for k, cid in enumerate(
    [i for i in range(1, 91) if i not in _COCO_UNUSED_THING_IDS] + list(range(92, 183)))}


# ---------------------------------------------------------------------------- segmentation


@dataclass
class SegmentationSample:
    name: str
    image: "PIL.Image.Image"  # noqa: F821
    labels: np.ndarray  # (H, W) int64 in 0..K-1, 255 = ignored


@dataclass
class SegmentationItem:
    name: str
    image: Source
    label: Source
    label_map: Callable[[np.ndarray], np.ndarray]


def _open(source: Source, what: str, name: str):
    from PIL import Image

    try:
        img = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        img.load()
        return img
    except Exception as e:
        where = source if isinstance(source, Path) else f"sample {name}"
        raise ValueError(f"cannot read {what} {where}: {e}") from None


class SegmentationDataset:
    """Images with per-pixel labels, mapped to ``0..K-1`` (255 ignored).

    Args:
        name: dataset name (for messages and reports).
        items: the (image, label map) pairs.
        class_names: the K names of label values ``0..K-1``.
        has_background: label 0 is a background class (then a background threshold may predict it).
    """

    def __init__(self, name: str, items: List[SegmentationItem], class_names: List[str], has_background: bool = False):
        if not items:
            raise ValueError(f"dataset {name} has no images")
        self.name = name
        self.items = items
        self.class_names = list(class_names)
        self.has_background = has_background

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> SegmentationSample:
        item = self.items[i]
        image = _open(item.image, "image", item.name).convert("RGB")
        label_img = _open(item.label, "label map", item.name)
        if label_img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map of {item.name} has mode {label_img.mode}; expected a single-channel PNG of class ids")
        if label_img.size != image.size:
            where = item.label if isinstance(item.label, Path) else f"sample {item.name}"
            raise ValueError(f"label map {where} is {label_img.size[1]}x{label_img.size[0]} but its image is "
                             f"{image.height}x{image.width}: label and image must have the same size")
        raw = np.asarray(label_img)
        if raw.max(initial=0) > 255:
            raise ValueError(f"label map of {item.name} has values up to {raw.max()}; expected class ids below 256")
        labels = item.label_map(raw.astype(np.int64))
        num = len(self.class_names)
        bad = (labels >= num) & (labels != IGNORE_INDEX)
        if bad.any():
            raise ValueError(f"label map of {item.name} holds class id {int(labels[bad].max())} but {self.name} has "
                             f"{num} classes (0..{num - 1}, 255 ignored): wrong dataset name or class list?")
        return SegmentationSample(item.name, image, labels)


def _find_dir(root: Path, candidates: Sequence[str], what: str, layout: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    for c in candidates:
        p = root / c if c else root
        if p.is_dir():
            return p
    raise FileNotFoundError(f"{root} does not look like {what}: expected {layout}")


def _split_ids(split_file: Path) -> List[str]:
    if not split_file.is_file():
        raise FileNotFoundError(f"split list not found: {split_file}")
    return read_lines(split_file)


def _paired(images: Dict[str, Path], labels: Dict[str, Path], what: str, label_dir: Path) -> List[Tuple[str, Path, Path]]:
    missing = sorted(set(images) - set(labels))
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} images have no label map in {label_dir} (first: {missing[0]})")
    return [(k, images[k], labels[k]) for k in sorted(images)]


def _ade20k(root: Path, split: str) -> List[SegmentationItem]:
    base = _find_dir(root, ["ADEChallengeData2016", ""], "ADE20K", "ADEChallengeData2016/images/validation/*.jpg "
                     "and ADEChallengeData2016/annotations/validation/*.png")
    split = {"val": "validation", "train": "training"}.get(split, split)
    img_dir, ann_dir = base / "images" / split, base / "annotations" / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"ADE20K folder missing: {d} (expected ADEChallengeData2016/{{images,annotations}}/{split})")
    images = {p.stem: p for p in img_dir.glob("*.jpg")}
    labels = {p.stem: p for p in ann_dir.glob("*.png")}
    return [SegmentationItem(k, i, l, reduce_zero_label) for k, i, l in _paired(images, labels, "ADE20K", ann_dir)]


def _voc_items(root: Path, year: str, label_folder: str, split_folder: str, split: str, label_map) -> List[SegmentationItem]:
    base = _find_dir(root, [f"VOCdevkit/VOC{year}", f"VOC{year}", ""], f"Pascal VOC {year}",
                     f"VOCdevkit/VOC{year}/{{JPEGImages,{label_folder},ImageSets/{split_folder}}}")
    ids = _split_ids(base / "ImageSets" / split_folder / f"{split}.txt")
    items = []
    for k in ids:
        img, lab = base / "JPEGImages" / f"{k}.jpg", base / label_folder / f"{k}.png"
        for p in (img, lab):
            if not p.is_file():
                raise FileNotFoundError(f"{p} listed in ImageSets/{split_folder}/{split}.txt is missing")
        items.append(SegmentationItem(k, img, lab, label_map))
    return items


def _cityscapes(root: Path, split: str) -> List[SegmentationItem]:
    base = _find_dir(root, ["", "cityscapes"], "Cityscapes", "leftImg8bit/<split>/<city>/*_leftImg8bit.png and "
                     "gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or *_labelIds.png)")
    img_dir, gt_dir = base / "leftImg8bit" / split, base / "gtFine" / split
    for d in (img_dir, gt_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"Cityscapes folder missing: {d}")
    to_train = lookup_table(CITYSCAPES_ID_TO_TRAIN_ID)
    items = []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        train_ids = gt_dir / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        label_ids = gt_dir / img.parent.name / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            items.append(SegmentationItem(stem, img, train_ids, identity_labels))
        elif label_ids.is_file():
            items.append(SegmentationItem(stem, img, label_ids, to_train))
        else:
            raise FileNotFoundError(f"no label map for {img.name}: expected {train_ids} or {label_ids}")
    return items


def _coco_stuff(root: Path, split: str) -> List[SegmentationItem]:
    split = {"val": "val2017", "train": "train2017"}.get(split, split)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    layouts = [(root / "images" / split, root / "annotations" / split), (root / split, root / "stuffthingmaps_trainval2017" / split)]
    for img_dir, ann_dir in layouts:
        if img_dir.is_dir() and ann_dir.is_dir():
            break
    else:
        raise FileNotFoundError(f"{root} does not look like COCO-Stuff-164k: expected images/{split} + annotations/{split} "
                                f"(mmsegmentation's *_labelTrainIds.png) or {split} + stuffthingmaps_trainval2017/{split}")
    raw_to_train = lookup_table(COCO_STUFF_RAW_TO_TRAIN_ID)
    images = {p.stem: p for p in img_dir.glob("*.jpg")}
    items = []
    for k in sorted(images):
        converted, raw = ann_dir / f"{k}_labelTrainIds.png", ann_dir / f"{k}.png"
        if converted.is_file():
            items.append(SegmentationItem(k, images[k], converted, identity_labels))
        elif raw.is_file():
            items.append(SegmentationItem(k, images[k], raw, raw_to_train))
        else:
            raise FileNotFoundError(f"no label map for {images[k].name} in {ann_dir}")
    return items


def _shard_items(root: Path, label_map) -> List[SegmentationItem]:
    """Samples of webdataset shards holding ``key.<jpg|png|webp>`` and ``key.seg.png``."""
    from ..data.sources import expand_shards, iter_tar_samples

    if Path(root).is_dir() and not list(Path(root).glob("*.tar")):
        raise FileNotFoundError(f"no .tar shards in {root} (expected the demo world's eval split, e.g. runs/demo_world/eval)")
    items, errors = [], {}
    for shard in expand_shards(str(root)):
        for sample in iter_tar_samples(shard, errors):
            image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if image is not None and "seg.png" in sample:
                items.append(SegmentationItem(sample["__key__"], image, sample["seg.png"], label_map))
    if not items:
        raise ValueError(f"no samples with an image and a key.seg.png label map in the shards under {root}")
    return items


def _custom(root: Path) -> List[SegmentationItem]:
    img_dir = _find_dir(root, ["images"], "a custom segmentation dataset", "images/* and labels/<same name>.png")
    lab_dir = root / "labels"
    if not lab_dir.is_dir():
        raise FileNotFoundError(f"label folder missing: {lab_dir} (expected labels/<image stem>.png)")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp")}
    labels = {p.stem: p for p in lab_dir.glob("*.png")}
    return [SegmentationItem(k, i, l, identity_labels) for k, i, l in _paired(images, labels, "custom", lab_dir)]


@dataclass
class SegmentationSpec:
    classes: Optional[str]  # shipped class list name, None = from the caller / the demo world
    has_background: bool
    description: str


SEGMENTATION_DATASETS: Dict[str, SegmentationSpec] = {
    "ade20k": SegmentationSpec("ade20k", False, "ADE20K (ADEChallengeData2016), 150 classes, 'other' ignored"),
    "voc21": SegmentationSpec("voc21", True, "Pascal VOC 2012 val, 21 classes including background"),
    "voc20": SegmentationSpec("voc21", False, "Pascal VOC 2012 val, 20 object classes, background ignored"),
    "context59": SegmentationSpec("pascal_context59", False, "Pascal Context val, 59 classes, background ignored"),
    "cityscapes": SegmentationSpec("cityscapes", False, "Cityscapes val, 19 classes"),
    "coco_stuff171": SegmentationSpec("coco_stuff171", False, "COCO-Stuff-164k val2017, 171 classes"),
    "demo": SegmentationSpec(None, False, "the demo world's held-out shards, 24 object classes, background ignored"),
    "demo_bg": SegmentationSpec(None, True, "the demo world's held-out shards, background + 24 classes"),
    "custom": SegmentationSpec(None, False, "images/ + labels/ with your class list"),
}


def segmentation_dataset(name: str, root: Union[str, Path], split: str = "val", classnames: Optional[Union[str, List[str]]] = None,
                         reduce_zero: bool = False, has_background: bool = False) -> SegmentationDataset:
    """Build a segmentation dataset by name (see the module docstring for the layouts).

    Args:
        name: one of ``SEGMENTATION_DATASETS``.
        root: the dataset folder.
        split: ``val`` (default) or another split the layout has.
        classnames: a list or file overriding the shipped names (same count); required for ``custom``.
        reduce_zero: ``custom`` only: map label 0 to ignored and shift the others down by one.
        has_background: ``custom`` only: label 0 is a background class.
    """
    if name not in SEGMENTATION_DATASETS:
        import difflib

        close = difflib.get_close_matches(name, list(SEGMENTATION_DATASETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown segmentation dataset '{name}' (use one of {', '.join(SEGMENTATION_DATASETS)}){hint}")
    spec = SEGMENTATION_DATASETS[name]
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if name == "ade20k":
        items = _ade20k(root, split)
    elif name in ("voc21", "voc20"):
        items = _voc_items(root, "2012", "SegmentationClass", "Segmentation", split,
                           identity_labels if name == "voc21" else reduce_zero_label)
    elif name == "context59":
        items = _voc_items(root, "2010", "SegmentationClassContext", "SegmentationContext", split, reduce_zero_label)
    elif name == "cityscapes":
        items = _cityscapes(root, split)
    elif name == "coco_stuff171":
        items = _coco_stuff(root, split)
    elif name in ("demo", "demo_bg"):
        items = _shard_items(root, reduce_zero_label if name == "demo" else identity_labels)
    else:
        items = _custom(root)
        if reduce_zero:
            for item in items:
                item.label_map = reduce_zero_label
        spec = SegmentationSpec(None, has_background, spec.description)

    if spec.classes is not None:
        default = load_classnames(spec.classes)
        if name == "voc20":
            default = default[1:]
    elif name in ("demo", "demo_bg"):
        from ..data.world import class_names as world_classes

        default = (["background"] if name == "demo_bg" else []) + world_classes()
    else:
        default = None
    if classnames is not None:
        names = load_classnames(classnames) if isinstance(classnames, (str, Path)) else list(classnames)
        if default is not None and len(names) != len(default):
            raise ValueError(f"{len(names)} class names given but {name} has {len(default)} classes")
    elif default is None:
        raise ValueError(f"dataset '{name}' needs its class names: pass --classnames FILE (one name per label value)")
    else:
        names = default
    if not names:
        raise ValueError("empty class-name list")
    return SegmentationDataset(name, items, names, spec.has_background)


# ---------------------------------------------------------------------------- zero-shot


def imagenet_names() -> Dict[str, str]:
    """WordNet synset id -> class name for the 1,000 ImageNet classes (shipped lists)."""
    synsets = read_lines(DATA_DIR / "imagenet_synsets.txt")
    names = read_lines(DATA_DIR / "imagenet_classnames.txt")
    if len(synsets) != 1000 or len(names) != 1000:
        raise ValueError("the shipped ImageNet lists are damaged (expected 1000 synsets and names)")
    return dict(zip(synsets, names))


_SYNSET = re.compile(r"^n\d{8}$")


def zeroshot_folder(name: str, root: Union[str, Path], classnames: Optional[Union[str, List[str]]] = None) -> Tuple[str, Optional[List[str]]]:
    """``(image folder, class names or None)`` for a zero-shot dataset.

    ``imagenet``: ``root/val/<wnid>/`` (or ``root/<wnid>/``) synset folders, named with the shipped
    ImageNet class names (any subset of the 1,000 synsets works). ``folder``: any
    ``root/<class>/<image>`` tree; names default to the folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if name == "folder":
        return str(root), (load_classnames(classnames) if isinstance(classnames, (str, Path)) else classnames)
    if name != "imagenet":
        raise ValueError(f"unknown zero-shot dataset '{name}' (use imagenet or folder)")
    folder = root / "val" if (root / "val").is_dir() else root
    synsets = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not synsets:
        raise FileNotFoundError(f"no synset folders in {folder} (expected val/n01440764/*.JPEG ...)")
    odd = [s for s in synsets if not _SYNSET.match(s)]
    if odd:
        raise ValueError(f"{folder} has a folder '{odd[0]}' that is not a WordNet synset id (nXXXXXXXX); "
                         "use --dataset folder for other image folders")
    lookup = imagenet_names()
    unknown = [s for s in synsets if s not in lookup]
    if unknown:
        raise ValueError(f"synset {unknown[0]} in {folder} is not one of the 1,000 ImageNet-1k classes")
    if classnames is not None:
        return str(folder), (load_classnames(classnames) if isinstance(classnames, (str, Path)) else list(classnames))
    return str(folder), [lookup[s] for s in synsets]


# ---------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalItem:
    name: str
    image: Source
    captions: List[str]


class RetrievalDataset:
    """Images with one or more captions each (``texts`` flattens them, ``text_to_image`` maps back).

    Args:
        name: dataset name.
        items: images and their captions.
        transform: image transform applied in ``__getitem__``.
    """

    def __init__(self, name: str, items: List[RetrievalItem], transform: Optional[Callable] = None):
        if not items:
            raise ValueError(f"retrieval dataset {name} has no images with captions")
        self.name = name
        self.items = items
        self.transform = transform
        self.texts: List[str] = []
        self.text_to_image: List[int] = []
        for i, item in enumerate(items):
            self.texts.extend(item.captions)
            self.text_to_image.extend([i] * len(item.captions))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        image = _open(item.image, "image", item.name).convert("RGB")
        return (self.transform(image) if self.transform else image), i


def _karpathy_items(root: Path, annotations: Path, split: str, image_dirs: Sequence[str]) -> List[RetrievalItem]:
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read annotation file {annotations}: {e}") from None
    items = []
    if isinstance(data, dict) and "images" in data:  # Karpathy: {"images": [{filepath, filename, split, sentences}]}
        for entry in data["images"]:
            if entry.get("split") != split and not (split == "train" and entry.get("split") == "restval"):
                continue
            captions = [s.get("raw", " ".join(s.get("tokens", []))).strip() for s in entry.get("sentences", [])]
            rel = Path(entry.get("filepath", "")) / entry["filename"]
            items.append((str(rel), [c for c in captions if c]))
    elif isinstance(data, list) and data and "image" in data[0]:  # LAVIS / CLIP_benchmark: [{image, caption: [...]}]
        for entry in data:
            caps = entry.get("caption", [])
            items.append((entry["image"], [caps] if isinstance(caps, str) else list(caps)))
    else:
        raise ValueError(f"{annotations} is neither a Karpathy split file ({{'images': [...]}}) nor a list of "
                         "{'image', 'caption'} entries")
    if not items:
        raise ValueError(f"{annotations} has no images in split '{split}'")
    out, missing = [], []
    for rel, captions in items:
        path = next((root / d / rel for d in image_dirs if (root / d / rel).is_file()), None)
        if path is None:
            path = next((root / d / Path(rel).name for d in image_dirs if (root / d / Path(rel).name).is_file()), None)
        if path is None:
            missing.append(rel)
            continue
        if captions:
            out.append(RetrievalItem(rel, path, captions))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(items)} images listed in {annotations.name} are missing under "
                                f"{root} (first: {missing[0]})")
    return out


def _shard_retrieval_items(root: Union[str, Path], caption_key: str = "txt", json_field: str = "caption") -> Tuple[List[RetrievalItem], Dict[str, int]]:
    """Samples of webdataset shards: image + captions (``key.txt`` lines, or a string / list in ``key.json``)."""
    from ..data.sources import expand_shards, iter_tar_samples
    from ..data.stream import decode_image

    items: List[RetrievalItem] = []
    skipped: Dict[str, int] = {}
    for shard in expand_shards(str(root)):
        for sample in iter_tar_samples(shard, skipped):
            image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            captions: List[str] = []
            if caption_key in sample:
                captions = [c.strip() for c in sample[caption_key].decode("utf-8", "replace").splitlines() if c.strip()]
            elif "json" in sample:
                try:
                    value = json.loads(sample["json"]).get(json_field)
                except (ValueError, AttributeError):
                    value = None
                captions = [value] if isinstance(value, str) else [c for c in (value or []) if isinstance(c, str)]
                captions = [c.strip() for c in captions if c.strip()]
            if image is None or not captions:
                reason = "no_image" if image is None else "no_caption"
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            try:
                decode_image(image)
            except Exception:
                skipped["bad_image"] = skipped.get("bad_image", 0) + 1
                continue
            items.append(RetrievalItem(sample["__key__"], image, captions))
    return items, skipped


RETRIEVAL_DATASETS = {
    "coco": ("dataset_coco.json", "coco_karpathy_test.json", ["", "images", "val2014", "coco"]),
    "flickr30k": ("dataset_flickr30k.json", "flickr30k_test.json", ["", "flickr30k-images", "images", "flickr30k_images"]),
}


def retrieval_dataset(name: str, root: Union[str, Path], annotations: Optional[Union[str, Path]] = None,
                      split: str = "test", transform: Optional[Callable] = None) -> RetrievalDataset:
    """``coco`` (Karpathy 5k test), ``flickr30k`` (Karpathy 1k test) or ``shards``.

    Args:
        name: dataset layout.
        root: image folder (``coco``: the folder holding ``val2014/``; ``flickr30k``: the folder
            holding ``flickr30k-images/`` or the images) or the shards (``shards``).
        annotations: the split file; default: looked up in ``root`` and ``root/annotations``.
        split: Karpathy split to evaluate.
        transform: image transform.
    """
    root_path = Path(root)
    if name == "shards":
        items, skipped = _shard_retrieval_items(root)
        dataset = RetrievalDataset(f"shards:{root_path.name}", items, transform)
        dataset.skipped = skipped
        if skipped:
            log.info(f"retrieval: skipped {sum(skipped.values())} samples of {root} "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})")
        return dataset
    if name not in RETRIEVAL_DATASETS:
        raise ValueError(f"unknown retrieval dataset '{name}' (use coco, flickr30k or shards)")
    if not root_path.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root_path}")
    karpathy, lavis, image_dirs = RETRIEVAL_DATASETS[name]
    if annotations is None:
        candidates = [root_path / n for n in (karpathy, lavis)] + [root_path / "annotations" / n for n in (karpathy, lavis)]
        annotations = next((p for p in candidates if p.is_file()), None)
        if annotations is None:
            raise FileNotFoundError(f"no annotation file for {name} in {root_path}: expected {karpathy} (Karpathy split) "
                                    f"or {lavis}, or pass --annotations FILE")
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotation file not found: {annotations}")
    dataset = RetrievalDataset(name, _karpathy_items(root_path, annotations, split, image_dirs), transform)
    dataset.skipped = {}
    return dataset
