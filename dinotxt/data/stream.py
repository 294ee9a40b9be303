"""A deterministic, resumable stream of (image, caption) training pairs.

Every (rank, dataloader worker) reads its own disjoint part of the data: whole shards are
split across all ``world_size * num_workers`` readers, and the shards left over when their
number is not a multiple of the readers (all of them, with fewer shards than readers)
are scanned by every reader, each keeping every n-th sample, so ranks stay balanced.
Each pass over the data ("epoch") reshuffles the shard order with ``seed + epoch`` and
mixes samples in a seeded shuffle buffer holding *undecoded* bytes, so the stream is a
pure function of the seed. Decoding happens after the buffer; a sample that fails to
decode (corrupt image, missing or empty caption) is skipped and counted by reason.

Each yielded sample carries ``(reader id, position)``: the number of raw samples that
reader has taken from its buffer. Resuming with those positions replays the stream up
to them without decoding images, which continues the data exactly where it stopped.
Every random draw made for a sample (its crop, flip and caption) comes from a seed that
is a pure function of ``(seed, reader, position)``, never from a running generator, so a
resumed stream yields the very same tensors as an uninterrupted one.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .holdout import in_holdout
from .sources import iter_tar_samples

log = logging.getLogger(__name__)

# why a sample is skipped and counted, everywhere a source is read (training, the cache, curation, embed)
SKIP_REASONS = ("bad_image", "no_image", "missing_file", "no_caption", "corrupt_shard")
_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of integers (splitmix64 finaliser per part).

    Neighbouring inputs (position 41 vs 42) give unrelated seeds, so every sample draws
    independent augmentations, and the result never depends on Python's hash salt.
    """
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h ^ (int(part) & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def seeded_transform(transform: Callable, image, seed: int):
    """Apply a torchvision-style random transform with its draws taken from ``seed``
    (the global torch RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def decode_image(data: bytes):
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()  # force full decode so truncated files fail here, not in the transform
    return img.convert("RGB")


def raw_caption(sample: Dict, caption_key: str = "txt", json_field: str = "caption"):
    """The caption field of a raw sample as stored (``key.txt``, else ``key.json[json_field]``):
    a string (possibly several lines), a list of strings, or None."""
    if "__caption__" in sample:
        caption = sample["__caption__"]
    elif caption_key in sample:
        caption = sample[caption_key].decode("utf-8", errors="replace")
    elif "json" in sample:
        try:
            caption = json.loads(sample["json"]).get(json_field)
        except (ValueError, AttributeError):
            caption = None
    else:
        caption = None
    return caption


def extract_caption(sample: Dict, caption_key: str = "txt", json_field: str = "caption",
                    rng: Optional[random.Random] = None) -> Optional[str]:
    """The caption of a raw sample (``key.txt``, else ``key.json[json_field]``), or None if
    missing or empty. Several captions (a JSON list, or lines of text) give one at random."""
    rng = rng or random.Random(0)
    caption = raw_caption(sample, caption_key, json_field)
    if isinstance(caption, (list, tuple)):
        caption = rng.choice(caption) if caption else None
    if isinstance(caption, str) and "\n" in caption.strip():
        caption = rng.choice([c for c in caption.strip().splitlines() if c.strip()])
    return caption.strip() if isinstance(caption, str) and caption.strip() else None


class ImageTextStream(IterableDataset):
    """Infinite stream of ``{"image", "text", "reader", "position", "skipped"}`` dicts.

    Args:
        shards: tar shard paths (img2dataset layout), or None with ``manifest``.
        manifest: list of (image_path, caption) rows instead of shards.
        transform: image transform (PIL -> tensor).
        tokenizer: callable mapping a list of captions to (B, L) ids.
        image_keys: extensions tried for the image, in order.
        caption_key: extension of the caption member (``txt``).
        caption_json_field: caption field inside ``key.json`` when there is no txt.
        seed: base seed; the stream is a pure function of it.
        shuffle_buffer: samples held for mixing (0 disables shuffling within shards).
        rank, world_size: distributed position (defaults: torch.distributed, else 0/1).
        start_positions: reader id -> raw samples already consumed (resume).
        reader_offset: dataloader worker ``w`` plays reader ``(w + reader_offset) % workers``.
            A DataLoader takes batches from its workers in turn starting at worker 0, so a
            resumed run passes the number of batches already consumed here to make the
            reader that was next before the interruption deliver the first batch again.
    """

    def __init__(self, shards: Optional[Sequence[str]] = None, manifest: Optional[List[Tuple[str, str]]] = None,
                 transform: Callable = None, tokenizer: Callable = None,
                 image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"), caption_key: str = "txt",
                 caption_json_field: str = "caption", seed: int = 0, shuffle_buffer: int = 2000,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 start_positions: Optional[Dict[int, int]] = None, reader_offset: int = 0,
                 holdout: float = 0.0, shuffle: bool = True):
        super().__init__()
        if (shards is None) == (manifest is None):
            raise ValueError("give exactly one of shards or manifest")
        self.shards = list(shards) if shards is not None else None
        self.manifest = manifest
        self.transform = transform
        self.tokenizer = tokenizer
        self.image_keys = [k.lower() for k in image_keys]
        self.caption_key = caption_key
        self.caption_json_field = caption_json_field
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.start_positions = dict(start_positions or {})
        self.reader_offset = int(reader_offset)
        self.holdout = float(holdout)  # the fraction of pairs held out for validation (dinotxt.data.holdout)
        self.shuffle = bool(shuffle)  # False: stored order, no shuffle buffer (data.order=sequential)
        if not self.shuffle:
            self.shuffle_buffer = 0

    # ------------------------------------------------------------------ layout
    def _reader(self) -> Tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            import torch.distributed as dist

            ok = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ok else (0, 1)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return rank * nw + (wid + self.reader_offset) % nw, world * nw

    def _iter_shard(self, shard: str, errors: Counter) -> Iterator[Dict]:
        """Raw samples of one shard, in stored order (subclasses read other shard formats)."""
        return iter_tar_samples(shard, errors)

    def _raw_epoch(self, epoch: int, reader: int, readers: int, errors: Counter) -> Iterator[Dict]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.manifest is not None:
            order = list(range(len(self.manifest)))
            if self.shuffle:
                rng.shuffle(order)
            for i in order[reader::readers]:
                path, caption = self.manifest[i]
                yield {"__key__": path, "__path__": path, "__caption__": caption}
            return
        order = list(self.shards)
        if self.shuffle:
            rng.shuffle(order)
        whole = len(order) // readers * readers
        for shard in order[:whole][reader::readers]:
            yield from self._iter_shard(shard, errors)
        # the remaining shards (fewer than readers): every reader scans them and keeps every
        # n-th sample, so all readers get (nearly) the same number of samples per pass
        n = 0
        for shard in order[whole:]:
            for sample in self._iter_shard(shard, errors):
                if n % readers == reader:
                    yield sample
                n += 1

    def raw_stream(self, reader: int, readers: int, errors: Counter) -> Iterator[Dict]:
        """Undecoded samples of this reader, shuffled, epoch after epoch, forever."""
        epoch = 0
        while True:
            rng = random.Random((self.seed * 7919 + reader) * 104729 + epoch)
            buffer: List[Dict] = []
            produced = 0
            for sample in self._raw_epoch(epoch, reader, readers, errors):
                produced += 1
                if self.shuffle_buffer <= 1:
                    yield sample
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(sample)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], sample = sample, buffer[j]
                yield sample
            rng.shuffle(buffer)
            yield from buffer
            if produced == 0:
                raise RuntimeError(f"reader {reader}/{readers} got no samples from the data; check data.train")
            epoch += 1

    def held_out(self, limit: Optional[int] = None) -> List[Dict]:
        """The decoded held-out pairs of the whole source, in a fixed order (one pass, one reader; the
        stream's transform, so give it the evaluation transform): the validation split."""
        out: List[Dict] = []
        errors: Counter = Counter()
        for i, sample in enumerate(self._raw_epoch(0, 0, 1, errors)):
            if not in_holdout(str(sample.get("__key__")), self.seed, self.holdout):
                continue
            decoded, _ = self.decode(sample, mix_seed(self.seed, 1_000_003, i))
            if decoded is not None:
                out.append(decoded)
            if limit is not None and len(out) >= limit:
                break
        return out

    # ------------------------------------------------------------------ decoding
    def decode(self, sample: Dict, seed: int) -> Tuple[Optional[Dict], Optional[str]]:
        """(decoded sample, None) or (None, skip reason); every random draw comes from ``seed``."""
        caption = extract_caption(sample, self.caption_key, self.caption_json_field, random.Random(seed))
        if caption is None:
            return None, "no_caption"
        if "__path__" in sample and not os.path.isfile(sample["__path__"]):
            return None, "missing_file"  # a manifest row whose image is not there
        try:
            image = sample_image(sample, self.image_keys)
        except Exception:  # PIL raises many types for broken files; all mean "skip it"
            return None, "bad_image"
        if image is None:
            return None, "no_image"
        out = {"image": seeded_transform(self.transform, image, seed) if self.transform else image, "caption": caption,
               "key": sample.get("__key__")}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer([caption])[0]
        return out, None

    def __iter__(self):
        reader, readers = self._reader()
        errors: Counter = Counter()
        start = int(self.start_positions.get(reader, 0))
        position = 0
        reported: Counter = Counter()
        for sample in self.raw_stream(reader, readers, errors):
            position += 1
            if position <= start:
                continue
            if self.holdout and in_holdout(str(sample.get("__key__")), self.seed, self.holdout):
                continue  # a validation pair: never trained on
            decoded, reason = self.decode(sample, mix_seed(self.seed, reader, position))
            if decoded is None:
                errors[reason] += 1
                if errors[reason] <= 3:  # the first few by name; the run's count is the one the datamodule keeps
                    key = sample.get("__key__") or sample.get("__path__")
                    more = f" (further {reason} samples of reader {reader} are counted, not named)" \
                        if errors[reason] == 3 else ""
                    log.warning(f"skipping sample {key!r}: {reason}{more}")
                continue
            delta = {k: errors[k] - reported[k] for k in SKIP_REASONS}
            reported.update(delta)
            decoded.update(reader=reader, position=position, skipped=delta)
            yield decoded


def sample_image(sample: Dict, image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp")):
    """Decoded RGB image of a raw sample (a shard member or a manifest path), or None if it has none."""
    if "__path__" in sample:
        with open(sample["__path__"], "rb") as f:
            return decode_image(f.read())
    for key in image_keys:
        if key in sample:
            return decode_image(sample[key])
    return None


def collate_image_text(samples: List[Dict]) -> Dict:
    """Stack a list of stream samples (images, or cached ``tokens`` / ``pooled``, and token ids); skip
    counts are summed, reader positions kept as the max."""
    batch = {
        "caption": [s["caption"] for s in samples],
        "skipped": {k: sum(s["skipped"].get(k, 0) for s in samples) for k in SKIP_REASONS},
        "positions": {},
    }
    for field in ("image", "tokens", "pooled", "text"):
        if field in samples[0]:
            batch[field] = torch.stack([s[field] for s in samples])
    for s in samples:
        batch["positions"][s["reader"]] = max(batch["positions"].get(s["reader"], 0), s["position"])
    return batch
