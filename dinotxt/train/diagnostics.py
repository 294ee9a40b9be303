"""The training-dynamics diagnostics of ``eval.diagnostics``, logged at every validation.

A Lightning callback (the system stays about training): at the end of each validation it embeds the
fixed held-out pairs (``dinotxt.evaluation.dynamics``) and logs every diagnostic under
``diagnostics/`` next to ``zeroshot/top1``, in the CSV and TensorBoard logs, as float64 values. It
also logs what they cost: ``diagnostics/seconds`` and ``diagnostics/cost_fraction``, their time over
the time of the zero-shot validation they follow (its classifier and all its batches).

Every rank computes the values on the same pairs (a sharded model needs all ranks in its forward
pass) and they are averaged across ranks like the zero-shot metrics; rank 0 writes ``RUN/diagnostics/step_XXXXXXX.safetensors`` with the embeddings
when ``eval.diagnostics_save`` asks for it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import List, Optional

import torch
from lightning.pytorch.callbacks import Callback

from ..evaluation.dynamics import DiagnosticSet, dynamics_metrics, embed_diagnostic_set, load_diagnostic_set

log = logging.getLogger(__name__)


class TrainingDynamics(Callback):
    """Args:
        cfg: the resolved training config (``eval.diagnostics*``, ``model.backbone.img_size``, ``data.*`` keys).
        tokenizer: the run's tokenizer.
        save_dir: where ``eval.diagnostics_save`` writes the embeddings of every validation (None = nowhere).
    """

    def __init__(self, cfg, tokenizer, save_dir: Optional[Path] = None):
        self.cfg, self.tokenizer, self.save_dir = cfg, tokenizer, save_dir
        self.dset: Optional[DiagnosticSet] = None
        self._started = 0.0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dset is None:  # read once: the same pairs at every validation of the run
            e, d = self.cfg.eval, self.cfg.data
            self.dset = load_diagnostic_set(e.diagnostics, e.diagnostics_size, self.tokenizer,
                                            self.cfg.model.backbone.img_size, pl_module.model.patch_size,
                                            d.caption_key, d.caption_json_field, list(d.image_keys))
            maps = int(self.dset.has_map.sum())
            log.info(f"diagnostics: {len(self.dset)} fixed pairs of {e.diagnostics}"
                     + (f", {maps} with label maps" if maps else ", no label maps (no localisation)"))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        validation = time.perf_counter() - self._started  # callbacks run before the module's epoch-end hook
        start = time.perf_counter()
        model = pl_module.model
        with torch.no_grad():
            emb = embed_diagnostic_set(model, self.dset, self.cfg.eval.batch_size)
        values = dynamics_metrics(emb, self.dset.areas, self.dset.has_map)
        seconds = time.perf_counter() - start
        values["seconds"] = seconds
        values["cost_fraction"] = seconds / validation if validation > 0 else float("nan")
        for name, value in values.items():
            # a float64 tensor stays float64 through Lightning's epoch reduction and into the CSV
            pl_module.log(f"diagnostics/{name}", torch.tensor(value, dtype=torch.float64), on_step=False,
                          on_epoch=True, batch_size=1, sync_dist=True)
        if self.save_dir is not None and trainer.is_global_zero:
            from safetensors.torch import save_file

            from ..utils.fileio import atomic_output

            tensors = {k: v.contiguous() for k, v in emb.items()}
            if self.dset.areas is not None:
                tensors.update(areas=self.dset.areas.contiguous(), has_map=self.dset.has_map.to(torch.uint8))
            with atomic_output(self.save_dir / f"step_{trainer.global_step:07d}.safetensors") as tmp:
                save_file(tensors, str(tmp), metadata={"step": str(trainer.global_step)})


def diagnostics_callbacks(cfg, tokenizer, run_dir: Path, validates: bool) -> List[Callback]:
    """``[TrainingDynamics]`` when the config asks for diagnostics (``eval.diagnostics``), else ``[]``."""
    if not cfg.eval.diagnostics:
        return []
    if not validates:  # a recipe with diagnostics, run without validation (val_every_n_steps=0) on purpose
        log.warning("eval.diagnostics are measured at every validation, and this run has none "
                    "(eval.zeroshot_dir / trainer.val_every_n_steps): no diagnostics are logged")
        return []
    return [TrainingDynamics(cfg, tokenizer, run_dir / "diagnostics" if cfg.eval.diagnostics_save else None)]
