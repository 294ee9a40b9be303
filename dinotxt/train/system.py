"""The LightningModule *system* around the plain ``DinoTxt`` nn.Module.

Method order follows Lightning's style guide: init -> forward -> training ->
validation -> optimizers -> checkpoint hooks. The frozen backbone pins its own eval
mode, and its weights are stripped from every Lightning checkpoint (and put back from
the live model on resume), so checkpoints hold only what trains.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from ..loss import ClipLoss
from ..models.factory import create_model
from ..zero_shot import accuracy, mean_per_class_recall, zero_shot_classifier
from .optim import build_optimizer


class DinoTxtSystem(L.LightningModule):
    """Args:
        cfg: the resolved training config (model, optim, eval sections are used here).
        tokenizer: the run's tokenizer (for zero-shot validation prompts).
        classnames, templates: zero-shot validation classes and prompts (optional).
    """

    def __init__(self, cfg: DictConfig, tokenizer=None, classnames: Optional[List[str]] = None,
                 templates: Optional[List[str]] = None):
        super().__init__()
        self.cfg = cfg
        self.model = create_model(cfg.model)
        self.loss_fn = ClipLoss()
        self.tokenizer = tokenizer
        self.classnames = classnames
        self.templates = templates
        self.skipped: Counter = Counter()
        self._val_logits: List[torch.Tensor] = []
        self._val_targets: List[torch.Tensor] = []
        self._classifier: Optional[torch.Tensor] = None
        self.val_metrics: Dict[str, float] = {}

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.model(images, ids)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        image_features = self.model.encode_image(batch["image"])
        text_features = self.model.encode_text(batch["text"])
        loss = self.loss_fn(image_features, text_features, self.model.logit_scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}; the weights were not updated. "
                "Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip, then resume with --resume."
            )
        self.skipped.update({k: v for k, v in batch["skipped"].items() if v})
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "record_positions"):
            dm.record_positions(batch["positions"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.model.logit_scale.exp(), prog_bar=True, batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        self.log("train/skipped", float(sum(self.skipped.values())), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.model.clamp_logit_scale_()

    # ------------------------------------------------------------------ validation (zero-shot)
    def on_validation_epoch_start(self) -> None:
        self._val_logits, self._val_targets = [], []
        self._classifier = zero_shot_classifier(self.model, self.tokenizer, self.classnames, self.templates,
                                                device=self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        feats = self.model.encode_image(images, normalize=True)
        self._val_logits.append((feats.float() @ self._classifier.t()).cpu())
        self._val_targets.append(targets.cpu())

    def on_validation_epoch_end(self) -> None:
        logits, targets = torch.cat(self._val_logits), torch.cat(self._val_targets)
        top1, top5 = accuracy(logits, targets, (1, 5))
        recall = mean_per_class_recall(logits, targets, len(self.classnames))
        self.val_metrics = {"zeroshot/top1": top1, "zeroshot/top5": top5, "zeroshot/mean_per_class_recall": recall}
        for k, v in self.val_metrics.items():
            self.log(k, v, prog_bar=(k == "zeroshot/top1"), sync_dist=True)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        o = self.cfg.optim
        opt, sched = build_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps, o.warmup_steps, o.max_steps,
                                     o.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith("model.backbone.")]:
            del sd[k]
        checkpoint["dinotxt"] = {"skipped": dict(self.skipped), "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # the frozen backbone is rebuilt from its config, not stored: put the live weights back
        checkpoint["state_dict"].update({f"model.{k}": v for k, v in self.model.backbone_state().items()})
        self.skipped = Counter(checkpoint.get("dinotxt", {}).get("skipped", {}))
