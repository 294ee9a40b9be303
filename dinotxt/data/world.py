"""A procedural world of captioned images for demos and tests (no downloads needed).

Each image shows one or two objects (``SHAPES`` x ``COLORS``) of varying size and place
over a textured background (stripes, checks, dots, gradient, noise, in muted tones).
Captions use varied phrasings. Every image comes with a per-pixel label map:
0 = background, ``1 + class_index(color, shape)`` for object pixels. Everything is a
pure function of the seed.

It is a data source like any other: a recipe's ``data.world`` section (``ensure_world``) writes
it before training reads it through ``data.train``. ``write_world`` writes real webdataset shards in the img2dataset layout
(``key.jpg``, ``key.txt``, ``key.json``, plus ``key.seg.png``) and, for the held-out
split, an image-folder copy (``classes/<color shape>/<key>.jpg``) for zero-shot
evaluation. ``write_spurious_world`` writes a Waterbirds-style variant (a background tied to the class).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..utils.fileio import add_tar_member, atomic_write_text
from .folder import GROUPS_FILE

log = logging.getLogger(__name__)

SHAPES = ["circle", "square", "triangle", "star"]
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
}
BACKGROUNDS = ["striped", "checkered", "dotted", "gradient", "noisy", "plain"]
SIZES = [("tiny", 0.18, 0.26), ("small", 0.26, 0.36), ("large", 0.4, 0.52), ("huge", 0.52, 0.64)]
PLACES = {"top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5), "corner": None}


# words the captions never use, for zero-shot transfer to unseen class names (``synonym_name``):
# a text tower trained from scratch on these captions has never seen them; a pretrained one has
SYNONYMS = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "golden", "purple": "violet",
            "orange": "tangerine", "circle": "ring", "square": "box", "triangle": "wedge", "star": "pentagram"}


def synonym_name(name: str) -> str:
    """``"red circle"`` -> ``"crimson ring"``: a class name in words the training captions never use."""
    return " ".join(SYNONYMS.get(word, word) for word in name.split())


def class_names() -> List[str]:
    """Zero-shot / segmentation class names, ``"<color> <shape>"``, in label order."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def class_index(color: str, shape: str) -> int:
    return list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class WorldSample:
    image: Image.Image
    labels: np.ndarray  # (H, W) uint8, 0 = background
    caption: str
    objects: List[Dict]


def _background(rng: random.Random, size: int, kind: Optional[str] = None,
                tint: Optional[Tuple[int, int, int]] = None) -> Tuple[Image.Image, str]:
    drawn = rng.choice(BACKGROUNDS)  # drawn even when forced, so every later draw is what the seed gives
    kind = kind or drawn
    base = np.array([rng.randint(70, 190)] * 3, dtype=np.float32) + np.array([rng.randint(-25, 25) for _ in range(3)])
    alt = base + rng.choice([-1, 1]) * rng.randint(30, 60)
    if tint is not None:  # a colour cast over both tones of the texture
        base, alt = base + np.array(tint, dtype=np.float32), alt + np.array(tint, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "striped":
        period = rng.randint(6, 20)
        angle = rng.uniform(0, math.pi)
        mask = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 2)[..., None]
    elif kind == "checkered":
        period = rng.randint(8, 24)
        mask = ((np.floor(xx / period) + np.floor(yy / period)) % 2)[..., None]
    elif kind == "dotted":
        period = rng.randint(10, 20)
        r = period * rng.uniform(0.15, 0.3)
        mask = ((((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2) < r * r)[..., None].astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / size
        mask = ((t - t.min()) / (t.max() - t.min() + 1e-6))[..., None]
    elif kind == "noisy":
        nprng = np.random.default_rng(rng.randrange(2**32))
        mask = nprng.random((size // 4, size // 4)).repeat(4, 0).repeat(4, 1)[..., None]
    else:
        mask = np.zeros((size, size, 1), dtype=np.float32)
    img = base * (1 - mask) + alt * mask
    nprng = np.random.default_rng(rng.randrange(2**32))
    img = img + nprng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), kind


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    if shape == "square":
        n, radii = 4, [r * 0.95] * 4
        rot += math.pi / 4
    elif shape == "triangle":
        n, radii = 3, [r] * 3
        rot -= math.pi / 2
    elif shape == "star":
        n, radii = 10, [r if i % 2 == 0 else r * 0.45 for i in range(10)]
        rot -= math.pi / 2
    else:
        raise ValueError(shape)
    return [(cx + radii[i] * math.cos(rot + 2 * math.pi * i / n), cy + radii[i] * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=fill)


def _caption(rng: random.Random, objects: List[Dict], background: str) -> str:
    o = objects[0]
    c, s, z, p = o["color"], o["shape"], o["size"], o["place"]
    a = "an" if c[0] in "aeiou" else "a"
    p = {"top": "at the top", "bottom": "at the bottom", "center": "in the center", "corner": "in a corner"}[p]
    phrasings = [
        f"{a} {c} {s}",
        f"a photo of {a} {c} {s}",
        f"a {z} {c} {s} on a {background} background",
        f"{a} {c} {s} {p}",
        f"there is a {z} {s} that is {c}",
        f"a picture of a {s}, colored {c}",
        f"{c} {s} over a {background} pattern",
        f"a {s} painted {c} {p}",
        f"the {c} {s} is {z}",
        f"a close-up of {a} {c} {s}",
    ]
    text = rng.choice(phrasings)
    if len(objects) > 1:
        o2 = objects[1]
        a2 = "an" if o2["color"][0] in "aeiou" else "a"
        text += rng.choice([f" and {a2} {o2['color']} {o2['shape']}", f", next to a {o2['shape']} in {o2['color']}"])
    return text


def render_sample(seed: int, size: int = 128, max_objects: int = 2,
                  concept: Optional[Tuple[str, str]] = None, shape: Optional[str] = None,
                  background: Optional[str] = None, tint: Optional[Tuple[int, int, int]] = None) -> WorldSample:
    """One image, its label map and caption, a pure function of ``seed``. ``concept=(color, shape)`` forces
    the first object, ``shape`` its shape alone, ``background`` the background kind (one of ``BACKGROUNDS``)
    and ``tint`` an RGB offset of the background (the random draws still happen, so every other choice is
    what the seed gives)."""
    rng = random.Random(seed)
    forced_shape = shape  # the loop below names each object's own shape
    image, background = _background(rng, size, background, tint)
    labels = Image.new("L", (size, size), 0)
    n_obj = 1 if max_objects == 1 or rng.random() < 0.75 else 2
    objects = []
    # draw larger objects first so a second, smaller one stays visible
    for k in range(n_obj):
        zname, lo, hi = SIZES[rng.randrange(len(SIZES))] if k == 0 else SIZES[rng.randrange(2)]
        r = size * rng.uniform(lo, hi) / 2
        place = rng.choice(list(PLACES))
        anchor = PLACES[place]
        if anchor is None:
            anchor = (rng.choice([0.22, 0.78]), rng.choice([0.22, 0.78]))
        cx = min(max(anchor[0] * size + rng.uniform(-0.08, 0.08) * size, r), size - r)
        cy = min(max(anchor[1] * size + rng.uniform(-0.08, 0.08) * size, r), size - r)
        color = rng.choice(list(COLORS))
        shape = rng.choice(SHAPES)
        if k == 0 and concept is not None:
            color, shape = concept
        elif k == 0 and forced_shape is not None:
            shape = forced_shape
        rot = rng.uniform(-0.35, 0.35)
        jitter = tuple(int(min(255, max(0, v + rng.randint(-20, 20)))) for v in COLORS[color])
        _draw(ImageDraw.Draw(image), shape, cx, cy, r, rot, jitter)
        _draw(ImageDraw.Draw(labels), shape, cx, cy, r, rot, 1 + class_index(color, shape))
        objects.append({"color": color, "shape": shape, "size": zname, "place": place,
                        "box": [cx - r, cy - r, cx + r, cy + r]})
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.6)))
    return WorldSample(image, np.asarray(labels, dtype=np.uint8).copy(), _caption(rng, objects, background), objects)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_split(out_dir: Path, num_samples: int, seed: int, size: int = 128, samples_per_shard: int = 512,
                max_objects: int = 2, image_folder: bool = False, plan: Optional[Sequence[Dict]] = None,
                folder_classes: Optional[List[str]] = None) -> List[str]:
    """Write ``num_samples`` samples as shards ``out_dir/000000.tar ...`` (atomically per shard).

    ``plan`` forces what every sample shows (``plan[i]``: ``render``, keyword arguments of ``render_sample``;
    ``class``, its image-folder class among ``folder_classes``; ``group``, written to its json and, with
    ``image_folder``, to ``classes/groups.csv`` as ``path,label,group``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    names = folder_classes or class_names()
    key_of = lambda i: f"{i // samples_per_shard:06d}{i:07d}"  # noqa: E731
    if image_folder:  # every class gets a folder, so zero-shot always ranks all of them
        for name in names:
            (out_dir / "classes" / name).mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, num_samples, samples_per_shard)):
        path = out_dir / f"{s:06d}.tar"
        shards.append(str(path))
        if path.exists():
            continue  # finished shards are kept when a generation is rerun
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tarfile.open(tmp, "w") as tar:
            for i in range(start, min(num_samples, start + samples_per_shard)):
                sample = render_sample(seed * 10_000_019 + i, size, max_objects, **(plan[i]["render"] if plan else {}))
                key = key_of(i)
                jpg = _encode(sample.image, "JPEG")
                add_tar_member(tar, f"{key}.jpg", jpg)
                add_tar_member(tar, f"{key}.txt", sample.caption.encode())
                meta = {"caption": sample.caption, "objects": sample.objects,
                        "label": 1 + class_index(sample.objects[0]["color"], sample.objects[0]["shape"])}
                if plan:
                    meta["group"] = plan[i]["group"]
                add_tar_member(tar, f"{key}.json", json.dumps(meta).encode())
                add_tar_member(tar, f"{key}.seg.png", _encode(Image.fromarray(sample.labels), "PNG"))
                if image_folder:
                    cls = out_dir / "classes" / (plan[i]["class"] if plan else names[meta["label"] - 1])
                    cls.mkdir(parents=True, exist_ok=True)
                    (cls / f"{key}.jpg").write_bytes(jpg)
        os.replace(tmp, path)
    if image_folder and plan:
        rows = "".join(f"{plan[i]['class']}/{key_of(i)}.jpg,{plan[i]['class']},{plan[i]['group']}\n"
                       for i in range(num_samples))
        atomic_write_text(out_dir / "classes" / GROUPS_FILE, "path,label,group\n" + rows)
    return shards


# ---------------------------------------------------------------------------- the spurious-correlation split
# A Waterbirds-style split of the procedural world: a spurious background correlated with the class.
#
# Sagawa et al. (ICLR 2020) put land and water birds on land and water backgrounds, matched in 95% of
# the training images and balanced in test, and report the accuracy of the worst (class, background)
# group next to the average. Here every image shows ONE object; its class is its SHAPE (the four
# ``SHAPES``, colours at random), and a background attribute is tied to it: class ``i`` owns attribute
# value ``i``,
#
# - ``texture``: striped (circle), checkered (square), dotted (triangle), noisy (star);
# - ``tint``: a reddish, greenish, bluish or yellowish cast over a random texture.
#
# In the training split the background is the class's own in exactly ``rate`` of each class's images
# (rounded), one of the other three values (in turn) in the rest; the held-out split does the same with
# ``test_rate`` (default ``1 - rate``: anti-correlated, most test images sit in the groups that were
# rare in training). A model that learned the background instead of the shape fails there.
#
# Layout (the world's, so training and the segmentation evaluation read it as they read the world)::
#
#     ROOT/train/*.tar            training pairs (captions as the world's: shape, colour, often the texture)
#     ROOT/eval/*.tar             held-out pairs with label maps (key.json carries "group")
#     ROOT/eval/classes/<shape>/  the held-out images as a zero-shot folder
#     ROOT/eval/classes/groups.csv  path,label,group per image: "circle/0000000000003.jpg,circle,circle|dotted"

TEXTURES = ["striped", "checkered", "dotted", "noisy"]  # TEXTURES[i] is SHAPES[i]'s own background
TINTS = {"reddish": (55, -25, -25), "greenish": (-25, 50, -25), "bluish": (-25, -25, 55), "yellowish": (45, 45, -40)}
ATTRIBUTES = {"texture": TEXTURES, "tint": list(TINTS)}


def spurious_plan(num: int, seed: int, attribute: str = "texture", rate: float = 0.95) -> List[Dict]:
    """What each of ``num`` samples shows: the classes in turn (balanced), and in each class exactly
    ``round(rate * n_class)`` samples (chosen with ``seed``) on the class's own attribute value."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"data.world.spurious.attribute={attribute!r} is not one of {', '.join(ATTRIBUTES)}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"data.world.spurious rate {rate} must lie in [0, 1]")
    values = ATTRIBUTES[attribute]
    rng = random.Random(seed)
    plan: List[Optional[Dict]] = [None] * num
    for c, shape in enumerate(SHAPES):
        members = list(range(c, num, len(SHAPES)))
        rng.shuffle(members)
        own = round(rate * len(members))
        others = [v for v in values if v != values[c]]
        for j, i in enumerate(members):
            value = values[c] if j < own else others[(j - own) % len(others)]
            render = {"shape": shape, "background": value} if attribute == "texture" else {"shape": shape, "tint": TINTS[value]}
            plan[i] = {"render": render, "class": shape, "group": f"{shape}|{value}", "own": value == values[c]}
    return plan


def write_spurious_world(root: str, num_train: int = 4096, num_eval: int = 480, size: int = 128,
                         samples_per_shard: int = 512, seed: int = 0, attribute: str = "texture", rate: float = 0.95,
                         test_rate: Optional[float] = None) -> Dict[str, List[str]]:
    """The training split (background = class's own at ``rate``) and the held-out split (at ``test_rate``,
    default ``1 - rate``) with its zero-shot folder and ``groups.csv`` (see the module docstring)."""
    root = Path(root)
    test_rate = 1.0 - rate if test_rate is None else test_rate
    train = write_split(root / "train", num_train, seed * 2 + 0, size, samples_per_shard, 1,
                        plan=spurious_plan(num_train, seed * 2 + 0, attribute, rate), folder_classes=list(SHAPES))
    evals = write_split(root / "eval", num_eval, seed * 2 + 1, size, samples_per_shard, 1, image_folder=True,
                        plan=spurious_plan(num_eval, seed * 2 + 1, attribute, test_rate), folder_classes=list(SHAPES))
    (root / "classnames.txt").write_text("\n".join(SHAPES) + "\n")
    return {"train": train, "eval": evals}


def write_world(root: str, num_train: int = 4096, num_eval: int = 480, size: int = 128,
                samples_per_shard: int = 512, seed: int = 0) -> Dict[str, List[str]]:
    """Train split (1-2 objects per image) and a held-out eval split (one object, distinct seeds)."""
    root = Path(root)
    train = write_split(root / "train", num_train, seed * 2 + 0, size, samples_per_shard, 2)
    evals = write_split(root / "eval", num_eval, seed * 2 + 1, size, samples_per_shard, 1, image_folder=True)
    (root / "classnames.txt").write_text("\n".join(class_names()) + "\n")
    return {"train": train, "eval": evals}


WORLD_RECORD = "world.json"  # written last: the settings a complete world was written with


def ensure_world(spec) -> bool:
    """Write the world a recipe's ``data.world`` section describes, when it asks for it
    (``generate: true``) and the folder does not already hold it (``world.json``, written last, records
    the settings); its shards then serve as ``data.train`` like any other. Returns whether it wrote."""
    if not spec.generate:
        return False
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(spec, resolve=True)
    record = Path(spec.root) / WORLD_RECORD
    if record.is_file():
        try:
            if json.loads(record.read_text()) == settings:
                log.info(f"reusing the demo world in {spec.root}")
                return False
        except ValueError:
            pass
        record.unlink()  # another world (or a damaged record): write it again
    if spec.spurious.enabled:
        log.info(f"writing the spurious-correlation world to {spec.root} ({spec.num_train} train / {spec.num_eval} "
                 f"test, background {spec.spurious.attribute} = the class's own in {spec.spurious.rate:.0%} of train)")
        write_spurious_world(spec.root, spec.num_train, spec.num_eval, spec.image_size, spec.samples_per_shard,
                             spec.seed, spec.spurious.attribute, spec.spurious.rate, spec.spurious.test_rate)
    else:
        log.info(f"writing the procedural demo world to {spec.root} ({spec.num_train} train / {spec.num_eval} eval)")
        write_world(spec.root, spec.num_train, spec.num_eval, spec.image_size, spec.samples_per_shard, spec.seed)
    atomic_write_text(record, json.dumps(settings, sort_keys=True))
    return True
