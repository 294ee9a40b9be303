"""Real image-text pairs from Debian packages: the data of the real-pairs benchmark.

``build_real_pairs(root)`` builds, once, a benchmark of REAL drawn/photographed images with
their own human-written text, from images that Debian packages ship, and caches it under
``root``:

    root/train/train-000000.tar ...     webdataset shards (img2dataset layout: key.jpg, key.txt
                                         caption, key.json metadata), >= 2,000 pairs
    root/heldout/heldout-000000.tar ... held-out pairs (about 15%, see SPLIT below)
    root/zeroshot/classes/<category>/<key>.jpg
                                         zero-shot image folder: the held-out images that have a
                                         category (never in train)
    root/manifest.json                  sources, packages and versions, licences, counts, the split
                                         seed, category counts, how often captions name their
                                         category; written last: it marks the build complete

Images are converted to RGB JPEG (quality 90), transparent images composited on white, and
downscaled so the short side is at most 256 px (never upscaled). Nothing is installed at import
and no image is ever committed: the images are read from the installed packages at build time.

Sources (Debian 12 "bookworm" versions as built; any version works)
-------------------------------------------------------------------
openclipart   ``openclipart-png`` + ``openclipart-svg`` 1:0.18+dfsg-19 (Open Clip Art Library 0.18,
              8,121 drawings in 22 folders). Licence: public domain (Creative Commons Public
              Domain Dedication, /usr/share/doc/openclipart-svg/copyright). Pixels: the
              package's pre-rendered PNG. Caption: the drawing's own ``dc:title`` from the SVG's
              RDF metadata, plus its ``dc:description`` when that is real text (not a URL, an
              e-mail, "Created with Inkscape", or a collection blurb shared by > 3 drawings).
              Kept: drawings whose title is their own (shared by at most 3 distinct drawings:
              this drops collection names such as "Lemon SVG theme", "gramastar", "card"), outside
              the icon/pattern/logo folders (``EXCLUDED_OPENCLIPART``); exact duplicates (the same
              PNG in several folders) are kept once; the 16 PNGs over 40 Mpx (up to 620 Mpx, GBs to
              decode) are skipped. The keywords are NOT used (they name the
              folder: "animal", "bird", "food").
tuxpaint      ``tuxpaint-stamps-default`` 2022.06.04-1 (Tux Paint's stamps: photographs and
              drawings of animals, plants, food, vehicles, buildings...). Licence: GPL-2
              (/usr/share/doc/tuxpaint-stamps-default/copyright): fine to use for research; the
              built images are derived from GPL files, so do not redistribute the shards except
              under the GPL. Pixels: the stamp PNGs (SVG-only stamps and ``*_mirror`` copies are
              skipped). Caption: the stamp's English description, the first line of its ``.txt``
              ("A Magellanic penguin.", "Mars—the red planet. It's just beyond earth.").
              The alphabet, maths, and music-note stamps are skipped.
emoji         ``fonts-noto-color-emoji`` 2.042 (Noto Color Emoji bitmaps; font licence SIL OFL
              1.1, tools Apache-2.0) with ``unicode-data`` 15.0.0 (emoji-test.txt; Unicode
              licence, permissive). Pixels: each fully-qualified emoji rendered with Pillow at
              the font's native 109 px (ZWJ sequences joined by libraqm), cropped, with a white
              margin. Caption: its CLDR short name from emoji-test.txt ("eagle", "woman farmer",
              "hot beverage"). Skipped: skin-tone variants, the Symbols and Flags groups, the 24
              clock faces.

Zero-shot categories (``CATEGORIES``) are a taxonomy above the captions: each is a set of the
packages' own folders (openclipart ``animals/birds``, Tux Paint ``animals/birds``) and emoji
subgroups (``animal-bird``), while the captions name the individual thing ("A pelican.",
"Aquila frontale", "dodo"). A category is kept when it has at least ``MIN_CATEGORY`` pairs; an
image whose copies sit in folders of different categories gets none. ``manifest.json`` reports,
per category, the fraction of captions that contain the category name (word match, plural too).

SPLIT: pairs are grouped by their normalised caption (lower case, digits, "(B and W)" and
man/woman/person removed), so near-duplicates ("bee1", "bee2"; "woman farmer", "man farmer")
never straddle train and held-out; groups are split per category stratum with a seeded shuffle
(``seed``, recorded), holding out ``heldout_fraction`` of each stratum and at least
``min_heldout_per_category`` pairs of each kept category.

Measured (Debian 12 packages above, 2 cores): 4,320 pairs = 3,578 train + 742 held-out (17%);
23 zero-shot categories, 452 images (15-70 each); 7.5% of their captions contain the category
name (flower 38%, map 27%, flag 23%, most others 0-5%); 24 s, 52 MB on disk.

Installing what it needs (the build says so in one line when something is missing)::

    apt-get install -y openclipart-png openclipart-svg tuxpaint-stamps-default \\
        fonts-noto-color-emoji unicode-data          # about 330 MB download, as root
    pip install Pillow                               # with FreeType + libraqm (the PyPI wheel has them)

or, without root, ``build_real_pairs(root, fetch=True)``: ``apt-get download`` + ``dpkg-deb -x``
of the same packages into ``root/_debs`` (Debian/Ubuntu hosts with apt lists).

Considered and not used: gcompris-qt-data (photos in Qt resource files, but captions are only file
names and the paintings are cut into puzzle pieces), desktop wallpapers (a few dozen, no
descriptions), flag emoji (the caption names the category: "flag: Germany").
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

BUILD_VERSION = 1

#: what the build needs: Debian packages (apt) and Python packages (pip)
REQUIREMENTS = {
    "apt": ["openclipart-png", "openclipart-svg", "tuxpaint-stamps-default", "fonts-noto-color-emoji", "unicode-data"],
    "pip": ["Pillow"],
}
APT_INSTALL = "apt-get install -y " + " ".join(REQUIREMENTS["apt"])

#: each package: a file that shows it is there, the licence, and a phrase its copyright file must contain
PACKAGES: Dict[str, Dict[str, str]] = {
    "openclipart-png": {"marker": "usr/share/openclipart/png", "licence": "public domain (Creative Commons PD dedication)",
                        "copyright_has": "Public Domain"},
    "openclipart-svg": {"marker": "usr/share/openclipart/svg", "licence": "public domain (Creative Commons PD dedication)",
                        "copyright_has": "Public Domain"},
    "tuxpaint-stamps-default": {"marker": "usr/share/tuxpaint/stamps", "licence": "GPL-2",
                                "copyright_has": "GPL-2"},
    "fonts-noto-color-emoji": {"marker": "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
                               "licence": "SIL OFL 1.1 (font bitmaps), Apache-2.0 (tools)", "copyright_has": "SIL"},
    "unicode-data": {"marker": "usr/share/unicode/emoji/emoji-test.txt", "licence": "Unicode licence (permissive)",
                     "copyright_has": "UNICODE"},
}

SOURCES = {
    "openclipart": {"packages": ["openclipart-png", "openclipart-svg"],
                    "licence": "public domain (Creative Commons Public Domain Dedication)",
                    "caption": "the drawing's dc:title (+ dc:description when real text) from its SVG metadata",
                    "category_from": "the package's folder (animals/birds, food/fruit, ...)"},
    "tuxpaint": {"packages": ["tuxpaint-stamps-default"],
                 "licence": "GPL-2 (use for research; do not redistribute the built images except under the GPL)",
                 "caption": "the stamp's English description (first line of its .txt)",
                 "category_from": "the stamp folder (animals/birds, food/fruit, ...)"},
    "emoji": {"packages": ["fonts-noto-color-emoji", "unicode-data"],
              "licence": "SIL OFL 1.1 (Noto Color Emoji bitmaps); Unicode licence (emoji-test.txt names)",
              "caption": "the CLDR short name from emoji-test.txt",
              "category_from": "the emoji subgroup (animal-bird, food-fruit, ...)"},
}

#: zero-shot category -> source -> folder prefixes (openclipart, tuxpaint) or emoji subgroups;
#: the longest matching prefix wins, so "buildings/furniture" is furniture, not building
CATEGORIES: Dict[str, Dict[str, List[str]]] = {
    "mammal": {"openclipart": ["animals/mammals"], "tuxpaint": ["animals/mammals", "animals/marsupials"],
               "emoji": ["animal-mammal"]},
    "bird": {"openclipart": ["animals/birds"], "tuxpaint": ["animals/birds"], "emoji": ["animal-bird"]},
    "sea creature": {"openclipart": ["animals/fish"],
                     "tuxpaint": ["animals/fish", "animals/shellfish", "animals/mammals/aquatic"],
                     "emoji": ["animal-marine"]},
    "insect": {"openclipart": ["animals/bugs"], "tuxpaint": ["animals/insects"], "emoji": ["animal-bug"]},
    "reptile": {"openclipart": ["animals/amphibian", "animals/dinosaurs"],
                "tuxpaint": ["animals/amphibians", "animals/lizards", "animals/dinosaur"],
                "emoji": ["animal-reptile", "animal-amphibian"]},
    "flower": {"openclipart": ["plants/flowers"], "tuxpaint": ["plants/flowers"], "emoji": ["plant-flower"]},
    "tree": {"openclipart": ["plants/trees"], "tuxpaint": ["plants/trees"]},
    "fruit": {"openclipart": ["food/fruit"], "tuxpaint": ["food/fruit"], "emoji": ["food-fruit"]},
    "vegetable": {"openclipart": ["food/vegetables"], "tuxpaint": ["food/vegetables"], "emoji": ["food-vegetable"]},
    "dessert": {"openclipart": ["food/desserts"], "tuxpaint": ["food/dessert"], "emoji": ["food-sweet"]},
    "drink": {"openclipart": ["food/beverages"], "emoji": ["drink"]},
    "prepared food": {"openclipart": ["food/breads_and_carbs", "food/meats_and_eggs", "food/dairy"],
                      "emoji": ["food-prepared", "food-asian"]},
    "building": {"openclipart": ["buildings"], "tuxpaint": ["town/houses", "town/monuments"],
                 "emoji": ["place-building", "place-religious"]},
    "furniture": {"openclipart": ["buildings/furniture"]},
    "clothing": {"openclipart": ["people/clothing"], "tuxpaint": ["clothes"], "emoji": ["clothing"]},
    "flag": {"openclipart": ["signs_and_symbols/flags"], "tuxpaint": ["town/flags"]},
    "road sign": {"openclipart": ["transportation/roadsigns"], "tuxpaint": ["town/roadsigns"]},
    "vehicle": {"openclipart": ["transportation/vehicles"], "tuxpaint": ["vehicles"],
                "emoji": ["transport-ground", "transport-air", "transport-water"]},
    "musical instrument": {"tuxpaint": ["hobbies/music"], "emoji": ["musical-instrument"]},
    "tool": {"openclipart": ["tools"], "tuxpaint": ["household/tools"], "emoji": ["tool"]},
    "weapon": {"openclipart": ["tools/weapons"], "tuxpaint": ["military"]},
    "game or toy": {"openclipart": ["recreation/toys", "tools/toys", "recreation/games"],
                    "tuxpaint": ["people/toys", "symbols/chess"], "emoji": ["game"]},
    "sports equipment": {"openclipart": ["recreation/sports"], "tuxpaint": ["sports"], "emoji": ["sport"]},
    "money": {"openclipart": ["signs_and_symbols/money"], "tuxpaint": ["symbols/money"], "emoji": ["money"]},
    "electronic device": {"openclipart": ["computer/hardware", "computer/network", "office/telephone", "electronics"],
                          "emoji": ["computer", "phone"]},
    "office supplies": {"openclipart": ["office"], "emoji": ["office", "writing"]},
    "clock": {"openclipart": ["signs_and_symbols/clocks"], "emoji": ["time"]},
    "body part": {"openclipart": ["people/bodypart"], "tuxpaint": ["people/body_parts"], "emoji": ["body-parts"]},
    "map": {"openclipart": ["geography"], "emoji": ["place-map"]},
}

EXCLUDED_OPENCLIPART = ("special", "shapes", "buttons", "logos", "computer/buttons", "computer/icons",
                        "signs_and_symbols/led", "unsorted/duplicates")
EXCLUDED_TUXPAINT = ("symbols/alphabets", "symbols/math", "symbols/music")
EXCLUDED_EMOJI_GROUPS = ("Symbols", "Flags", "Component")

DEFAULTS = {
    "seed": 0,
    "heldout_fraction": 0.15,
    "min_heldout_per_category": 15,
    "min_category": 30,
    "max_side": 256,
    "jpeg_quality": 90,
    "shard_size": 1000,
    "min_image_side": 24,
    "max_source_pixels": 40_000_000,
}


class MissingPackages(RuntimeError):
    """A package the build needs is not installed; the message says how to install it."""


# ---------------------------------------------------------------------------------------------
# pairs and images


@dataclass
class Pair:
    """One image-text pair before conversion. ``image`` says how to load the image (picklable):
    ``("file", path)``, ``("emoji", font_path, text)`` or ``("bytes", encoded_image)``."""

    source: str
    ident: str  # the source's own id (a path inside the package, or the emoji's code points)
    caption: str
    image: Tuple
    taxonomy: str = ""  # the source's folder / subgroup
    category: Optional[str] = None
    meta: Dict = field(default_factory=dict)


_FONTS: Dict[str, object] = {}


def _render_emoji(font_path: str, text: str):
    from PIL import Image, ImageDraw, ImageFont

    font = _FONTS.get(font_path)
    if font is None:
        font = _FONTS[font_path] = ImageFont.truetype(font_path, 109, layout_engine=ImageFont.Layout.RAQM)
    canvas = Image.new("RGBA", (420, 180), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((20, 20), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError("emoji renders empty")
    if box[2] - box[0] > 160:  # a sequence the font (or layout) did not join into one glyph
        raise ValueError("emoji renders as several glyphs")
    return canvas.crop(box)


def load_image(spec: Tuple, max_pixels: int = DEFAULTS["max_source_pixels"]):
    """The PIL image a ``Pair.image`` spec names (any mode); ``Skip`` for a file over ``max_pixels``."""
    from PIL import Image

    kind = spec[0]
    if kind in ("file", "bytes"):
        # the packages' own files; a few openclipart PNGs are 170-620 Mpx renderings (GBs to decode): skipped
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(spec[1] if kind == "file" else io.BytesIO(spec[1]))
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        if img.width * img.height > max_pixels:
            raise Skip(f"larger than {max_pixels / 1e6:g} Mpx")
        img.load()
        return img
    if kind == "emoji":
        return _render_emoji(spec[1], spec[2])
    raise ValueError(f"unknown image spec {kind!r}")


def to_rgb_jpeg(img, max_side: int = 256, quality: int = 90, pad: int = 0) -> Tuple[bytes, Tuple[int, int]]:
    """``img`` as RGB JPEG bytes: the short side at most ``max_side`` (downscaled only, Lanczos,
    with premultiplied alpha), transparency composited on white, an optional white margin of
    ``pad`` px (inside the ``max_side`` bound)."""
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "PA", "RGBa") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    elif img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGB")
    short = min(img.size) + 2 * pad
    if short > max_side:
        scale = (max_side - 2 * pad) / (short - 2 * pad)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS,
                         reducing_gap=3.0)
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    img = img.convert("RGB")
    if pad:
        padded = Image.new("RGB", (img.width + 2 * pad, img.height + 2 * pad), (255, 255, 255))
        padded.paste(img, (pad, pad))
        img = padded
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue(), img.size


class Skip(Exception):
    """An image left out on purpose (too small, too large to decode): the message is the reason."""


def _convert(args) -> Tuple[Optional[bytes], Optional[str], Optional[Tuple[int, int]], Optional[str]]:
    """(jpeg, pixel hash, size, why skipped) for one pair; runs in worker processes."""
    spec, max_side, quality, min_side, max_pixels = args
    try:
        img = load_image(spec, max_pixels)
        if min(img.size) < min_side:
            raise Skip(f"smaller than {min_side} px")
        jpeg, size = to_rgb_jpeg(img, max_side, quality, pad=8 if spec[0] == "emoji" else 0)
        from PIL import Image

        # the same picture (any source): equal 32 x 32 thumbnails of the converted image
        digest = hashlib.sha1(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((32, 32)).tobytes()).hexdigest()
        return jpeg, digest, size, None
    except Skip as e:
        return None, None, None, str(e)
    except Exception as e:  # noqa: BLE001 - an unreadable file is skipped and counted
        return None, None, None, f"unreadable ({type(e).__name__})"


# ---------------------------------------------------------------------------------------------
# categories and caption normalisation


def category_for(source: str, taxonomy: str, categories: Dict[str, Dict[str, List[str]]] = None) -> Optional[str]:
    """The zero-shot category of a pair from its source folder / subgroup (longest prefix wins)."""
    categories = CATEGORIES if categories is None else categories
    best, best_len = None, -1
    for name, rules in categories.items():
        for prefix in rules.get(source, ()):
            if source == "emoji":
                hit = taxonomy == prefix
            else:
                hit = taxonomy == prefix or taxonomy.startswith(prefix + "/")
            if hit and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best


_GROUP_DROP = re.compile(r"\((?:b|black)\s*(?:and|&|&amp;)\s*(?:w|white)\)|\bb&w\b|\b(?:man|woman|person|men|women|people)\b|\d+")


def group_key(caption: str) -> str:
    """Near-duplicate group of a caption: lower case, without digits, "(B and W)", articles,
    man/woman/person and punctuation ("bee1" ~ "bee2"; "woman farmer" ~ "man farmer")."""
    text = _GROUP_DROP.sub(" ", caption.lower())
    words = [w for w in re.split(r"[^\w]+", text) if w and w not in ("a", "an", "the")]
    return " ".join(words) or caption.lower()


def mentions(caption: str, category: str) -> bool:
    """Whether ``caption`` contains the category name (whole words, singular or plural)."""
    name = re.escape(category.lower()).replace(r"\ ", r"\s+")
    return re.search(rf"\b{name}(?:s|es)?\b", caption.lower()) is not None


# ---------------------------------------------------------------------------------------------
# packages


@dataclass
class Package:
    name: str
    prefix: Path  # the file system root its files sit under ("/" when installed)
    version: str
    copyright: Optional[str]  # path of its copyright file, when present
    licence_checked: bool


def _dpkg_version(name: str) -> Optional[str]:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", name], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or "installed" not in out.stdout.split("\t")[0]:
        return None
    return out.stdout.split("\t", 1)[1].strip() or None


def _fetch_package(name: str, cache: Path) -> Path:
    """``apt-get download`` + ``dpkg-deb -x`` of ``name`` into ``cache/<name>``; returns that prefix."""
    prefix = cache / name
    if (prefix / ".version").is_file():
        return prefix
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", name], cwd=debs, check=True, capture_output=True, text=True,
                       timeout=1800)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise MissingPackages(f"could not download Debian package {name} with apt-get download "
                              f"({detail.strip().splitlines()[-1] if detail.strip() else e}); "
                              f"install it instead: {APT_INSTALL}") from None
    deb = sorted(debs.glob(f"{name}_*.deb"))[-1]
    partial = cache / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True, timeout=1800)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                             text=True).stdout.strip()
    (partial / ".version").write_text(version + "\n")
    shutil.rmtree(prefix, ignore_errors=True)
    os.replace(partial, prefix)
    deb.unlink()
    return prefix


def locate_packages(fetch: bool = False, cache: Optional[Path] = None,
                    names: Sequence[str] = tuple(PACKAGES)) -> Dict[str, Package]:
    """Where each needed Debian package's files are: installed on this system, or (``fetch``)
    downloaded and unpacked under ``cache``. Raises ``MissingPackages`` naming the install command."""
    found: Dict[str, Package] = {}
    missing = []
    for name in names:
        info = PACKAGES[name]
        prefix = None
        version = None
        if (Path("/") / info["marker"]).exists():
            prefix, version = Path("/"), _dpkg_version(name) or "unknown"
        elif cache is not None and (cache / name / ".version").is_file():
            prefix = cache / name
            version = (prefix / ".version").read_text().strip()
        elif fetch and cache is not None:
            prefix = _fetch_package(name, cache)
            version = (prefix / ".version").read_text().strip()
        if prefix is None or not (prefix / info["marker"]).exists():
            missing.append(name)
            continue
        copyright_file = prefix / "usr/share/doc" / name / "copyright"
        checked = False
        if copyright_file.is_file():
            checked = info["copyright_has"].lower() in copyright_file.read_text(errors="replace").lower()
            if not checked:
                raise RuntimeError(f"{copyright_file} does not say {info['copyright_has']!r}: check the licence "
                                   f"of {name} before using it")
        found[name] = Package(name, prefix, version, str(copyright_file) if copyright_file.is_file() else None,
                              checked)
    if missing:
        raise MissingPackages(f"missing Debian package(s) {', '.join(missing)}: run `{APT_INSTALL}` "
                              f"(as root) or build_real_pairs(root, fetch=True)")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise MissingPackages("missing Python package Pillow: run `pip install Pillow`") from None
    return found


# ---------------------------------------------------------------------------------------------
# the three sources


def _xml_text(block: str, tag: str) -> str:
    m = re.search(rf"<{tag}>(.*?)</{tag}>", block, re.S)
    if not m:
        return ""
    text = re.sub(r"<[^>]+>", " ", m.group(1))
    for _ in range(3):  # "&amp;amp;" occurs
        text = html.unescape(text)
    return " ".join(text.split())


def _clean_title(title: str) -> str:
    title = re.sub(r"^clipart by [^-]+ - ", "", title, flags=re.I)
    title = re.sub(r"\s*hash\(0x[0-9a-f]+\)\s*", " ", title, flags=re.I)
    title = re.sub(r"\.svg$", "", title, flags=re.I)
    return " ".join(title.replace("_", " ").split())


def _useful_description(desc: str, title: str) -> bool:
    low = desc.lower()
    words = set(re.findall(r"\w+", low))
    return (3 <= len(desc) <= 300 and not words <= set(re.findall(r"\w+", title.lower()))  # adds words
            and "@" not in desc and "http" not in low
            and "www." not in low and not re.search(r"hash\(0x", low)
            and not low.startswith(("created with", "eps converted")))


def openclipart_pairs(png_prefix: Path, svg_prefix: Path, max_title_share: int = 3) -> Tuple[List[Pair], Counter]:
    """Openclipart drawings with their own titles (see the module docstring); and skip reasons."""
    svg_root = svg_prefix / "usr/share/openclipart/svg"
    png_root = png_prefix / "usr/share/openclipart/png"
    skipped: Counter = Counter()
    records = []
    for svg in sorted(svg_root.rglob("*.svg")):
        rel = svg.relative_to(svg_root)
        folder = rel.parent.as_posix()
        if folder == "." or any(folder == ex or folder.startswith(ex + "/") for ex in EXCLUDED_OPENCLIPART):
            skipped["excluded folder"] += 1
            continue
        png = (png_root / rel).with_suffix(".png")
        if not png.is_file():
            skipped["no PNG"] += 1
            continue
        text = svg.read_text(errors="replace")
        work = re.search(r"<cc:Work.*?</cc:Work>", text, re.S)
        block = work.group(0) if work else ""
        title = _clean_title(_xml_text(block, "dc:title"))
        desc = _xml_text(block, "dc:description")
        records.append((folder, rel.as_posix(), png, title, desc, hashlib.sha1(png.read_bytes()).hexdigest()))
    # one record per distinct image; its folders' categories must agree
    by_hash: Dict[str, List] = defaultdict(list)
    for r in records:
        by_hash[r[5]].append(r)
    unique = []
    for digest in sorted(by_hash, key=lambda d: by_hash[d][0][1]):
        copies = by_hash[digest]
        skipped["duplicate copy"] += len(copies) - 1
        first = copies[0]
        titled = next((c for c in copies if c[3]), first)
        cats = {category_for("openclipart", c[0]) for c in copies} - {None}
        cat = cats.pop() if len(cats) == 1 else None  # copies in folders of different categories: none
        unique.append((titled, cat, sorted({c[0] for c in copies})))
    title_share = Counter(r[3].lower() for r, _, _ in unique)
    desc_share = Counter(r[4].lower() for r, _, _ in unique)
    pairs = []
    for (folder, rel, png, title, desc, _), cat, folders in unique:
        if len(title) < 2 or not re.search(r"[a-zA-Z]", title):
            skipped["no title"] += 1
            continue
        if title_share[title.lower()] > max_title_share:
            skipped["collection title"] += 1
            continue
        caption = title
        if desc and desc_share[desc.lower()] <= max_title_share and _useful_description(desc, title):
            caption = f"{title}. {desc}" if not title.endswith((".", "!", "?")) else f"{title} {desc}"
        pairs.append(Pair("openclipart", rel, caption, ("file", str(png)), folder, cat,
                          {"folders": folders}))
    return pairs, skipped


def tuxpaint_pairs(prefix: Path) -> Tuple[List[Pair], Counter]:
    """Tux Paint stamps with their English descriptions."""
    root = prefix / "usr/share/tuxpaint/stamps"
    skipped: Counter = Counter()
    pairs = []
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root)
        folder = rel.parent.as_posix()
        if any(folder == ex or folder.startswith(ex + "/") for ex in EXCLUDED_TUXPAINT):
            skipped["excluded folder"] += 1
            continue
        if png.stem.endswith("_mirror") or png.stem.endswith("_flip"):
            skipped["mirror copy"] += 1
            continue
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            skipped["no description"] += 1
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = " ".join(lines[0].split()) if lines else ""
        if not caption or ".utf8=" in caption:
            skipped["no description"] += 1
            continue
        pairs.append(Pair("tuxpaint", rel.as_posix(), caption, ("file", str(png)), folder,
                          category_for("tuxpaint", folder)))
    return pairs, skipped


def emoji_pairs(font_prefix: Path, unicode_prefix: Path) -> Tuple[List[Pair], Counter]:
    """Noto Color Emoji glyphs with their CLDR short names."""
    font = font_prefix / "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    test = unicode_prefix / "usr/share/unicode/emoji/emoji-test.txt"
    skipped: Counter = Counter()
    pairs = []
    group = subgroup = ""
    for line in test.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#") or ";" not in line:
            continue
        codes, rest = line.split(";", 1)
        if "fully-qualified" not in rest.split("#")[0]:
            continue
        points = [int(c, 16) for c in codes.split()]
        if any(0x1F3FB <= p <= 0x1F3FF for p in points):
            skipped["skin tone variant"] += 1
            continue
        if group in EXCLUDED_EMOJI_GROUPS:
            skipped[f"group {group}"] += 1
            continue
        name = re.sub(r"^E\d+\.\d+\s+", "", rest.split("#", 1)[1].strip().split(" ", 1)[1]).strip()
        if subgroup == "time" and re.search(r"o’clock|o'clock|-thirty", name):
            skipped["clock face"] += 1
            continue
        text = "".join(chr(p) for p in points)
        pairs.append(Pair("emoji", "-".join(f"{p:04X}" for p in points), name, ("emoji", str(font), text),
                          subgroup, category_for("emoji", subgroup), {"group": group}))
    return pairs, skipped


def collect_pairs(packages: Dict[str, Package]) -> Tuple[List[Pair], Dict[str, Dict[str, int]]]:
    """All pairs of the three sources, in a fixed order, with the skip counts per source."""
    oc, oc_skip = openclipart_pairs(packages["openclipart-png"].prefix, packages["openclipart-svg"].prefix)
    tux, tux_skip = tuxpaint_pairs(packages["tuxpaint-stamps-default"].prefix)
    emo, emo_skip = emoji_pairs(packages["fonts-noto-color-emoji"].prefix, packages["unicode-data"].prefix)
    return oc + tux + emo, {"openclipart": dict(oc_skip), "tuxpaint": dict(tux_skip), "emoji": dict(emo_skip)}


# ---------------------------------------------------------------------------------------------
# split


def split_pairs(pairs: Sequence[Pair], seed: int = 0, heldout_fraction: float = 0.15,
                min_heldout_per_category: int = 15) -> Tuple[List[int], List[int]]:
    """(train indices, held-out indices): near-duplicate groups (``group_key``) stay together;
    each category stratum (and the uncategorised rest) holds out ``heldout_fraction`` of its
    pairs, and at least ``min_heldout_per_category`` (at most half) of each category's pairs."""
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        groups[group_key(p.caption)].append(i)
    strata: Dict[str, List[str]] = defaultdict(list)
    for key in sorted(groups):
        cats = Counter(pairs[i].category for i in groups[key] if pairs[i].category)
        stratum = sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] if cats else ""
        strata[stratum].append(key)
    heldout: List[int] = []
    for stratum in sorted(strata):
        keys = strata[stratum]
        total = sum(1 for k in keys for i in groups[k] if not stratum or pairs[i].category == stratum)
        target = round(heldout_fraction * total)
        if stratum:
            target = max(target, min(min_heldout_per_category, total // 2))
        rng = random.Random(f"{seed}:{stratum}")
        rng.shuffle(keys)
        taken = 0
        for k in keys:
            if taken >= target:
                break
            heldout.extend(groups[k])
            taken += sum(1 for i in groups[k] if not stratum or pairs[i].category == stratum)
    held = set(heldout)
    return [i for i in range(len(pairs)) if i not in held], sorted(held)


# ---------------------------------------------------------------------------------------------
# writing


def _write_shards(folder: Path, prefix: str, samples: Sequence[Tuple[str, bytes, str, Dict]],
                  shard_size: int) -> List[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for start in range(0, len(samples), shard_size):
        name = f"{prefix}-{start // shard_size:06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, caption, meta in samples[start:start + shard_size]:
                for member, data in ((f"{key}.jpg", jpeg), (f"{key}.txt", caption.encode("utf-8")),
                                     (f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        names.append(f"{folder.name}/{name}")
    return names


@contextlib.contextmanager
def _lock(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _convert_all(pairs: Sequence[Pair], spec: Dict, workers: int):
    jobs = [(p.image, spec["max_side"], spec["jpeg_quality"], spec["min_image_side"], spec["max_source_pixels"])
            for p in pairs]
    if workers <= 1 or len(jobs) < 64:
        return [_convert(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("fork" if hasattr(os, "fork") else "spawn").Pool(workers) as pool:
        return pool.map(_convert, jobs, chunksize=32)


def build_from_pairs(root: Path, pairs: Sequence[Pair], spec: Dict, sources: Optional[Dict] = None,
                     workers: int = 1, extra: Optional[Dict] = None) -> Dict:
    """Convert, deduplicate, split and write ``pairs`` under ``root`` (train/, heldout/,
    zeroshot/classes/, then manifest.json last). Not cached: ``build_real_pairs`` is."""
    started = time.time()
    root = Path(root)
    pairs = [dataclasses.replace(p, meta=dict(p.meta)) for p in pairs]  # categories change below: not the caller's
    converted = _convert_all(pairs, spec, workers)
    skipped: Counter = Counter()
    kept: List[Pair] = []
    images: List[Tuple[bytes, Tuple[int, int]]] = []
    seen: Dict[str, int] = {}
    for p, (jpeg, digest, size, error) in zip(pairs, converted):
        if jpeg is None:
            skipped[f"{p.source}: {error}"] += 1
            continue
        if digest in seen:  # the same picture again (within or across sources)
            skipped[f"{p.source}: duplicate image"] += 1
            first = kept[seen[digest]]
            if first.category is None and not first.meta.get("category_conflict"):
                first.category = p.category
            elif p.category is not None and p.category != first.category:  # two categories: none
                first.category = None
                first.meta["category_conflict"] = True
            continue
        seen[digest] = len(kept)
        kept.append(p)
        images.append((jpeg, size))
    # categories with too few pairs are not zero-shot categories
    sizes = Counter(p.category for p in kept if p.category)
    small = {c: n for c, n in sizes.items() if n < spec["min_category"]}
    for p in kept:
        if p.category in small:
            p.meta = dict(p.meta, small_category=p.category)
            p.category = None
    train_idx, held_idx = split_pairs(kept, spec["seed"], spec["heldout_fraction"], spec["min_heldout_per_category"])
    short = {"openclipart": "oc", "tuxpaint": "tux", "emoji": "emoji"}
    keys = []
    counters: Counter = Counter()
    for p in kept:
        tag = short.get(p.source, re.sub(r"[^a-z0-9]", "", p.source.lower()) or "src")
        keys.append(f"{tag}{counters[tag]:05d}")
        counters[tag] += 1

    def sample(i: int, split: str):
        p = kept[i]
        meta = {"source": p.source, "id": p.ident, "taxonomy": p.taxonomy, "category": p.category,
                "split": split, "size": list(images[i][1]), **p.meta}
        if sources and p.source in sources:
            meta["licence"] = sources[p.source].get("licence")
        return keys[i], images[i][0], p.caption, meta

    rng = random.Random(spec["seed"])
    train_order = list(train_idx)
    rng.shuffle(train_order)
    held_order = list(held_idx)
    rng.shuffle(held_order)

    partial = root / f".partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        train_shards = _write_shards(partial / "train", "train", [sample(i, "train") for i in train_order],
                                     spec["shard_size"])
        held_shards = _write_shards(partial / "heldout", "heldout", [sample(i, "heldout") for i in held_order],
                                    spec["shard_size"])
        zs = partial / "zeroshot" / "classes"
        zs.mkdir(parents=True)
        zs_counts: Counter = Counter()
        zs_mentions: Counter = Counter()
        for i in sorted(held_idx, key=lambda i: keys[i]):
            p = kept[i]
            if not p.category:
                continue
            (zs / p.category).mkdir(exist_ok=True)
            (zs / p.category / f"{keys[i]}.jpg").write_bytes(images[i][0])
            zs_counts[p.category] += 1
            zs_mentions[p.category] += mentions(p.caption, p.category)
        for name in ("train", "heldout", "zeroshot"):
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(partial / name, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)

    cats = sorted({p.category for p in kept if p.category})
    all_mentions = {c: sum(mentions(p.caption, c) for p in kept if p.category == c) for c in cats}
    per_split = {c: {"train": sum(1 for i in train_idx if kept[i].category == c),
                     "heldout": sum(1 for i in held_idx if kept[i].category == c)} for c in cats}
    n_zs = sum(zs_counts.values())
    n_cat = sum(sizes[c] for c in cats)
    by_source = {s: {"train": sum(1 for i in train_idx if kept[i].source == s),
                     "heldout": sum(1 for i in held_idx if kept[i].source == s)}
                 for s in sorted({p.source for p in kept})}
    manifest = {
        "version": BUILD_VERSION,
        "spec": dict(spec),
        "sources": sources or {},
        "counts": {"train": len(train_idx), "heldout": len(held_idx), "zeroshot": n_zs,
                   "pairs": len(kept), "candidates": len(pairs), "by_source": by_source,
                   "skipped": dict(sorted(skipped.items()))},
        "splits": {"train": train_shards, "heldout": held_shards, "zeroshot": "zeroshot/classes",
                   "seed": spec["seed"], "heldout_fraction": spec["heldout_fraction"],
                   "grouping": "normalised caption (group_key), stratified by category"},
        "zeroshot": {
            "root": "zeroshot/classes",
            "categories": dict(sorted(zs_counts.items())),
            "category_rules": {c: CATEGORIES.get(c) for c in cats},
            "dropped_small_categories": dict(sorted(small.items())),
            "caption_mentions_category": {
                "zeroshot_fraction": round(sum(zs_mentions.values()) / n_zs, 4) if n_zs else None,
                "all_categorised_fraction": round(sum(all_mentions.values()) / n_cat, 4) if n_cat else None,
                "per_category": {c: round(all_mentions[c] / sizes[c], 3) for c in cats},
                "rule": "caption contains the category name as whole words (or its plural), case-insensitive",
            },
            "pairs_per_category": per_split,
        },
        "build_seconds": round(time.time() - started, 1),
    }
    if extra:
        manifest.update(extra)
    _atomic_json(root / "manifest.json", manifest)
    return manifest


def _spec(**overrides) -> Dict:
    spec = dict(DEFAULTS)
    for k, v in overrides.items():
        if v is not None:
            spec[k] = v
    return spec


def cached_manifest(root: Path, spec: Dict) -> Optional[Dict]:
    """The manifest of a complete build under ``root`` made with ``spec`` (and this BUILD_VERSION), else None."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("version") != BUILD_VERSION or manifest.get("spec") != spec:
        return None
    if not all((Path(root) / s).is_file() for s in manifest["splits"]["train"] + manifest["splits"]["heldout"]):
        return None
    return manifest


def build_cached(root: Path, spec: Dict, make: Callable[[], Tuple[Sequence[Pair], Dict, Dict]],
                 workers: int = 1) -> Dict:
    """``root``'s manifest when a complete build with ``spec`` is there; otherwise ``make()``
    -> (pairs, sources, extra) and ``build_from_pairs``, under a lock, the old manifest removed
    first so that an interrupted build is never taken for a complete one."""
    root = Path(root)
    hit = cached_manifest(root, spec)
    if hit is not None:
        return hit
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".build.lock"):
        hit = cached_manifest(root, spec)  # another process may have built it meanwhile
        if hit is not None:
            return hit
        with contextlib.suppress(FileNotFoundError):
            (root / "manifest.json").unlink()
        pairs, sources, extra = make()
        return build_from_pairs(root, pairs, spec, sources, workers, extra)


def build_real_pairs(root: Path, *, seed: int = None, heldout_fraction: float = None, fetch: bool = False,
                     workers: Optional[int] = None) -> Dict:
    """Build the real-pairs benchmark under ``root`` once (see the module docstring) and return
    its manifest; a rerun with the same settings returns the cached manifest without reading
    the packages. ``fetch``: download missing Debian packages into ``root/_debs`` (no root needed)."""
    root = Path(root)
    spec = _spec(seed=seed, heldout_fraction=heldout_fraction)

    def make():
        packages = locate_packages(fetch=fetch, cache=root / "_debs")
        pairs, skipped = collect_pairs(packages)
        sources = {}
        for name, info in SOURCES.items():
            sources[name] = dict(info, versions={p: packages[p].version for p in info["packages"]},
                                 copyright={p: packages[p].copyright for p in info["packages"]},
                                 licence_checked={p: packages[p].licence_checked for p in info["packages"]},
                                 candidates=sum(1 for p in pairs if p.source == name),
                                 skipped_before_conversion=skipped.get(name, {}))
        return pairs, sources, {"requirements": REQUIREMENTS}

    return build_cached(root, spec, make, workers=workers or min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------
# reading back


def iter_shard(path: Path) -> Iterable[Tuple[str, bytes, str, Dict]]:
    """(key, jpeg, caption, meta) of each sample in one of the shards written here."""
    samples: Dict[str, Dict[str, bytes]] = {}
    order = []
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if key not in samples:
                samples[key] = {}
                order.append(key)
            samples[key][ext] = tar.extractfile(member).read()
    for key in order:
        s = samples[key]
        yield key, s["jpg"], s["txt"].decode("utf-8"), json.loads(s["json"])


def contact_sheet(root: Path, out: Path, n: int = 16, seed: int = 0, cols: int = 4, cell: int = 256) -> Path:
    """A PNG of ``n`` random training images with their captions (and categories), to look at."""
    from PIL import Image, ImageDraw, ImageFont
    import textwrap

    root = Path(root)
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    samples = [s for shard in manifest["splits"]["train"] for s in iter_shard(root / shard)]
    picks = random.Random(seed).sample(samples, min(n, len(samples)))
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 13)
    except OSError:
        font = ImageFont.load_default()
    text_h = 58
    rows = (len(picks) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (key, jpeg, caption, meta) in enumerate(picks):
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        img.thumbnail((cell - 8, cell - 8))
        x, y = (k % cols) * cell, (k // cols) * (cell + text_h)
        sheet.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        label = f"[{meta['source']}{' / ' + meta['category'] if meta.get('category') else ''}] {caption}"
        lines = textwrap.wrap(label, 36)[:4]
        draw.multiline_text((x + 4, y + cell), "\n".join(lines), fill="black", font=font, spacing=1)
        draw.rectangle([x, y, x + cell - 1, y + cell + text_h - 1], outline=(200, 200, 200))
    out = Path(out)
    sheet.save(out)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--fetch", action="store_true", help="apt-get download missing packages into ROOT/_debs")
    ap.add_argument("--sheet", type=Path, help="also write a contact sheet PNG of 16 training pairs")
    args = ap.parse_args()
    try:
        m = build_real_pairs(args.root, fetch=args.fetch)
    except MissingPackages as e:
        raise SystemExit(str(e))
    print(json.dumps({k: m[k] for k in ("counts", "zeroshot", "build_seconds")}, indent=2, ensure_ascii=False))
    if args.sheet:
        print("contact sheet:", contact_sheet(args.root, args.sheet))
