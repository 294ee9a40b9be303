"""LightningDataModule over webdataset shards (img2dataset layout) or a manifest.

It owns the stream positions of every reader and saves them in Lightning checkpoints
(``state_dict``), so ``--resume`` continues the data where the run stopped.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..data.folder import ImageFolderDataset
from ..data.sources import expand_shards, is_manifest, read_manifest
from ..data.stream import ImageTextStream, collate_image_text
from ..transforms import eval_transform, train_transform


class ImageTextDataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, tokenizer, val_dir: Optional[str] = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.val_dir = val_dir
        self.positions: Dict[int, int] = {}
        d = cfg.data
        # resolve sources now so a missing shard or manifest stops the run before training starts
        if is_manifest(d.train):
            self.shards, self.manifest = None, read_manifest(d.train, d.manifest_image_column, d.manifest_caption_column)
        else:
            self.shards, self.manifest = expand_shards(d.train), None

    def record_positions(self, positions: Dict[int, int]) -> None:
        for reader, pos in positions.items():
            self.positions[int(reader)] = max(self.positions.get(int(reader), 0), int(pos))

    def train_dataloader(self) -> DataLoader:
        d = self.cfg.data
        size = self.cfg.model.backbone.img_size
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        dataset = ImageTextStream(
            shards=self.shards, manifest=self.manifest,
            transform=train_transform(size, d.crop_scale, d.hflip), tokenizer=self.tokenizer,
            image_keys=list(d.image_keys), caption_key=d.caption_key, caption_json_field=d.caption_json_field,
            seed=self.cfg.seed, shuffle_buffer=d.shuffle_buffer, rank=rank, world_size=world,
            start_positions=self.positions,
        )
        return DataLoader(dataset, batch_size=d.batch_size, num_workers=d.num_workers, collate_fn=collate_image_text,
                          persistent_workers=False, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=2 if d.num_workers > 0 else None)

    def val_dataloader(self) -> List[DataLoader]:
        if not self.val_dir:
            return []
        ds = ImageFolderDataset(self.val_dir, eval_transform(self.cfg.model.backbone.img_size))
        return DataLoader(ds, batch_size=self.cfg.eval.batch_size, num_workers=min(2, self.cfg.data.num_workers))

    def state_dict(self) -> Dict:
        return {"positions": dict(self.positions)}

    def load_state_dict(self, state: Dict) -> None:
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
