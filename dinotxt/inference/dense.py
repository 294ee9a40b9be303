"""Open-vocabulary semantic segmentation with a dino.txt model (METHOD.md section 4).

Follows the dense protocol of dino.txt ("DINOv2 Meets Text", Jose et al., CVPR 2025):
the head patch tokens f' are compared with the half of the text embedding they were
aligned with during training, ``text[:, D:]`` (the CLS half ``text[:, :D]`` pairs with
the head CLS token and plays no part here).

- Class embeddings: per class, the L2-normalised second-half embeddings of every prompt
  template are averaged and renormalised (``zero_shot_classifier(..., half="patch")``).
- Image: short side resized to 512 (bicubic), ImageNet normalisation.
- ``slide`` (the official protocol): 384 x 384 windows at stride 192 on mmsegmentation's
  grid (the last window in a row or column is flush with the border; a side shorter than
  the window gives one window of that side). ``whole`` (the DINOv3 notebook's): a single pass over the
  image; its patch cosines are bilinearly upsampled ONCE to the label size and argmax'ed.
- Each window is resized UP to the next multiple of the patch size (384 -> 392 at patch 14), its normalised head patch
  tokens give a cosine map against the class embeddings, the map is bilinearly upsampled
  back to the window, softmaxed over classes, accumulated into the image and divided by
  the number of windows that visited each pixel.
- The probability map is bilinearly upsampled to the label size and argmax'ed. With a
  ``background_threshold``, pixels whose best class probability stays below it become
  background (label 0; classes are then ``1 + index``), the usual way to score datasets
  whose background class has no sensible text prompt (Pascal VOC with 21 classes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..utils.precision import at_least_fp32
from .settings import DEFAULTS, DenseSettings


ImageLike = Union["PIL.Image.Image", str, Path, torch.Tensor]  # noqa: F821


@dataclass
class SegmentationResult:
    """Output of :func:`segment`.

    Args:
        labels: (H, W) long tensor at the output size. Without a background threshold the
            values index ``class_names``; with one, 0 is background and ``1 + i`` is class i,
            and ``class_names`` starts with ``"background"``.
        scores: (C, H, W) per-class probabilities (averaged softmax over the queried classes);
            None when ``segment_batch`` ran with ``keep_scores=False``.
        class_names: names of the label values.
    """

    labels: torch.Tensor
    scores: Optional[torch.Tensor]
    class_names: List[str]


def snap_to_patch(size: int, patch_size: int) -> int:
    """The size a window is resized to: UP to the next multiple of the patch size, as the official
    dense evaluation does (384 px -> 392 at patch 14, 384 at patch 16)."""
    return max(patch_size, -(-size // patch_size) * patch_size)


def window_grid(height: int, width: int, window: int = DEFAULTS.window,
                stride: int = DEFAULTS.stride) -> List[Tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` covering the image, on mmsegmentation's slide grid.

    Every window has the size ``(min(window, height), min(window, width))``, so they batch.
    """
    DenseSettings(window=window, stride=stride)  # the same checks as every other entry point
    rows = max(height - window + stride - 1, 0) // stride + 1
    cols = max(width - window + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, height), min(c * stride + window, width)
            boxes.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
    return boxes


def resized_short_side(height: int, width: int, short_side: Optional[int] = DEFAULTS.short_side) -> Tuple[int, int]:
    """(H, W) after resizing the short side to ``short_side`` (torchvision's rounding; None keeps the size)."""
    if not short_side:
        return height, width
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def prepare_image(image: ImageLike, short_side: Optional[int] = DEFAULTS.short_side) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Image -> ``((1, 3, h, w) normalised tensor, original (H, W))``.

    PIL images and paths are resized so their short side is ``short_side`` (bicubic; None keeps
    the size) and normalised with the ImageNet statistics. Tensors are taken as already
    normalised ``(3, H, W)`` or ``(1, 3, H, W)`` and are resized the same way.
    """
    from torchvision.transforms import functional as TF

    from ..models.transforms import IMAGENET_MEAN, IMAGENET_STD

    if isinstance(image, (str, Path)):
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            image = Image.open(path)
            image.load()
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image[None]
        if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
            raise ValueError(f"expected one normalised image tensor (3, H, W), got {tuple(image.shape)}")
        original = (int(x.shape[-2]), int(x.shape[-1]))
        size = resized_short_side(*original, short_side)
        if size != original:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        return x, original
    image = image.convert("RGB")
    original = (image.height, image.width)
    size = resized_short_side(*original, short_side)
    if size != original:
        image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BICUBIC)
    x = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    return x[None], original


@torch.no_grad()
def patch_logits(model, windows: torch.Tensor, classifier: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """Class scores (B, C, h', w') at patch resolution of a batch of same-size windows (B, 3, h, w):
    ``logit_scale`` x the cosine of each normalised head patch token with each class embedding.

    Args:
        model: anything with ``encode_patches(images, normalize=True) -> (B, h', w', D)`` and ``patch_size``.
        windows: normalised image windows (resized up to the next multiple of the patch size first).
        classifier: (C, D) L2-normalised class embeddings of the patch half ``text[:, D:]``.
        logit_scale: multiplies the cosine map (1 = the plain cosine of the protocol).
    """
    h, w = windows.shape[-2:]
    patch = model.patch_size
    size = (snap_to_patch(h, patch), snap_to_patch(w, patch))
    x = windows if size == (h, w) else F.interpolate(windows, size=size, mode="bicubic", align_corners=False)
    patches = at_least_fp32(model.encode_patches(x, normalize=True))
    if patches.shape[-1] != classifier.shape[-1]:
        raise ValueError(f"patch tokens have width {patches.shape[-1]} but class embeddings {classifier.shape[-1]}: "
                         "build the classifier with zero_shot_classifier(..., half='patch')")
    return logit_scale * torch.einsum("bhwd,cd->bchw", patches, classifier.to(patches.device, patches.dtype))


@torch.no_grad()
def window_probabilities(model, windows: torch.Tensor, classifier: torch.Tensor, logit_scale: float = 1.0) -> torch.Tensor:
    """Class probabilities (B, C, h, w) of a batch of same-size windows (B, 3, h, w): the patch scores
    (``patch_logits``) bilinearly upsampled to the window, softmaxed over classes (the slide protocol).
    The scale is applied at patch resolution: bilinear upsampling is linear, so this equals scaling the
    full-size map, at a fraction of the cost."""
    h, w = windows.shape[-2:]
    logits = patch_logits(model, windows, classifier, logit_scale)
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).softmax(dim=1)


@torch.no_grad()
def dense_probabilities(model, image: torch.Tensor, classifier: torch.Tensor,
                        settings: DenseSettings = DEFAULTS) -> torch.Tensor:
    """Per-class probabilities (C, H, W) of one prepared image (1, 3, H, W), with ``settings.mode``,
    ``window``, ``stride``, ``logit_scale`` and ``batch_size`` (the result does not depend on the last)."""
    param = next(model.parameters())
    image = image.to(param.device, param.dtype)  # images follow the model (fp32, or float64 in the exactness tests)
    if settings.mode == "whole":
        return window_probabilities(model, image, classifier, settings.logit_scale)[0]
    _, _, height, width = image.shape
    boxes = window_grid(height, width, settings.window, settings.stride)
    dtype = torch.promote_types(param.dtype, torch.float32)  # the dtype window_probabilities returns
    total = torch.zeros(classifier.shape[0], height, width, device=param.device, dtype=dtype)
    visits = torch.zeros(1, height, width, device=param.device, dtype=dtype)
    for i in range(0, len(boxes), settings.batch_size):
        chunk = boxes[i:i + settings.batch_size]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        probs = window_probabilities(model, crops, classifier, settings.logit_scale)
        for (y1, y2, x1, x2), p in zip(chunk, probs):
            total[:, y1:y2, x1:x2] += p
            visits[:, y1:y2, x1:x2] += 1
    return total / visits


def predict_labels(probs: torch.Tensor, background_threshold: Optional[float] = None) -> torch.Tensor:
    """Argmax over classes of (C, H, W) scores; with a threshold, 0 = background and classes shift to ``1 + i``."""
    if background_threshold is None:
        return probs.argmax(dim=0)
    best, index = probs.max(dim=0)
    labels = index + 1
    labels[best < background_threshold] = 0
    return labels


def check_class_names(class_names: Sequence[str]) -> List[str]:
    names = [str(n).strip() for n in class_names]
    if not names or not any(names):
        raise ValueError("empty label list: give at least one class name (e.g. --labels 'cat,grass,sky')")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"class name #{empty[0] + 1} is empty (check for a doubled comma or a blank line)")
    return names


def dense_classifier(model, tokenizer: Callable, class_names: Sequence[str],
                     templates: Union[str, Sequence[str]] = "imagenet") -> torch.Tensor:
    """(C, D) class embeddings of the patch half ``text[:, D:]`` over a prompt ensemble
    (``imagenet``: the 80 OpenAI templates, ``ovseg``: OVSeg's 14, ``simple``, a file, or a list)."""
    from .classifier import load_templates, zero_shot_classifier

    if not hasattr(model, "dense_text") or not hasattr(model, "encode_patches"):
        raise ValueError(f"{type(model).__name__} has no dense interface (encode_patches / dense_text): "
                         "segmentation needs a dinotxt model")
    template_list = load_templates(templates) if isinstance(templates, str) else list(templates)
    return zero_shot_classifier(model, tokenizer, check_class_names(class_names), template_list, half="patch")


@torch.no_grad()
def segment(model, tokenizer: Optional[Callable], image: ImageLike, class_names: Sequence[str],
            settings: DenseSettings = DEFAULTS, classifier: Optional[torch.Tensor] = None,
            output_size: Optional[Tuple[int, int]] = None, **changes) -> SegmentationResult:
    """Segment one image into ``class_names``.

    Args:
        model: a dinotxt model (``encode_patches``, ``dense_text``, ``patch_size``).
        tokenizer: its tokenizer (not needed when ``classifier`` is given).
        image: PIL image, image path, or a normalised (3, H, W) tensor.
        class_names: the open vocabulary, e.g. ``["cat", "grass", "sky"]``.
        settings: ``DenseSettings`` (mode, short side, window, stride, templates, ...).
        classifier: precomputed ``dense_classifier`` output, reused across images.
        output_size: (H, W) of the returned maps; default: the input image's size.
        **changes: settings changed for this call, e.g. ``mode="whole"``.
    """
    settings = settings.but(**changes) if changes else settings
    names = check_class_names(class_names)
    if classifier is None:
        if tokenizer is None:
            raise ValueError("segment needs the model's tokenizer (the third value dinotxt.load returns) "
                             "or a precomputed classifier=")
        classifier = dense_classifier(model, tokenizer, names, settings.templates)
    if classifier.shape[0] != len(names):
        raise ValueError(f"classifier has {classifier.shape[0]} rows for {len(names)} class names")
    return segment_batch(model, [image], classifier, names, settings,
                         None if output_size is None else [output_size])[0]


@torch.no_grad()
def segment_batch(model, images: Sequence[ImageLike], classifier: torch.Tensor, class_names: Sequence[str],
                  settings: DenseSettings = DEFAULTS, output_sizes: Optional[Sequence[Tuple[int, int]]] = None,
                  keep_scores: bool = True) -> List[SegmentationResult]:
    """:func:`segment` for several images with a precomputed classifier (the evaluation loop).

    In ``whole`` mode, images that come out the same size go through the model together, up to
    ``settings.batch_size`` at a time (mixed sizes are grouped by size); the result equals one image
    at a time. ``output_sizes`` gives each image's (H, W) of the returned maps (default: its own
    size); ``keep_scores=False`` drops the full-size score maps (150 classes at full size add up).
    """
    names = check_class_names(class_names)
    prepared = [prepare_image(image, settings.short_side) for image in images]
    param = next(model.parameters())
    if settings.background_threshold is not None:
        names = ["background"] + names
    sizes = [tuple(output_sizes[k]) if output_sizes is not None else original for k, (_, original) in enumerate(prepared)]
    maps: List[Optional[torch.Tensor]] = [None] * len(prepared)
    if settings.mode == "whole":  # images of the same prepared size go through the model together
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for k, (x, _) in enumerate(prepared):
            groups.setdefault(tuple(x.shape), []).append(k)
        for members in groups.values():
            for i in range(0, len(members), settings.batch_size):
                chunk = members[i:i + settings.batch_size]
                batch = torch.cat([prepared[k][0] for k in chunk]).to(param.device, param.dtype)
                for k, logits in zip(chunk, patch_logits(model, batch, classifier, settings.logit_scale)):
                    maps[k] = logits  # at patch resolution: ONE upsample to the label size below
    results = []
    for k, (x, _) in enumerate(prepared):
        if settings.mode == "whole":
            # the notebook's whole mode: patch scores, one bilinear upsample to the label size, argmax
            # (softmax only turns them into the probabilities that thresholds and heat maps read)
            probs = F.interpolate(maps[k][None], size=sizes[k], mode="bilinear", align_corners=False)[0].softmax(0)
        else:
            probs = dense_probabilities(model, x, classifier, settings)
            if tuple(probs.shape[-2:]) != sizes[k]:
                probs = F.interpolate(probs[None], size=sizes[k], mode="bilinear", align_corners=False)[0]
        labels = predict_labels(probs, settings.background_threshold).cpu()
        results.append(SegmentationResult(labels, probs.cpu() if keep_scores else None, names))
        maps[k] = None  # free each image's maps as soon as its labels exist
    return results


def forwards_per_image(height: int, width: int, settings: DenseSettings = DEFAULTS) -> int:
    """Backbone forward passes one image of (height, width) costs (1 in whole mode)."""
    if settings.mode == "whole":
        return 1
    return len(window_grid(*resized_short_side(height, width, settings.short_side), settings.window, settings.stride))
