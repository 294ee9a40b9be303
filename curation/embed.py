"""Embed stage: image embeddings from the frozen backbone, caption embeddings from a text encoder.

Image embedding (dino.txt's curation works on the frozen DINOv2 features): the backbone's
last-layer tokens after its final norm, ``[CLS] ‖ mean(patches)`` (registers dropped),
L2-normalised over the whole vector, stored as float16. Images get the evaluation
transform (resize + center crop at the backbone's resolution, ImageNet normalisation).

Layout, one file per pool unit (shard, or slice of manifest rows)::

    embed/image/000000.npy      (n, 2D) float16
    embed/meta/000000.json      samples skipped in that unit, by reason
    embed/meta/000000.parquet   uid, key, caption, source, unit   <- written LAST: the unit's done marker
    embed_text/idf.npy          hashed TF-IDF weights fitted on the pool's captions
    embed_text/000000.npy       (n, text_dim) float16

The image pass runs in Lightning's predict loop: on several GPUs (``embed.devices``) each
rank takes its own units and writes their files, so nothing is gathered; on CPU it is the
same loop with one device. A rerun embeds only the units without a ``.parquet``.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import IterableDataset, get_worker_info

from dinotxt.config import model_config
from dinotxt.data.stream import decode_image
from dinotxt.fileio import atomic_write_json
from dinotxt.models.backbone import FrozenBackbone
from dinotxt.models.factory import create_backbone

from .pool import PoolUnit, iter_unit
from .store import load_table, save_npy, save_table, shard_paths
from .text_encoders import HashedTfidfEncoder, encode_checked, load_text_encoder

SKIP_REASONS = ("no_caption", "no_image", "bad_image", "corrupt_shard")


def backbone_config(embed_cfg):
    """BackboneConfig of registry entry ``embed.model`` with the ``embed.backbone`` overrides."""
    overrides = {k: v for k, v in OmegaConf.to_container(embed_cfg.backbone).items() if v is not None}
    return model_config(embed_cfg.model, {"backbone": overrides} if overrides else None).backbone


def pooled_embedding(backbone: FrozenBackbone, images: torch.Tensor) -> torch.Tensor:
    """``normalize([CLS] ‖ mean(patches))`` in float32, shape (B, 2D)."""
    cls, _, patches = backbone.split_tokens(backbone(images))
    return F.normalize(torch.cat([cls, patches.mean(1)], dim=-1).float(), dim=-1)


class UnitBatches(IterableDataset):
    """Batches of decoded images, never mixing two units; the last batch of a unit is flagged
    (and may be empty) so the writer knows when a unit is complete.

    Args:
        units: the units still to embed.
        pool_cfg: the recipe's ``pool`` section (caption / image keys).
        transform: PIL image -> tensor.
        batch_size: images per batch.
        rank, world_size: this process's share of the units (with dataloader workers splitting it further).
    """

    def __init__(self, units: List[PoolUnit], pool_cfg, transform, batch_size: int, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.units, self.pool_cfg, self.transform = units, pool_cfg, transform
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[self.rank * workers + wid::self.world_size * workers]:
            yield from self._unit_batches(unit)

    def _unit_batches(self, unit: PoolUnit):
        errors: Dict[str, int] = {}
        skipped: Counter = Counter()
        rows: List = []
        for sample in iter_unit(unit, self.pool_cfg, errors):
            if sample.caption is None:
                skipped["no_caption"] += 1
                continue
            if sample.image is None:
                skipped["no_image"] += 1
                continue
            try:
                image = self.transform(decode_image(sample.image))
            except Exception:  # PIL raises many types for broken files; all mean "skip it"
                skipped["bad_image"] += 1
                continue
            rows.append((sample.uid, sample.key, sample.caption, image, sample.raw.get("__path__", unit.path)))
            if len(rows) == self.batch_size:
                yield self._batch(unit, rows, last=False, skipped={})
                rows = []
        skipped.update(errors)
        yield self._batch(unit, rows, last=True, skipped=dict(skipped))

    def _batch(self, unit: PoolUnit, rows: List, last: bool, skipped: Dict[str, int]) -> Dict:
        return {
            "unit": unit.index,
            "uid": torch.tensor([r[0] for r in rows], dtype=torch.int64),
            "key": [r[1] for r in rows],
            "caption": [r[2] for r in rows],
            "source": [r[4] for r in rows],
            "images": torch.stack([r[3] for r in rows]) if rows else torch.zeros(0),
            "last": last,
            "skipped": skipped,
        }


def write_unit(out_dir: Path, unit: int, embeddings: np.ndarray, rows: Dict[str, list], skipped: Dict[str, int]) -> None:
    """The unit's embeddings, its skip counts, then its metadata table (uid, key, caption, source: the done marker)."""
    name = f"{unit:06d}"
    save_npy(out_dir / "image" / f"{name}.npy", embeddings.astype(np.float16))
    atomic_write_json(out_dir / "meta" / f"{name}.json", {"skipped": skipped, "rows": int(len(rows["uid"]))})
    save_table(out_dir / "meta" / f"{name}.parquet", {
        "uid": np.asarray(rows["uid"], dtype=np.int64), "key": rows["key"], "caption": rows["caption"],
        "source": rows["source"], "unit": np.full(len(rows["uid"]), unit, dtype=np.int32)})


def pending_units(out_dir: Path, units: List[PoolUnit]) -> List[PoolUnit]:
    return [u for u in units if not (out_dir / "meta" / f"{u.index:06d}.parquet").is_file()]


def _lightning_embedder(backbone: FrozenBackbone, out_dir: Path):
    """A LightningModule running the backbone and a writer callback that flushes complete units."""
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter

    class ImageEmbedder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = backbone

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return pooled_embedding(self.backbone, images)

        def predict_step(self, batch: Dict, batch_idx: int) -> Dict:
            images = batch["images"]
            emb = self(images) if images.ndim == 4 else torch.zeros(0, 2 * self.backbone.embed_dim)
            return {**{k: v for k, v in batch.items() if k != "images"}, "embeddings": emb.float().cpu().numpy()}

    class UnitWriter(BasePredictionWriter):
        def __init__(self):
            super().__init__(write_interval="batch")
            self.buffers: Dict[int, Dict[str, list]] = {}

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                               dataloader_idx=0):
            buf = self.buffers.setdefault(prediction["unit"], {"emb": [], "uid": [], "key": [], "caption": [],
                                                               "source": []})
            buf["emb"].append(prediction["embeddings"])
            buf["uid"] += prediction["uid"].cpu().tolist()
            for column in ("key", "caption", "source"):
                buf[column] += prediction[column]
            if prediction["last"]:
                buf = self.buffers.pop(prediction["unit"])
                write_unit(out_dir, prediction["unit"], np.concatenate(buf.pop("emb")), buf, prediction["skipped"])

    return ImageEmbedder(), UnitWriter()


def embed_images(cfg, units: List[PoolUnit], out_dir: Path, trust_code: bool = False) -> bool:
    """Embed every unit without a finished metadata table. Returns False on a non-zero rank of a multi-GPU
    run (that process's share is written and it has nothing else to do)."""
    import lightning as L

    from dinotxt.transforms import eval_transform

    todo = pending_units(out_dir, units)
    if not todo:
        return True
    e = cfg.embed
    bcfg = backbone_config(e)
    backbone = create_backbone(bcfg, trust_code=trust_code)  # seeded like create_model: curation and training see one encoder
    transform = eval_transform(bcfg.img_size)
    precision = e.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and e.accelerator in ("auto", "gpu", "cuda") else "32-true"
    module, writer = _lightning_embedder(backbone, out_dir)
    trainer = L.Trainer(accelerator=e.accelerator, devices=e.devices, precision=precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[writer], default_root_dir=str(out_dir))
    print(f"[curate] embed: {len(todo)} of {len(units)} units to embed on {trainer.world_size} "
          f"{trainer.accelerator.__class__.__name__.replace('Accelerator', '')} device(s)", flush=True)
    data = UnitBatches(todo, cfg.pool, transform, e.batch_size, trainer.global_rank, trainer.world_size)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=e.num_workers,
                                         pin_memory=torch.cuda.is_available())
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()  # every rank's units are on disk before rank 0 reads them all
    return trainer.is_global_zero


def embed_texts(cfg, units: List[PoolUnit], embed_dir: Path, text_dir: Path, trust_code: bool = False) -> Dict:
    """Caption embeddings per unit from the captions in the metadata tables (no image is read again)."""
    e = cfg.embed
    meta = [embed_dir / "meta" / f"{u.index:06d}.parquet" for u in units]
    encoder = load_text_encoder(e.text_encoder, e.text_dim, e.text_ngrams, e.text_kwargs, trust_code)
    if isinstance(encoder, HashedTfidfEncoder):
        idf_path = text_dir / "idf.npy"
        if idf_path.is_file():
            encoder.idf = np.load(idf_path)
        else:  # IDF over the whole pool first, so every unit is encoded with the same weights
            encoder.fit(c for path in meta for c in load_table(path, ["caption"])["caption"])
            save_npy(idf_path, encoder.idf)
    width = encode_checked(encoder, ["a photo"], e.text_encoder).shape[1]  # every shard must have this width
    for path, out in zip(meta, shard_paths(text_dir, len(units))):
        if out.is_file():
            continue
        captions = load_table(path, ["caption"])["caption"]
        chunks = [encode_checked(encoder, captions[i:i + e.text_batch_size], e.text_encoder, width)
                  for i in range(0, len(captions), e.text_batch_size)]
        emb = np.concatenate(chunks) if chunks else np.zeros((0, width), np.float32)
        save_npy(out, emb.astype(np.float16))
    return {"encoder": e.text_encoder, "dim": int(width)}


def load_pool_index(embed_dir: Path, units: List[PoolUnit]) -> Dict:
    """The embedded pool as one table in pool order (row i = row i of the concatenated embedding shards):
    ``uid``, ``unit`` (arrays), ``key``, ``caption``, ``source`` (lists). Sample ids must be unique."""
    columns: Dict[str, list] = {"uid": [], "unit": [], "key": [], "caption": [], "source": []}
    for u in units:
        table = load_table(embed_dir / "meta" / f"{u.index:06d}.parquet")
        for name in columns:
            columns[name].append(table[name])
    pool = {name: np.concatenate(parts) if name in ("uid", "unit") else [x for p in parts for x in p]
            for name, parts in columns.items()}
    pool["uid"] = pool["uid"].astype(np.int64)
    pool["unit"] = pool["unit"].astype(np.int64)
    values, counts = np.unique(pool["uid"], return_counts=True)
    if (counts > 1).any():
        dup = int(values[counts > 1][0])
        where = [f"{pool['source'][i]}:{pool['key'][i]}" for i in np.flatnonzero(pool["uid"] == dup)[:2]]
        raise ValueError(f"two samples share the id {dup} ({' and '.join(where)}); give every sample of a shard a "
                         "unique key and every shard a unique file name")
    return pool


def read_skipped(embed_dir: Path, units: List[PoolUnit]) -> Dict[str, int]:
    total: Counter = Counter()
    for u in units:
        total.update(json.loads((embed_dir / "meta" / f"{u.index:06d}.json").read_text())["skipped"])
    return {k: int(total.get(k, 0)) for k in SKIP_REASONS}
