"""A web-like pool on the demo world, for the curation demo: skewed, noisy and duplicated.

Real image-text pools are far from the balanced sets models are evaluated on: a few
concepts dominate, many captions do not describe their image, and popular images appear
again and again. This pool reproduces the three on the procedural world (``world.py``):

- skew: the first object's concept ``(colour, shape)`` is drawn with weight
  ``dominant_weight`` for the ``dominant`` concepts and 1 for the other 21 (with the
  defaults, 3 concepts hold 85% of the new images and each rare one under 1%);
- noise: a share ``noise`` of the captions is replaced by the caption of another,
  unrelated image (drawn from the same skewed distribution, as web noise is);
- duplicates: a share ``duplicates`` of the pool are re-encoded copies (JPEG quality
  60-95) of ``popular_images`` popular images, which come from the dominant concepts.

Every sample's ``key.json`` records the truth (concept, whether the caption is
mismatched, which popular image it copies), so the demo can show what curation kept.
Shards are written atomically in the img2dataset layout and reused when present (all are
rewritten when the spec changed); the
balanced held-out set is ``world.write_split``'s one-object split with an image folder.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

from PIL import Image

from ..utils.fileio import add_tar_member, atomic_output, atomic_write_json
from ..data.world import COLORS, SHAPES, _encode, render_sample, write_split


@dataclass
class PoolSpec:
    """What the pool looks like.

    Args:
        num_samples: pool size.
        dominant: the concepts ("<colour> <shape>") that dominate.
        dominant_weight: sampling weight of a dominant concept (every other concept has 1).
        noise: share of mismatched captions.
        duplicates: share of samples that copy a popular image.
        popular_images: how many popular images the copies come from.
        num_eval: size of the balanced held-out set.
        image_size: pixels.
        max_objects: objects per image (1: the caption's concept is the image's only object).
        samples_per_shard: samples per tar shard.
        seed: everything is a pure function of it.
    """

    num_samples: int = 8192
    dominant: List[str] = field(default_factory=lambda: ["red circle", "blue square", "green triangle"])
    dominant_weight: float = 40.0
    noise: float = 0.1
    duplicates: float = 0.15
    popular_images: int = 48
    num_eval: int = 480
    image_size: int = 128
    max_objects: int = 1
    samples_per_shard: int = 512
    seed: int = 0


def concept_weights(spec: PoolSpec) -> Dict[str, float]:
    concepts = [f"{c} {s}" for c in COLORS for s in SHAPES]
    unknown = [d for d in spec.dominant if d not in concepts]
    if unknown:
        raise ValueError(f"dominant concept {unknown[0]!r} is not '<colour> <shape>' of the demo world")
    return {c: (spec.dominant_weight if c in spec.dominant else 1.0) for c in concepts}


def _draw_concept(rng: random.Random, weights: Dict[str, float]) -> tuple:
    name = rng.choices(list(weights), weights=list(weights.values()))[0]
    color, shape = name.split()
    return color, shape


def _concept_of(sample) -> str:
    return f"{sample.objects[0]['color']} {sample.objects[0]['shape']}"


def _reencode(jpg: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pool_spec_changed(root, spec: PoolSpec) -> bool:
    """True when ``root`` holds a pool written from another spec."""
    previous = Path(root) / "pool.json"
    return previous.is_file() and json.loads(previous.read_text()).get("spec") != asdict(spec)


def write_pool(root: str, spec: PoolSpec = PoolSpec()) -> Dict:
    """Write ``root/pool/*.tar`` (the pool), ``root/eval`` (balanced held-out set) and ``root/pool.json``
    (the spec and the pool's true composition). Existing shards are kept."""
    root = Path(root)
    weights = concept_weights(spec)
    if pool_spec_changed(root, spec):
        import shutil

        shutil.rmtree(root / "pool", ignore_errors=True)  # another spec: its shards must not be reused
        (root / "pool.json").unlink()
    rng = random.Random(spec.seed * 7_919 + 1)
    base = spec.seed * 10_000_019 + 5_000_000  # seeds apart from the ones of the demo's train / eval splits
    dominant = {c: w for c, w in weights.items() if c in spec.dominant} or weights
    popular = []
    for j in range(spec.popular_images):
        s = render_sample(base + 9_000_000 + j, spec.image_size, spec.max_objects, _draw_concept(rng, dominant))
        popular.append((s, _encode(s.image, "JPEG")))
    # the whole plan first, so a shard's contents do not depend on which shards already exist
    plan = []
    for i in range(spec.num_samples):
        if popular and rng.random() < spec.duplicates:
            plan.append(("copy", rng.randrange(len(popular)), rng.randint(60, 95), None))
        else:
            noisy = rng.random() < spec.noise
            plan.append(("new", _draw_concept(rng, weights), None, _draw_concept(rng, weights) if noisy else None))
    truth = {"concepts": {}, "noisy": 0, "copies": 0}
    for kind, what, _, donor in plan:
        concept = " ".join(what) if kind == "new" else _concept_of(popular[what][0])
        truth["concepts"][concept] = truth["concepts"].get(concept, 0) + 1
        truth["noisy"] += int(donor is not None)
        truth["copies"] += int(kind == "copy")
    for shard, start in enumerate(range(0, spec.num_samples, spec.samples_per_shard)):
        path = root / "pool" / f"{shard:06d}.tar"
        if path.is_file():
            continue  # finished shards are kept when a generation is rerun
        with atomic_output(path) as tmp, tarfile.open(tmp, "w") as tar:
            for i in range(start, min(spec.num_samples, start + spec.samples_per_shard)):
                kind, what, quality, donor = plan[i]
                if kind == "copy":
                    sample, jpg = popular[what]
                    jpg, caption = _reencode(jpg, quality), sample.caption
                else:
                    sample = render_sample(base + i, spec.image_size, spec.max_objects, what)
                    jpg, caption = _encode(sample.image, "JPEG"), sample.caption
                    if donor is not None:  # the caption of an unrelated image
                        caption = render_sample(base + 7_000_000 + i, spec.image_size, spec.max_objects, donor).caption
                meta = {"caption": caption, "concept": _concept_of(sample), "noisy": donor is not None,
                        "copy_of": f"popular{what:03d}" if kind == "copy" else None, "objects": sample.objects}
                key = f"{shard:06d}{i:07d}"
                add_tar_member(tar, f"{key}.jpg", jpg)
                add_tar_member(tar, f"{key}.txt", caption.encode())
                add_tar_member(tar, f"{key}.json", json.dumps(meta).encode())
    write_split(root / "eval", spec.num_eval, spec.seed * 2 + 1, spec.image_size, spec.samples_per_shard, 1,
                image_folder=True)
    info = {"spec": asdict(spec), "truth": truth}
    atomic_write_json(root / "pool.json", info)
    return info
