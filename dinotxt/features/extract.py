"""One feature-extraction stage: run a frozen backbone over the units of a data source and write
one output per unit. The feature cache (``dinotxt cache``, ``dinotxt.features.build_cache``) and the
curation embeddings (``curation/embed_pool.py``) are two jobs of this one stage.

reader -> mapper -> writer, as img2dataset and clip-retrieval are built:

- reader: each process (rank) and each of its dataloader workers takes its own units
  (``units[rank * workers + worker :: world * workers]``), decodes their images, skips and
  counts what is broken (``no_caption``, ``no_image``, ``bad_image``, ``corrupt_shard``), and
  hands the job's views of every image to the model in batches that never mix two units;
- mapper: the job's ``encode`` on the device, inside Lightning's predict loop, so
  ``devices=8`` (or ``srun`` / ``torchrun``) spreads the units over GPUs and nothing is gathered;
- writer: when a unit's last batch arrives, the job writes that unit's outputs atomically.

Resume: a unit is done when the job says so (its last file exists); a rerun processes only the
units that are not. What the outputs depend on (backbone, weights, transform ...) is the job's
fingerprint, checked before anything runs (``cache.json`` for the cache, the curation stage
fingerprint for the embeddings), so a resumed stage never mixes two kinds of outputs.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Dict, List

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data.stream import SKIP_REASONS, decode_image
from ..data.units import DataUnit, UnitSample, iter_unit
from ..utils.log import quiet_lightning



class ExtractionJob:
    """What one consumer of the stage does; subclasses define the four steps.

    ``views(image, sample)`` -> (V, 3, H, W) crops of one decoded image (V may be 1);
    ``encode(backbone, images)`` -> one output row per crop, on the device;
    ``write(unit, samples, outputs, skipped)`` -> the unit's files, atomically (``outputs`` is the
    (n * V, ...) CPU tensor of the unit's crops in sample order);
    ``done(unit)`` -> whether the unit's files are complete;
    ``record(sample, unit)`` -> what the writer keeps of a sample (in the reader process: the
    image bytes never travel to the writer).
    """

    def record(self, sample: UnitSample, unit: DataUnit) -> Dict[str, Any]:
        return {"uid": sample.uid, "key": sample.key, "caption": sample.caption,
                "source": sample.raw.get("__path__", unit.path)}

    def views(self, image, sample: UnitSample) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, backbone, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def write(self, unit: DataUnit, samples: List[Dict[str, Any]], outputs: torch.Tensor, skipped: Dict[str, int]) -> None:
        raise NotImplementedError

    def done(self, unit: DataUnit) -> bool:
        raise NotImplementedError


class UnitBatches(IterableDataset):
    """Batches of decoded views, never mixing two units; a unit's last batch is flagged (and may be
    empty) so the writer knows when the unit is complete.

    Args:
        units: the units still to process.
        fmt: the reading settings (a ``data`` / ``pool`` section: image keys, caption fields, manifest columns).
        job: supplies the views of each image.
        batch_size: crops per batch (a sample's views stay together).
        rank, world_size: this process's share of the units (dataloader workers split it further).
    """

    def __init__(self, units: List[DataUnit], fmt, job: ExtractionJob, batch_size: int, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        self.units, self.fmt, self.job = units, fmt, job
        self.batch_size, self.rank, self.world_size = max(1, int(batch_size)), rank, world_size

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        for unit in self.units[self.rank * workers + wid::self.world_size * workers]:
            yield from self._unit_batches(unit)

    def _unit_batches(self, unit: DataUnit):
        errors: Dict[str, int] = {}
        skipped: Counter = Counter()
        samples: List[Dict[str, Any]] = []
        crops: List[torch.Tensor] = []
        for sample in iter_unit(unit, self.fmt, errors):
            if sample.missing():
                skipped[sample.missing()] += 1
                continue
            try:
                views = self.job.views(decode_image(sample.image), sample)
            except Exception:  # PIL raises many types for broken files; all mean "skip it"
                skipped["bad_image"] += 1
                continue
            samples.append(self.job.record(sample, unit))
            crops.append(views)
            if sum(len(c) for c in crops) >= self.batch_size:
                yield self._batch(unit, samples, crops, last=False, skipped={})
                samples, crops = [], []
        skipped.update(errors)
        yield self._batch(unit, samples, crops, last=True, skipped={k: int(skipped[k]) for k in SKIP_REASONS if skipped[k]})

    @staticmethod
    def _batch(unit: DataUnit, samples, crops, last: bool, skipped: Dict[str, int]) -> Dict:
        # the unit by index: Lightning walks batches to move tensors and refuses frozen dataclasses
        return {"unit": unit.index, "samples": samples, "images": torch.cat(crops) if crops else torch.zeros(0),
                "last": last, "skipped": skipped}


def run_extraction(job: ExtractionJob, backbone: torch.nn.Module, units: List[DataUnit], fmt, batch_size: int,
                   num_workers: int = 0, accelerator: str = "auto", devices: Any = "auto", precision: str = "32-true",
                   log=None, what: str = "units", verb: str = "process", num_nodes: int = 1) -> bool:
    """Process every unit the job has not finished. Returns False on a non-zero rank of a multi-GPU
    run (that process's share is written and it has nothing else to do). ``devices`` per node and
    ``num_nodes``: what a multi-node launch (torchrun, srun) started, which Lightning checks."""
    import lightning as L
    from lightning.pytorch.callbacks import BasePredictionWriter

    log = log or logging.getLogger(__name__).info
    todo = [u for u in units if not job.done(u)]
    if not todo:
        return True
    by_index = {u.index: u for u in todo}

    class Extractor(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = backbone

        def predict_step(self, batch: Dict, batch_idx: int) -> Dict:
            images = batch["images"]
            out = job.encode(self.backbone, images) if images.ndim == 4 and len(images) else None
            return {**{k: v for k, v in batch.items() if k != "images"}, "outputs": None if out is None else out.cpu()}

    class UnitWriter(BasePredictionWriter):
        def __init__(self):
            super().__init__(write_interval="batch")
            self.buffers: Dict[int, Dict[str, list]] = {}

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
            unit = by_index[prediction["unit"]]
            buf = self.buffers.setdefault(unit.index, {"samples": [], "outputs": []})
            buf["samples"] += prediction["samples"]
            if prediction["outputs"] is not None:
                buf["outputs"].append(prediction["outputs"])
            if prediction["last"]:
                buf = self.buffers.pop(unit.index)
                outputs = torch.cat(buf["outputs"]) if buf["outputs"] else None
                job.write(unit, buf["samples"], outputs, prediction["skipped"])

    quiet_lightning()
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, precision=precision, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        use_distributed_sampler=False, callbacks=[UnitWriter()], default_root_dir=None)
    if len(todo) < len(units):
        log(f"{len(units) - len(todo)} of {len(units)} {what} already done; resuming")
    log(f"{len(todo)} of {len(units)} {what} to {verb} on {trainer.world_size} "
        f"{trainer.accelerator.__class__.__name__.replace('Accelerator', '')} device(s)")
    data = UnitBatches(todo, fmt, job, batch_size, trainer.global_rank, trainer.world_size)
    loader = DataLoader(data, batch_size=None, num_workers=min(int(num_workers), len(todo)),
                        pin_memory=torch.cuda.is_available())
    trainer.predict(Extractor(), dataloaders=loader, return_predictions=False)
    trainer.strategy.barrier()  # every rank's units are on disk before rank 0 reads them all
    return trainer.is_global_zero


__all__ = ["ExtractionJob", "UnitBatches", "run_extraction"]
