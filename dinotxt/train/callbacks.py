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
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from ..checkpoint.format import save_checkpoint
from .strategy import sharded_full_state

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
        state = sharded_full_state(module.model)  # fsdp2: every rank takes part in gathering the weights
        if trainer.is_global_zero:
            os.replace(tmp, path)
            save_checkpoint(self.run_dir / "checkpoint", module.model, self.tokenizer, self.cfg, state=state)
            self.keep_step_copy(path, trainer.global_step)

    def keep_step_copy(self, last: Path, step: int) -> None:
        """``trainer.keep_last_checkpoints``: a copy of last.ckpt named by its step (a hard link where the
        filesystem allows), the newest N kept."""
        keep = int(self.cfg.trainer.get("keep_last_checkpoints", 0) or 0)
        if keep <= 0:
            return
        named = last.with_name(f"step_{step:07d}.ckpt")
        tmp = named.with_name(f".{named.name}.tmp{os.getpid()}")
        try:
            os.link(last, tmp)
        except OSError:
            import shutil

            shutil.copyfile(last, tmp)
        os.replace(tmp, named)
        for old in sorted(last.parent.glob("step_*.ckpt"))[:-keep]:
            old.unlink()

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




class HoldoutValidation(Callback):
    """Validation on the pairs held out of training (``data.holdout``): every ``every_n_steps`` steps and at
    the end, the contrastive loss over the whole split and image->text / text->image R@1; the best step (by
    mean R@1, then loss) is saved as a dinotxt checkpoint in ``checkpoint_best/``. ``summary`` says whether
    training and validation loss parted (the model memorising its captions)."""

    def __init__(self, pairs: List[dict], run_dir: Path, every_n_steps: int, tokenizer, cfg: DictConfig,
                 batch_size: int = 256):
        self.pairs, self.run_dir, self.every = pairs, run_dir, max(1, int(every_n_steps))
        self.tokenizer, self.cfg, self.batch_size = tokenizer, cfg, batch_size
        self.history: List[dict] = []  # {"step", "train_loss", "loss", "i2t_R@1", "t2i_R@1"}
        self.best: Optional[dict] = None
        self._last_step = -1

    @torch.no_grad()
    def measure(self, model) -> dict:
        """Loss and R@1 of ``model`` on the held-out pairs (one similarity matrix over all of them)."""
        from .step import image_features

        was_training = model.training
        model.eval()
        key = "pooled" if "pooled" in self.pairs[0] else "tokens" if "tokens" in self.pairs[0] else "image"
        device = model.logit_scale.device
        images, texts = [], []
        for i in range(0, len(self.pairs), self.batch_size):
            chunk = self.pairs[i:i + self.batch_size]
            batch = {key: torch.stack([p[key] for p in chunk]).to(device)}
            images.append(torch.nn.functional.normalize(image_features(model, batch).float(), dim=-1))
            ids = torch.stack([p["text"] for p in chunk]).to(device)
            texts.append(model.encode_text(ids, normalize=True).float())
        model.train(was_training)
        sims = torch.cat(images) @ torch.cat(texts).t()
        logits = model.logit_scale.exp().float() * sims
        target = torch.arange(len(sims), device=sims.device)
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.t(), target)) / 2
        return {"loss": float(loss), "i2t_R@1": float((sims.argmax(1) == target).float().mean()),
                "t2i_R@1": float((sims.argmax(0) == target).float().mean())}

    def _validate(self, trainer, module) -> None:
        res = self.measure(module.model)
        train_loss = trainer.callback_metrics.get("train/loss")
        row = {"step": int(trainer.global_step), "train_loss": None if train_loss is None else float(train_loss), **res}
        self.history.append(row)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"holdout/{k}": v for k, v in res.items()}, step=trainer.global_step)
        score = (res["i2t_R@1"] + res["t2i_R@1"], -res["loss"])
        if self.best is None or score > (self.best["i2t_R@1"] + self.best["t2i_R@1"], -self.best["loss"]):
            self.best = row
            state = sharded_full_state(module.model)
            if trainer.is_global_zero:
                save_checkpoint(self.run_dir / "checkpoint_best", module.model, self.tokenizer, self.cfg, state=state)
        if trainer.is_global_zero:
            log.info(f"held-out pairs ({len(self.pairs)}) at step {row['step']}: loss {res['loss']:.3f}, "
                     f"R@1 image->text {100 * res['i2t_R@1']:.1f}%, text->image {100 * res['t2i_R@1']:.1f}%")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if step % self.every == 0 and 0 < step < trainer.max_steps:
            self._validate(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if not self.history or self.history[-1]["step"] != trainer.global_step:
            self._validate(trainer, module)

    def summary(self) -> dict:
        """The last and the best validation, and when training and validation loss parted (else None)."""
        out = {"pairs": len(self.pairs), "last": self.history[-1] if self.history else None, "best": self.best,
               "parted": None}
        low = min(self.history, key=lambda r: r["loss"]) if self.history else None
        last = self.history[-1] if self.history else None
        if (low is not None and last is not low and last["loss"] > 1.05 * low["loss"]
                and None not in (low["train_loss"], last["train_loss"]) and last["train_loss"] < low["train_loss"]):
            out["parted"] = {"step": low["step"], "val_loss": [low["loss"], last["loss"]],
                             "train_loss": [low["train_loss"], last["train_loss"]]}
        return out


__all__ = ["PeriodicCheckpoint", "StepTimer", "HoldoutValidation", "duration"]
