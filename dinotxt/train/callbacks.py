"""The run's own Lightning callback: periodic checkpoints that always leave a usable model."""
from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ..checkpoint.format import save_checkpoint


class PeriodicCheckpoint(Callback):
    """Every N steps and at the end: an atomic Lightning checkpoint for --resume, and a
    dinotxt checkpoint folder for use, so a killed run always leaves a usable model."""

    def __init__(self, run_dir: Path, every_n_steps: int, tokenizer, cfg: DictConfig):
        self.run_dir, self.every, self.tokenizer, self.cfg = run_dir, every_n_steps, tokenizer, cfg
        self._last_step = -1

    def save(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        path = self.run_dir / "checkpoints" / "last.ckpt"
        tmp = path.with_name(f".last.ckpt.tmp{os.getpid()}")
        # the full training state (optimizer, loops, callbacks): what an exact --resume needs
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, path)
            save_checkpoint(self.run_dir / "checkpoint", module.model, self.tokenizer, self.cfg)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # only on the batch that completed an optimizer step: with gradient accumulation the
        # other batches of a step hold half-accumulated gradients a checkpoint cannot carry
        if step == self._last_step:
            return
        self._last_step = step
        if self.every > 0 and step % self.every == 0 and 0 < step < trainer.max_steps:
            self.save(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.save(trainer, module)


__all__ = ["PeriodicCheckpoint"]
