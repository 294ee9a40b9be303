"""Feature cache: the frozen backbone's tokens, computed once, read at every training step.

LiT (Zhai et al., CVPR 2022) and dino.txt (Jose et al., "DINOv2 Meets Text", CVPR 2025)
never update the image encoder, so its output tokens are a pure function of the
(augmented) image and can be computed once; open_clip's long-standing request to train
on precomputed image features (its issue #99) is the same idea. This module is the reading
side and what a cache depends on; ``dinotxt cache RECIPE`` writes it through the feature
extraction stage (``dinotxt.features.build_cache``):

    <cache.path>/
      cache.json        what the tokens depend on (backbone, a hash of its weights, image size,
                        transform, views, token layout, storage dtype), the source data
                        and the shard list
      00000.bin         raw rows (n, K views, T tokens, D) in float16 / bfloat16, read
                        memory-mapped at training time
      00000.json        that shard's index: sample keys (ids) and their raw captions
      ...

One cache shard per source unit (a tar shard, or ``cache.samples_per_shard`` manifest rows),
in source order, so the cached stream splits across ranks and workers exactly as the image
stream does. A shard is complete iff its index exists. Views are seeded by ``(seed, sample
key, view)``, so a cached crop can be reproduced from the image alone. Training refuses a
cache built for another backbone, weights, image size, transform or data instead of
silently mixing features.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError
from ..models.vision_head import pooled_tokens_problem
from ..models.weights import resolve_weights
from ..models.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from .sources import expand_shards, is_manifest, is_pipe, is_url, shard_name, shard_sizes
from .stream import ImageTextStream, extract_caption, mix_seed, seeded_transform

FORMAT_VERSION = 1
META_NAME = "cache.json"
# storage dtype -> (torch dtype, numpy dtype of the raw bits; numpy has no bfloat16)
STORAGE = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16)}
# spec fields a training run may differ in: the views were already drawn, and the precision
# the tokens were computed in is below the storage precision
_TRAIN_MAY_DIFFER = ("view_seed", "backbone_autocast")


# --------------------------------------------------------------------------- what a cache depends on


def missing_shards(root: Path, meta: Dict[str, Any]) -> List[str]:
    """The shards a cache's metadata lists whose index is not written yet (an unfinished ``dinotxt cache``)."""
    return [s["name"] for s in meta.get("shards", []) if not (root / f"{s['name']}.json").is_file()]


def cache_complete(path) -> bool:
    """A feature cache folder whose metadata and every listed shard are written."""
    meta = Path(path) / META_NAME
    return meta.is_file() and not missing_shards(Path(path), json.loads(meta.read_text()))


def view_seed(seed: int, key: str, view: int) -> int:
    """Seed of view ``view`` of sample ``key``: independent of the order samples are read in."""
    digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return mix_seed(seed, digest, view)


def view_transform(cfg: DictConfig) -> Callable:
    """The transform whose random views the cache stores (the run's training crops by default)."""
    size = cfg.model.backbone.img_size
    return train_transform(size, cfg.data.crop_scale, cfg.data.hflip) if cfg.cache.augment else eval_transform(size)


def cache_views(image, key: str, transform: Callable, seed: int, views: int) -> torch.Tensor:
    """The ``views`` seeded crops of one image, (K, 3, H, W): what ``dinotxt cache`` feeds the backbone."""
    return torch.stack([seeded_transform(transform, image, view_seed(seed, key, v)) for v in range(views)])


def cache_spec(cfg: DictConfig) -> Dict[str, Any]:
    """Everything the cached tokens depend on, from a resolved training config."""
    b, c, d, h = cfg.model.backbone, cfg.cache, cfg.data, cfg.model.vision_head
    if c.views < 1:
        raise ConfigError(f"cache.views={c.views} must be at least 1")
    if not c.augment and c.views != 1:
        raise ConfigError("cache.augment=false stores the single eval crop; set cache.views=1")
    if c.tokens == "pooled":
        problem = pooled_tokens_problem(h.num_blocks, h.use_patch_tokens, h.final_norm, h.pooling,
                                        bool(h.linear_projection or h.embed_dim is not None))
        if problem:
            raise ConfigError(f"cache.tokens=pooled does not fit this model: {problem}; or use cache.tokens=all")
    weights = None
    if b.weights:
        path = resolve_weights(b.weights)
        if not path.is_file():
            raise FileNotFoundError(f"backbone weights not found: {path} (model.backbone.weights)")
        weights = {"file": path.name, "bytes": path.stat().st_size}
    size = int(b.img_size)
    norm = {"interpolation": "bicubic", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if c.augment:
        transform = {"kind": "random_resized_crop", "img_size": size, "crop_scale": [float(x) for x in d.crop_scale],
                     "hflip": float(d.hflip), **norm}
    else:
        transform = {"kind": "resize_center_crop", "img_size": size, "resize": int(round(size * 256 / 224)), **norm}
    return {
        "format": FORMAT_VERSION,
        "backbone": {"name": b.name, "weights": weights, "init_seed": None if b.weights else int(b.init_seed),
                     "kwargs": OmegaConf.to_container(b.kwargs, resolve=True), "img_size": size,
                     **({"patch_token_layer": int(b.patch_token_layer)} if b.get("patch_token_layer", 1) != 1 else {})},
        "transform": transform,
        "views": int(c.views),
        "view_seed": int(cfg.seed),
        "tokens": c.tokens,
        "pooling": {"kind": h.pooling, "gem_p": float(h.gem_p)} if c.tokens == "pooled" else None,
        "dtype": c.dtype,
        "backbone_autocast": cfg.trainer.backbone_autocast,
    }


def backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """A hash of the backbone's weights (names, shapes, dtypes and bytes of its state dict):
    identifies the actual weights, whatever file or seed they came from."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in backbone.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # flat first: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def source_fingerprint(cfg: DictConfig) -> Optional[Dict[str, Any]]:
    """What the cached tokens were computed from: each shard's file name, size and, for a local file, a hash of
    its first 4 KiB (the first member's tar header and bytes: two datasets whose shards have the same names
    and padded sizes still differ; a URL's too, ``pipe:`` shards have neither size nor head), or the
    manifest's name, size and head. Not paths: the same shards moved, or served over HTTP, still fit."""
    spec = cfg.data.train
    if spec is None:
        return None
    if is_manifest(spec):
        p = Path(spec)
        if not p.is_file():
            raise FileNotFoundError(f"manifest not found: {p}")
        return {"manifest": p.name, "bytes": p.stat().st_size, "head": _head_hash(p)}
    shards = expand_shards(spec)
    return {"shards": [{"file": shard_name(s), "bytes": size, **({} if is_pipe(s) else {"head": _head_hash(s)})}
                       for s, size in zip(shards, shard_sizes(shards))]}


def _head_hash(path, size: int = 4096) -> str:
    """A hash of a file's first ``size`` bytes: a local path, or a URL read with fsspec (one small read)."""
    if is_url(str(path)):
        from .sources import _filesystem

        fs, inner = _filesystem(str(path))
        with fs.open(inner, "rb") as f:
            head = f.read(size)
    else:
        with open(path, "rb") as f:
            head = f.read(size)
    return hashlib.sha256(head).hexdigest()[:16]


def source_difference(recorded: Any, wanted: Any) -> Optional[Tuple[str, Any, Any]]:
    """``spec_difference`` of two source fingerprints; a cache recorded before heads were hashed is compared
    on names and sizes."""
    def strip(source):
        if not isinstance(source, dict):
            return source
        out = {k: v for k, v in source.items() if k != "head"}
        if "shards" in out:
            out["shards"] = [{k: v for k, v in s.items() if k != "head"} for s in out["shards"]]
        return out

    if isinstance(recorded, dict) and "head" not in json.dumps(recorded):
        recorded, wanted = strip(recorded), strip(wanted)
    return spec_difference(recorded, wanted, "source.")


def spec_difference(recorded: Any, wanted: Any, prefix: str = "") -> Optional[Tuple[str, Any, Any]]:
    """First (field, recorded, wanted) where two JSON-like values differ."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        for k in list(recorded) + [k for k in wanted if k not in recorded]:
            found = spec_difference(recorded.get(k), wanted.get(k), f"{prefix}{k}.")
            if found:
                return found
        return None
    return None if recorded == wanted else (prefix.rstrip("."), recorded, wanted)


# --------------------------------------------------------------------------- reading


class FeatureCache:
    """Read access to a finished feature cache (index files and token arrays open lazily,
    per process, so a cache object can be handed to dataloader workers).

    Args:
        path: the cache folder written by ``dinotxt cache``.
    """

    def __init__(self, path):
        self.root = Path(path)
        meta_path = self.root / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"no feature cache at {self.root} ({META_NAME} is missing); "
                                    f"build it with `dinotxt cache RECIPE cache.path={self.root}`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{self.root} is a feature cache of format {self.meta.get('format')}; this dinotxt reads "
                             f"format {FORMAT_VERSION}: rebuild it with `dinotxt cache RECIPE`")
        self.spec = self.meta["spec"]
        self.names = [s["name"] for s in self.meta["shards"]]
        missing = missing_shards(self.root, self.meta)
        if missing:
            raise ValueError(f"feature cache {self.root} is incomplete ({len(missing)} of {len(self.names)} shards "
                             f"missing, e.g. {missing[0]}); finish it with `dinotxt cache RECIPE` (it resumes)")
        self.views = int(self.spec["views"])
        self.num_tokens, self.dim = (int(x) for x in self.meta["token_shape"])
        self.torch_dtype, self.np_dtype = STORAGE[self.spec["dtype"]]
        self._arrays: Dict[str, np.ndarray] = {}

    @property
    def pooled(self) -> bool:
        return self.spec["tokens"] == "pooled"

    def __getstate__(self):  # memory maps are reopened in each worker process, not pickled
        return {**self.__dict__, "_arrays": {}}

    def index(self, name: str) -> Dict[str, Any]:
        """The index of shard ``name``: ``keys``, ``captions`` (as stored), ``count``."""
        return json.loads((self.root / f"{name}.json").read_text())

    def array(self, name: str) -> np.ndarray:
        """Memory-mapped tokens of shard ``name``: (count, views, tokens, dim)."""
        if name not in self._arrays:
            count = int(self.index(name)["count"])
            path = self.root / f"{name}.bin"
            shape = (count, self.views, self.num_tokens, self.dim)
            expected = int(np.prod(shape)) * np.dtype(self.np_dtype).itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise ValueError(f"feature cache shard {path} is missing or has the wrong size; "
                                 "delete it and its .json, then rerun `dinotxt cache RECIPE`")
            self._arrays[name] = (np.memmap(path, dtype=self.np_dtype, mode="r", shape=shape) if count
                                  else np.zeros(shape, self.np_dtype))
        return self._arrays[name]

    def read(self, name: str, row: int, view: int = 0) -> torch.Tensor:
        """Tokens (T, D) of one view of one sample, in the storage dtype."""
        return torch.from_numpy(np.array(self.array(name)[row, view])).view(self.torch_dtype)

    def __len__(self) -> int:
        return sum(int(self.index(n)["count"]) for n in self.names)

    def lookup(self, key: str) -> Tuple[str, int]:
        """(shard name, row) of the sample with id ``key``."""
        for name in self.names:
            keys = self.index(name)["keys"]
            if key in keys:
                return name, keys.index(key)
        raise KeyError(f"sample {key!r} is not in the feature cache {self.root}")

    def check_fits(self, cfg: DictConfig, backbone: Optional[torch.nn.Module] = None) -> None:
        """Raise ConfigError if this cache was not built for the run ``cfg`` (and its live backbone); the message
        gives the exact ``cache.path=...`` of a cache that would fit."""
        fresh = f"cache.path={sibling_cache_path(self.root, cfg)} (built first, automatically), or delete {self.root}"
        found = spec_difference({k: v for k, v in self.spec.items() if k not in _TRAIN_MAY_DIFFER},
                                {k: v for k, v in cache_spec(cfg).items() if k not in _TRAIN_MAY_DIFFER})
        if found:
            field, recorded, wanted = found
            raise ConfigError(f"feature cache {self.root} was built with {field}={recorded!r} but this run has "
                              f"{wanted!r}: train with {fresh}")
        source = source_fingerprint(cfg)
        if source is not None and source_difference(self.meta["source"], source):
            raise ConfigError(f"feature cache {self.root} was built from other data ({self.meta.get('data')}) than "
                              f"data.train={cfg.data.train}: train with {fresh}; or data.train=null to train on the "
                              "cache alone")
        if backbone is not None and backbone_fingerprint(backbone) != self.meta["weights_hash"]:
            raise ConfigError(f"feature cache {self.root} was computed by a backbone with other weights than this "
                              f"run's (their hashes differ): train with {fresh}")


def sibling_cache_path(root: Path, cfg: DictConfig) -> str:
    """A cache folder next to ``root`` named by what the run's tokens depend on (spec and data), so a second
    dataset or backbone gets its own cache: ``<root>_<8 hex digits>``."""
    key = json.dumps({"spec": cache_spec(cfg), "source": source_fingerprint(cfg)}, sort_keys=True, default=str)
    return f"{root}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- training stream


class CachedFeatureStream(ImageTextStream):
    """``ImageTextStream`` over a feature cache: the same split of shards across ranks and
    workers, the same seeded shuffle and exact resume, but each sample yields one cached
    view's tokens (``tokens``, or ``pooled`` for a pooled cache) instead of a decoded image.

    Args:
        cache: a ``FeatureCache`` or its folder.
        tokenizer: callable mapping captions to (B, L) ids.
        seed, shuffle_buffer, rank, world_size, start_positions, reader_offset: as ``ImageTextStream``.
    """

    def __init__(self, cache, tokenizer: Callable = None, seed: int = 0, shuffle_buffer: int = 2000,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 start_positions: Optional[Dict[int, int]] = None, reader_offset: int = 0, holdout: float = 0.0,
                 shuffle: bool = True):
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        super().__init__(shards=self.cache.names, tokenizer=tokenizer, seed=seed, shuffle_buffer=shuffle_buffer,
                         rank=rank, world_size=world_size, start_positions=start_positions,
                         reader_offset=reader_offset, holdout=holdout, shuffle=shuffle)
        self.field = "pooled" if self.cache.pooled else "tokens"

    def _iter_shard(self, name: str, errors: Counter) -> Iterator[Dict]:
        index = self.cache.index(name)
        for row, (key, caption) in enumerate(zip(index["keys"], index["captions"])):
            yield {"__key__": key, "__caption__": caption, "__shard__": name, "__row__": row}

    def decode(self, sample: Dict, seed: int) -> Tuple[Optional[Dict], Optional[str]]:
        rng = random.Random(seed)
        caption = extract_caption(sample, rng=rng)
        if caption is None:
            return None, "no_caption"
        view = rng.randrange(self.cache.views)
        out = {self.field: self.cache.read(sample["__shard__"], sample["__row__"], view), "caption": caption,
               "key": sample["__key__"]}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer([caption])[0]
        return out, None
