"""LightningDataModule over webdataset shards (img2dataset layout), a manifest, or the
feature cache (``cache.path``: frozen tokens instead of images).

It owns the stream positions of every reader (gathered from all ranks), the number of
batches consumed and the samples skipped, and saves them in Lightning checkpoints
(``state_dict``), so ``--resume`` continues the data exactly where the run stopped. The
``StreamProgress`` callback records every consumed batch into it, so the training system
never has to know where its batches come from.

With ``data.global_batch`` the loader still yields micro-batches of ``data.batch_size`` (only
those are prefetched by the workers), and ``StepBatches`` groups the K of one optimizer step
into one training batch, so every Lightning batch ends at a step boundary: positions and
checkpoints never fall inside an accumulation cycle.
"""
from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from typing import Dict, Iterator, List, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..data.folder import ImageFolderDataset
from ..data.holdout import AUTO_MAX_PAIRS, estimate_pairs, holdout_fraction
from ..data.sources import expand_shards, is_manifest, read_manifest
from ..data.stream import ImageTextStream, collate_image_text
from ..models.transforms import eval_transform, model_eval_transform, train_transform
from .gradcache import merge_micro_batches, micro_batches_per_step

log = logging.getLogger(__name__)


def _worth_saying(before: int, total: int) -> bool:
    """Say the running count at 1-10, then each time it passes a power of ten times 1, 2 or 5."""
    if total <= 10:
        return True
    marks = [m * 10 ** e for e in range(1, 12) for m in (1, 2, 5)]
    return any(before < mark <= total for mark in marks)


class ImageTextDataModule(L.LightningDataModule):
    """Args:
        cfg: the resolved training config (``data``, ``cache``, ``seed`` are used).
        tokenizer: maps captions to token ids.
        val_dir: zero-shot validation image folder (optional).
    """

    def __init__(self, cfg: DictConfig, tokenizer, val_dir: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.val_dir = val_dir
        self.positions: Dict[int, int] = {}
        self.batches = 0  # training batches consumed on this rank
        self.skipped: Counter = Counter()  # samples skipped on this rank, by reason
        d = cfg.data
        self.cache = None
        self.shards, self.manifest = None, None
        # resolve sources now so a missing shard, manifest or cache stops the run before training starts
        if cfg.cache.path:
            from ..data.feature_cache import FeatureCache

            self.cache = FeatureCache(cfg.cache.path)
        elif is_manifest(d.train):
            self.manifest = read_manifest(d.train, d.manifest_image_column, d.manifest_caption_column)
        else:
            self.shards = expand_shards(d.train)
        pairs = self._pair_count() if d.holdout == "auto" else None  # only auto depends on the size
        self.holdout = holdout_fraction(d.holdout, pairs)  # the share of pairs kept for validation

    def _pair_count(self) -> Optional[int]:
        """The training pairs, as far as ``data.holdout=auto`` needs them: a cache's shard counts are read only
        until they pass ``AUTO_MAX_PAIRS`` (a large cache is not read at start-up); shards are estimated."""
        if self.cache is not None:
            total = 0
            for name in self.cache.names:
                total += int(self.cache.index(name)["count"])
                if total > AUTO_MAX_PAIRS:
                    break
            return total
        if self.manifest is not None:
            return len(self.manifest)
        return estimate_pairs(self.shards)

    def record(self, batch: Dict) -> None:
        """A consumed training batch: its readers' positions and its skip counts."""
        for reader, pos in batch["positions"].items():
            self.positions[int(reader)] = max(self.positions.get(int(reader), 0), int(pos))
        new = {k: v for k, v in batch["skipped"].items() if v}
        before = sum(self.skipped.values())
        self.skipped.update(new)
        total = sum(self.skipped.values())
        if new and _worth_saying(before, total):  # the count metrics.json ends with, as it grows
            counts = ", ".join(f"{k} {v:,}" for k, v in sorted(self.skipped.items()))
            log.warning(f"skipped {total:,} samples so far on this rank ({counts})")
        self.batches += int(batch.get("loader_batches", 1))  # loader batches: the readers take turns per batch

    def train_dataloader(self):
        d = self.cfg.data
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        common = dict(tokenizer=self.tokenizer, seed=self.cfg.seed, shuffle_buffer=d.shuffle_buffer, rank=rank,
                      world_size=world, start_positions=self.positions,
                      reader_offset=self.batches % max(1, d.num_workers), holdout=self.holdout,
                      shuffle=d.order == "shuffled")
        if self.cache is not None:
            from ..data.feature_cache import CachedFeatureStream

            dataset = CachedFeatureStream(self.cache, **common)
        else:
            dataset = ImageTextStream(
                shards=self.shards, manifest=self.manifest,
                transform=train_transform(self.cfg.model.backbone.img_size, d.crop_scale, d.hflip),
                image_keys=list(d.image_keys), caption_key=d.caption_key, caption_json_field=d.caption_json_field,
                **common,
            )
        loader = DataLoader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate_image_text,
                            persistent_workers=False, pin_memory=torch.cuda.is_available(),
                            prefetch_factor=2 if d.num_workers > 0 else None)
        if not d.global_batch:
            return loader
        return StepBatches(loader, micro_batches_per_step(d.global_batch, d.batch_size, world))

    def held_out_pairs(self) -> List[Dict]:
        """The validation split (``data.holdout``): its pairs decoded with the evaluation transform (or read from
        the feature cache) and tokenized; empty when nothing is held out."""
        if not self.holdout:
            return []
        d = self.cfg.data
        common = dict(tokenizer=self.tokenizer, seed=self.cfg.seed, shuffle_buffer=0, rank=0, world_size=1,
                      holdout=self.holdout)
        if self.cache is not None:
            from ..data.feature_cache import CachedFeatureStream

            return CachedFeatureStream(self.cache, **common).held_out()
        return ImageTextStream(shards=self.shards, manifest=self.manifest,
                               transform=eval_transform(self.cfg.model.backbone.img_size),
                               image_keys=list(d.image_keys), caption_key=d.caption_key,
                               caption_json_field=d.caption_json_field, **common).held_out()

    def val_dataloader(self) -> List[DataLoader]:
        if not self.val_dir:
            return []
        ds = ImageFolderDataset(self.val_dir, model_eval_transform(self.cfg.model))
        return DataLoader(ds, batch_size=self.cfg.eval.batch_size, num_workers=min(2, self.cfg.data.num_workers))

    def state_dict(self) -> Dict:
        positions = dict(self.positions)
        # Lightning writes rank 0's copy only: merge every rank's readers into it
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: List[Dict[int, int]] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, positions)
            for part in parts:
                for reader, pos in part.items():
                    positions[reader] = max(positions.get(reader, 0), pos)
        return {"positions": positions, "batches": self.batches, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: Dict) -> None:
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        self.batches = int(state.get("batches", 0))
        self.skipped = Counter(state.get("skipped", {}))


class StepBatches:
    """The micro-batches of a loader grouped K at a time: one optimizer step's training batch
    (``gradcache.merge_micro_batches``).

    Args:
        loader: yields micro-batches (an endless stream).
        micro_batches: K, the micro-batches of one step on this device.
    """

    def __init__(self, loader: DataLoader, micro_batches: int):
        self.loader, self.micro_batches = loader, micro_batches

    def __iter__(self) -> Iterator[Dict]:
        it = iter(self.loader)
        while True:
            group = list(islice(it, self.micro_batches))
            if len(group) < self.micro_batches:
                return
            yield merge_micro_batches(group)


def batch_samples(batch: Dict) -> int:
    """Training pairs in a batch (one loader batch, or the micro-batches of a step)."""
    if "micro_batches" in batch:
        return sum(mb["text"].shape[0] for mb in batch["micro_batches"])
    return batch["text"].shape[0]


class StreamProgress(Callback):
    """Records every consumed batch into the datamodule (positions for exact resume, skip counts for
    the logs and metrics.json). Put it before any callback that saves checkpoints.

    Args:
        datamodule: the run's ``ImageTextDataModule``.
    """

    def __init__(self, datamodule: ImageTextDataModule):
        self.datamodule = datamodule

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.datamodule.record(batch)
        pl_module.log("train/skipped", float(sum(self.datamodule.skipped.values())), batch_size=batch_samples(batch))
