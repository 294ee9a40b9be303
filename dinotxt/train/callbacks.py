"""The run's own Lightning callbacks: periodic checkpoints that always leave a usable model, and the
measured time per step with the run's expected length."""
from __future__ import annotations

import datetime
import logging
import os
import time
from pathlib import Path
from typing import List, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ..checkpoint.format import save_checkpoint

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3.4 h``: a length of time as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class StepTimer(Callback):
    """After the first optimizer steps (the very first one is left out: it pays for warm-up), says how long a
    step takes and how long the run will take, so a recipe sized for another machine shows at once."""

    def __init__(self, steps: int = 5, seconds: float = 60.0):
        self.steps, self.seconds = steps, seconds
        self.times: List[float] = []
        self._last_step = -1
        self.reported: Optional[float] = None  # the measured seconds per step, once said

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or self.reported is not None:
            return
        self._last_step = step
        self.times.append(time.monotonic())
        measured = len(self.times) - 2  # steps timed after the first one
        if measured >= self.steps or (measured >= 1 and self.times[-1] - self.times[1] >= self.seconds):
            per_step = (self.times[-1] - self.times[1]) / measured
            left = max(0, trainer.max_steps - step)
            end = datetime.datetime.now() + datetime.timedelta(seconds=per_step * left)
            self.reported = per_step
            if trainer.is_global_zero:
                log.info(f"{per_step:.2f} s per step (measured over steps {step - measured + 1}-{step}): "
                         f"{trainer.max_steps:,} steps take about {duration(per_step * trainer.max_steps)}, "
                         f"{duration(per_step * left)} from now (until about {end:%H:%M})")


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


__all__ = ["PeriodicCheckpoint", "StepTimer", "duration"]
