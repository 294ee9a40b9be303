"""Pictures of dense predictions: a colour overlay with a legend, a per-class heat-map sheet,
and a confusion-matrix plot for segmentation evaluations.

Overlays keep the photograph visible under translucent class colours, outline every region,
write the class name on each large region and list the classes with their area in a legend
panel, so a reader can check a prediction without the label map. Small images are enlarged
first (nearest neighbour for labels) so the text stays legible. A class whose name names a colour
("red circle") is drawn in a shade of that colour, so the picture never contradicts its legend
(``class_palette``).
"""
from __future__ import annotations

import colorsys
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..utils.fileio import atomic_output

MIN_SIDE = 384  # images smaller than this are enlarged before drawing text on them
BACKGROUND_NAMES = ("background", "void")


def label_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours, well spread: golden-ratio hue steps with alternating brightness."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        sat = 0.85 if i % 3 != 1 else 0.6
        val = 0.95 if i % 2 == 0 else 0.75
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colours, dtype=np.uint8).reshape(num_classes, 3)


# colour words a class name may use, as (hue, saturation, value): a class named "red circle" is drawn in a
# shade of red; the hue of each is what the word names (CSS / X11 colours, rounded)
COLOUR_WORDS: Dict[str, Tuple[float, float, float]] = {
    "red": (0 / 360, 0.85, 0.95), "crimson": (350 / 360, 0.85, 0.86), "scarlet": (8 / 360, 0.9, 0.95),
    "orange": (30 / 360, 0.9, 0.97), "tangerine": (28 / 360, 0.9, 0.97),
    "brown": (25 / 360, 0.75, 0.55), "gold": (48 / 360, 0.9, 0.95), "golden": (48 / 360, 0.9, 0.95),
    "yellow": (56 / 360, 0.85, 0.95), "lime": (90 / 360, 0.8, 0.9),
    "green": (125 / 360, 0.8, 0.75), "emerald": (140 / 360, 0.75, 0.75), "teal": (180 / 360, 0.9, 0.6),
    "cyan": (185 / 360, 0.85, 0.9), "turquoise": (175 / 360, 0.7, 0.85), "azure": (210 / 360, 0.8, 0.95),
    "blue": (225 / 360, 0.85, 0.9), "navy": (235 / 360, 0.9, 0.5),
    "purple": (280 / 360, 0.75, 0.75), "violet": (270 / 360, 0.6, 0.9), "lavender": (270 / 360, 0.35, 0.95),
    "magenta": (305 / 360, 0.85, 0.9), "pink": (335 / 360, 0.45, 1.0),
    "white": (0.0, 0.0, 1.0), "grey": (0.0, 0.0, 0.55), "gray": (0.0, 0.0, 0.55), "black": (0.0, 0.0, 0.12),
}
# the k-th class naming one colour gets its k-th shade: (saturation, value) factors on the word's colour,
# lighter and darker by turns, none of them the plain colour (so a region's tint shows on an object of it)
_SHADES = [(0.6, 1.1), (1.15, 0.8), (0.75, 0.88), (0.8, 1.15), (0.45, 0.9), (1.15, 0.68)]
# white, grey and black have no hue: their shades are values
_GREY_SHADES = {"white": [1.0, 0.88, 0.94, 0.8, 0.97, 0.84], "grey": [0.55, 0.7, 0.4, 0.62, 0.47, 0.77],
                "black": [0.12, 0.25, 0.05, 0.32, 0.18, 0.38]}
_NEAR_HUE = 20 / 360  # a palette colour this close in hue to a named colour could be taken for it


def colour_word(name: str) -> Optional[str]:
    """The first colour word of a class name ("blue triangle" -> "blue"), or None when it names no colour."""
    return next((w for w in re.findall(r"[a-z]+", name.lower()) if w in COLOUR_WORDS), None)


def _hsv_colour(h: float, s: float, v: float) -> List[int]:
    """An 8-bit RGB colour from hue (wrapped), saturation and value (clipped to [0, 1])."""
    return [round(255 * c) for c in colorsys.hsv_to_rgb(h % 1.0, min(1.0, max(0.0, s)), min(1.0, max(0.0, v)))]


def _shade(word: str, k: int) -> List[int]:
    """The k-th shade of a colour word: distinct from its other shades, and still that colour."""
    h, s, v = COLOUR_WORDS[word]
    turn, k = divmod(k, len(_SHADES))
    if s == 0.0:
        values = _GREY_SHADES["grey" if word == "gray" else word]
        return _hsv_colour(0.0, 0.0, values[k] - 0.03 * turn * (1 if values[k] > 0.5 else -1))
    fs, fv = _SHADES[k]
    shift = 0.02 * ((turn + 1) // 2) * (1 if turn % 2 else -1)  # past six shades: a slightly other hue
    return _hsv_colour(h + shift, s * fs, v * fv)


def _near_named(rgb: np.ndarray, words: set) -> bool:
    """Whether a palette colour could be read as one of the colours the class names use."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    for word in words:
        wh, ws, _ = COLOUR_WORDS[word]
        if ws > 0 and s >= 0.25 and min(abs(h - wh), 1 - abs(h - wh)) < _NEAR_HUE:
            return True
    return False


def class_palette(class_names: Sequence[str]) -> np.ndarray:
    """(num_classes, 3) uint8 colours for these classes that never contradict their names.

    A class whose name contains a colour word (``COLOUR_WORDS``: "red circle", "blue triangle") gets a
    shade of that colour, a different shade for each class naming the same colour. The other classes
    take the colours of ``label_palette`` in order, less those close in hue to a colour a name uses;
    with no colour word in any name this is ``label_palette(len(class_names))``.
    """
    names = list(class_names)
    words = [colour_word(n) for n in names]
    used = {w for w in words if w is not None}
    colours: List[List[int]] = []
    seen: Dict[str, int] = {}
    candidates = label_palette(len(names) + (64 if used else 0))
    free = iter(c for c in candidates if not _near_named(c, used))
    for word in words:
        if word is None:
            colours.append(list(next(free, candidates[len(colours)])))
        else:
            colours.append(_shade(word, seen.get(word, 0)))
            seen[word] = seen.get(word, 0) + 1
    return np.asarray(colours, dtype=np.uint8).reshape(len(names), 3)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def _as_numpy_labels(labels: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a (H, W) map, got shape {labels.shape}")
    return labels.astype(np.int64)


def _enlarge(image: Image.Image, labels: np.ndarray, min_side: int = MIN_SIDE):
    factor = int(np.ceil(min_side / min(labels.shape)))
    if factor <= 1:
        return image, labels
    h, w = labels.shape
    image = image.resize((w * factor, h * factor), Image.BICUBIC)
    return image, np.repeat(np.repeat(labels, factor, axis=0), factor, axis=1)


def _box_density(mask: np.ndarray, radius: int) -> np.ndarray:
    """Fraction of each pixel's (2r+1)^2 neighbourhood inside ``mask`` (an integral-image box filter)."""
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    ys, xs = np.arange(h), np.arange(w)
    y0, y1 = np.clip(ys - radius, 0, h), np.clip(ys + radius + 1, 0, h)
    x0, x1 = np.clip(xs - radius, 0, w), np.clip(xs + radius + 1, 0, w)
    total = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    return total / ((y1 - y0)[:, None] * (x1 - x0)[None, :])


def _anchor(mask: np.ndarray, free: np.ndarray, radius: int) -> Optional[tuple]:
    """The point of the region with the most of the region around it, away from names already drawn
    (a scattered class gets its name on its largest solid part, not on its empty centroid)."""
    density = _box_density(mask, radius) * mask * free
    if density.max() < 0.25:
        return None
    y, x = np.unravel_index(int(np.argmax(density)), density.shape)
    return int(x), int(y)


def _check_labels(labels: np.ndarray, names: List[str]) -> None:
    """Every label value must index a class name."""
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise ValueError(f"label values span {labels.min()}..{labels.max()} but there are {len(names)} class names")


def _find_background(names: List[str], background_index: Optional[int]) -> Optional[int]:
    """The label drawn without colour: the one given, else a class named "background" (or "void")."""
    if background_index is None:
        background_index = next((i for i, n in enumerate(names) if n.lower() in BACKGROUND_NAMES), None)
    return background_index


def _fit_image(image: Image.Image, labels: np.ndarray):
    """The photograph in RGB at the label map's size, both enlarged for legible text."""
    image = image.convert("RGB")
    if image.size != (labels.shape[1], labels.shape[0]):
        image = image.resize((labels.shape[1], labels.shape[0]), Image.BICUBIC)
    return _enlarge(image, labels)


def _tint(image: Image.Image, labels: np.ndarray, palette: np.ndarray, alpha: float,
          background_index: Optional[int]) -> np.ndarray:
    """(H, W, 3) float: the photograph blended with its classes' colours (the background left as is)."""
    photo = np.asarray(image, dtype=np.float32)
    tint = palette[labels].astype(np.float32)
    coloured = labels != background_index if background_index is not None else np.ones_like(labels, dtype=bool)
    out = photo.copy()
    out[coloured] = (1 - alpha) * photo[coloured] + alpha * tint[coloured]
    return out


def _outline(out: np.ndarray, labels: np.ndarray) -> Image.Image:
    """Darken region outlines (a pixel whose right or lower neighbour has another label); the picture."""
    edge = np.zeros_like(labels, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    out[edge] = 0.35 * out[edge]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _classes_by_area(labels: np.ndarray):
    """(class ids, pixel counts) of the label values present, largest first."""
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    return ids[order], counts[order]


def _name_regions(canvas: Image.Image, labels: np.ndarray, names: List[str], palette: np.ndarray, ids, counts,
                  background_index: Optional[int], font) -> None:
    """Write each class's name, in its colour on black, on its region if it covers at least 1% of the image."""
    h, w = labels.shape
    draw = ImageDraw.Draw(canvas)
    free = np.ones_like(labels, dtype=bool)  # where a name may still go without covering another
    radius = max(4, min(h, w) // 16)
    for cls, count in zip(ids, counts):
        if cls == background_index or count < 0.01 * labels.size:
            continue
        spot = _anchor(labels == cls, free, radius)
        if spot is None:
            continue
        text = names[cls]
        tw, th = _text_size(draw, text, font)
        x0 = int(np.clip(spot[0] - tw / 2, 2, max(2, w - tw - 6)))
        y0 = int(np.clip(spot[1] - th / 2, 2, max(2, h - th - 6)))
        draw.rectangle([x0 - 3, y0 - 2, x0 + tw + 3, y0 + th + 5], fill=(0, 0, 0))
        draw.text((x0, y0), text, fill=tuple(int(v) for v in palette[cls]), font=font)
        free[max(0, y0 - th - 6):y0 + 2 * th + 10, max(0, x0 - tw // 2 - 6):x0 + tw + tw // 2 + 6] = False


def _with_legend(canvas: Image.Image, names: List[str], palette: np.ndarray, ids, counts, total: int,
                 background_index: Optional[int], max_legend: int, title: Optional[str], font) -> Image.Image:
    """The picture with a legend panel on its right: colour swatch, name and share of the image per class."""
    w, h = canvas.size
    rows = [(int(c), f"{names[c]}  {100 * n / total:.1f}%") for c, n in zip(ids, counts)]
    hidden = max(0, len(rows) - max_legend)
    rows = rows[:max_legend]
    header = title or "classes (area)"
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _text_size(scratch, "Ag", font)[1] + 10
    swatch = line - 8
    text_w = max([_text_size(scratch, t, font)[0] for _, t in rows] + [_text_size(scratch, header, font)[0]])
    panel_w = swatch + text_w + 36
    panel_h = max(h, line * (len(rows) + 2 + (1 if hidden else 0)) + 10)
    sheet = Image.new("RGB", (w + panel_w, panel_h), (255, 255, 255))
    sheet.paste(canvas, (0, 0))
    d = ImageDraw.Draw(sheet)
    d.text((w + 12, 8), header, fill=(0, 0, 0), font=font)
    for k, (cls, text) in enumerate(rows):
        y = 8 + line * (k + 1) + 4
        colour = (255, 255, 255) if cls == background_index else tuple(int(v) for v in palette[cls])
        d.rectangle([w + 12, y, w + 12 + swatch, y + swatch], fill=colour, outline=(0, 0, 0))
        d.text((w + 20 + swatch, y - 2), text, fill=(0, 0, 0), font=font)
    if hidden:
        d.text((w + 12, 8 + line * (len(rows) + 1) + 4), f"+{hidden} more classes", fill=(90, 90, 90), font=font)
    return sheet


def overlay_segmentation(image: Image.Image, labels: Union[np.ndarray, torch.Tensor], class_names: Sequence[str],
                         alpha: float = 0.5, background_index: Optional[int] = None, max_legend: int = 24,
                         title: Optional[str] = None) -> Image.Image:
    """The image under translucent class colours, region outlines and names, plus a legend panel.

    Args:
        image: the photograph (resized to the label map if the sizes differ).
        labels: (H, W) class indices into ``class_names``.
        class_names: names of the label values.
        alpha: opacity of the class colours (0 = image only).
        background_index: a label value drawn without colour (default: a class named "background").
        max_legend: legend rows shown (largest classes first); the rest are counted.
        title: optional line above the legend.
    """
    labels = _as_numpy_labels(labels)
    names = list(class_names)
    _check_labels(labels, names)
    background_index = _find_background(names, background_index)
    image, labels = _fit_image(image, labels)
    palette = class_palette(names)
    canvas = _outline(_tint(image, labels, palette, alpha, background_index), labels)
    font = _font(int(np.clip(min(labels.shape) / 24, 12, 26)))
    ids, counts = _classes_by_area(labels)
    _name_regions(canvas, labels, names, palette, ids, counts, background_index, font)
    return _with_legend(canvas, names, palette, ids, counts, labels.size, background_index, max_legend, title, font)


# matplotlib's "inferno" (CC0, van der Walt & Smith) sampled at 33 even steps: heat maps need no matplotlib,
# so `dinotxt segment` runs on the core install; linear interpolation stays within 5 / 255 of the full map
INFERNO = np.array([[0, 0, 4], [4, 3, 18], [11, 7, 36], [21, 11, 55], [33, 12, 74], [47, 10, 91], [61, 9, 101],
                    [74, 12, 107], [87, 16, 110], [100, 21, 110], [113, 25, 110], [125, 30, 109], [138, 34, 106],
                    [151, 39, 102], [163, 44, 97], [176, 49, 91], [188, 55, 84], [199, 62, 76], [210, 70, 68],
                    [219, 80, 59], [228, 90, 49], [235, 102, 40], [241, 115, 29], [246, 128, 19], [249, 142, 9],
                    [251, 157, 7], [252, 172, 17], [251, 188, 33], [249, 203, 53], [245, 219, 76], [242, 234, 105],
                    [243, 246, 138], [252, 255, 164]], np.float32)


def _colormap(values: np.ndarray) -> np.ndarray:
    """RGB of ``values`` in [0, 1] on the inferno map (``INFERNO``)."""
    x = np.clip(values, 0.0, 1.0) * (len(INFERNO) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(INFERNO) - 2)
    frac = (x - low)[..., None]
    return np.round(INFERNO[low] * (1 - frac) + INFERNO[low + 1] * frac).astype(np.uint8)


def heatmap_sheet(image: Image.Image, scores: Union[np.ndarray, torch.Tensor], class_names: Sequence[str],
                  columns: int = 4, tile: int = 256, max_classes: int = 24) -> Image.Image:
    """A grid of per-class score maps over a grey copy of the image, the image itself first.

    All maps share one colour scale (the lowest to the highest score of the sheet, printed in
    the header), so tiles compare directly. With more than ``max_classes`` classes the ones
    with the highest peak score are shown.

    Args:
        image: the photograph.
        scores: (C, H, W) per-class scores (e.g. ``SegmentationResult.scores``).
        class_names: the C names.
        columns: tiles per row.
        tile: tile width in pixels (height follows the image aspect).
        max_classes: most class tiles drawn.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().numpy()
    scores = np.asarray(scores, dtype=np.float32)
    if scores.ndim != 3 or scores.shape[0] != len(class_names):
        raise ValueError(f"scores must be (C, H, W) with C = {len(class_names)} class names, got {scores.shape}")
    peaks = scores.reshape(scores.shape[0], -1).max(1)
    shown = sorted(np.argsort(-peaks)[:max_classes].tolist())
    lo, hi = float(scores.min()), float(scores.max())
    span = hi - lo if hi > lo else 1.0
    th = max(1, round(tile * scores.shape[1] / scores.shape[2]))
    font = _font(14)
    caption_h = 24
    header_h = 28
    n = len(shown) + 1
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, header_h + rows * (th + caption_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), f"per-class scores, shared colour scale {lo:.3f} (dark) .. {hi:.3f} (bright)", fill=(0, 0, 0), font=font)
    photo = image.convert("RGB").resize((tile, th), Image.BICUBIC)
    grey = np.asarray(photo.convert("L").convert("RGB"), dtype=np.float32)
    tiles = [("image", photo)]
    for c in shown:
        heat = np.asarray(Image.fromarray((scores[c] - lo) / span).resize((tile, th), Image.BILINEAR))
        blend = 0.7 * _colormap(heat).astype(np.float32) + 0.3 * grey
        tiles.append((f"{class_names[c]}  max {peaks[c]:.3f}", Image.fromarray(np.clip(blend, 0, 255).astype(np.uint8))))
    for k, (caption, picture) in enumerate(tiles):
        x, y = (k % columns) * tile, header_h + (k // columns) * (th + caption_h)
        sheet.paste(picture, (x, y + caption_h))
        draw.text((x + 4, y + 4), caption, fill=(0, 0, 0), font=font)
    return sheet


def captioned_grid(images: Sequence[Image.Image], captions: Sequence[Sequence[tuple]], columns: int = 4,
                   tile: int = 160, title: Optional[str] = None) -> Image.Image:
    """Images in a grid, each with lines of text under it: ``captions[i]`` is a list of
    ``(text, (r, g, b))`` lines (e.g. the prediction in green or red, then the truth)."""
    font, small = _font(15), _font(13)
    lines = max((len(c) for c in captions), default=0)
    cell_h = tile + 8 + 19 * lines
    rows = (len(images) + columns - 1) // columns
    top = 30 if title else 0
    sheet = Image.new("RGB", (columns * (tile + 8) + 8, top + rows * (cell_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 7), title, fill=(20, 20, 20), font=font)
    for k, (image, caption) in enumerate(zip(images, captions)):
        x, y = 8 + (k % columns) * (tile + 8), top + 8 + (k // columns) * (cell_h + 8)
        sheet.paste(image.convert("RGB").resize((tile, tile), Image.BICUBIC), (x, y))
        for j, (text, colour) in enumerate(caption):
            draw.text((x + 2, y + tile + 4 + 19 * j), text, fill=colour, font=small if j else font)
    return sheet


def stack_images(pictures: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Pictures one under the other on white (e.g. several overlay pairs in one figure)."""
    width = max(p.width for p in pictures)
    sheet = Image.new("RGB", (width, sum(p.height for p in pictures) + gap * (len(pictures) - 1)), (255, 255, 255))
    y = 0
    for p in pictures:
        sheet.paste(p, (0, y))
        y += p.height + gap
    return sheet


def save_image(picture: Image.Image, path: Union[str, Path]) -> Path:
    """Write a PIL image atomically (format from the suffix, PNG by default)."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    with atomic_output(path) as tmp:
        picture.save(tmp, format=fmt)
    return path


def confusion_matrix_figure(confusion: Union[np.ndarray, torch.Tensor, List[List[int]]], class_names: Sequence[str],
                            path: Union[str, Path], title: str = "confusion matrix (rows: ground truth, normalised)") -> Path:
    """Row-normalised confusion matrix (rows = ground truth, columns = prediction) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    k = conf.shape[0]
    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    side = float(np.clip(0.16 * k + 3, 5, 30))
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if k <= 80:
        size = max(3.0, min(9.0, 400 / k))
        ax.set_xticks(range(k), list(class_names), rotation=90, fontsize=size)
        ax.set_yticks(range(k), list(class_names), fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
