"""The LightningModule *system* around the plain ``DinoTxt`` nn.Module.

It receives its model and its settings explicitly (Lightning's style guide: the system wraps
nn.Modules it is given; no "params bag" it builds itself from), and never reaches into the
datamodule: the data's positions and skip counts are kept by the ``StreamProgress`` callback
(``datamodule.py``). Method order follows the style guide: init -> forward -> training ->
validation -> optimizers -> checkpoint hooks. The frozen backbone pins its own eval mode, and
its weights are stripped from every Lightning checkpoint (and put back from the live model on
resume), so checkpoints hold only what trains (unlocked backbone blocks included).

Exact resume: the data stream seeds every sample from ``(seed, reader, position)``, and
the model's own random draws (drop path) are reseeded every step from ``(seed, step
counter, rank)``, so a run killed and resumed from its last checkpoint ends with the
same weights as an uninterrupted one. A non-finite loss or gradient stops the step
before the optimizer touches the weights.

With ``data.global_batch`` (``grad_cache=True``) each training batch holds the K micro-batches
of one optimizer step and the system optimizes manually: gradient caching
(``gradcache.py``) back-propagates the loss of the whole global batch one micro-batch at a
time, each micro-batch reseeded from its own counter in both passes; the optimizer, the
gradient clipping (``optim.grad_clip``), the non-finite checks and the learning-rate schedule
run once per step, as in the one-pass case.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy

from ..data.stream import mix_seed
from ..evaluation.zeroshot import ZeroShotTask, zeroshot_metrics
from .loss import build_loss
from ..models.dinotxt import DinoTxt
from ..utils.precision import backbone_autocast_dtype
from .gradcache import gradcache_backward
from .optim import build_optimizer
from .step import contrastive_and_gram_loss, contrastive_loss
from .strategy import sync_replicated_grads


class DinoTxtSystem(L.LightningModule):
    """Args:
        model: the ``DinoTxt`` to train (its backbone stays frozen).
        optim: the ``optim`` settings (lr, weight_decay, betas, eps, warmup_steps, max_steps, min_lr_ratio).
        seed: base seed of the per-step reseeding of the model's random draws.
        backbone_autocast: ``None`` or ``"bfloat16"`` for the frozen backbone's forward pass.
        zeroshot: classes, prompts and tokenizer of the zero-shot validation (optional).
        loss_block_size: None for the dense loss, or the tile side of the blocked loss (``loss.block_size``).
        loss_kind: ``infonce`` (the default) or ``sigmoid`` (SigLIP; the model needs its ``logit_bias``).
        grad_cache: batches are lists of micro-batches of one step (``data.global_batch``): gradient caching.
    """

    def __init__(self, model: DinoTxt, optim, seed: int = 0, backbone_autocast: Optional[str] = None,
                 zeroshot: Optional[ZeroShotTask] = None, loss_block_size: Optional[int] = None,
                 grad_cache: bool = False, loss_kind: str = "infonce", gram=None):
        super().__init__()
        self.model = model
        self.optim = optim
        if optim.get("freeze_logit_scale"):  # the temperature stays at its init (official freeze_logit_scale)
            model.logit_scale.requires_grad_(False)
        self.seed = int(seed)
        if loss_kind == "sigmoid" and model.logit_bias is None:
            raise ValueError("loss.kind=sigmoid needs a model with a logit_bias (model.init_logit_bias, SigLIP: -10)")
        self.loss_fn = build_loss(loss_kind, loss_block_size)
        self.gram = gram if gram is not None and gram.enabled else None  # loss.gram (dinotxt/train/gram.py)
        self.automatic_optimization = not grad_cache  # gradient caching runs its own backward passes
        backbone_autocast_dtype(backbone_autocast)  # an unsupported value stops the run before it starts
        self.backbone_autocast = backbone_autocast
        self.zeroshot = zeroshot
        self.micro_batches = 0  # training micro-batches seen (all ranks see the same number); saved for resume
        self._val_logits: List[torch.Tensor] = []
        self._val_targets: List[torch.Tensor] = []
        self._classifier: Optional[torch.Tensor] = None
        self.val_metrics: Dict[str, Any] = {}  # the last validation's zeroshot_metrics, and its "step"

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.model(images, ids)

    def configure_model(self) -> None:
        """``trainer.strategy=fsdp2``: shard the model with FSDP2 over the strategy's data-parallel mesh (Lightning's
        ModelParallelStrategy calls this once, before the optimizer is built); nothing under other strategies."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        from .strategy import apply_fsdp2

        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) and not getattr(self.model, "fsdp2", False):
            apply_fsdp2(self.model, self.device_mesh["data_parallel"], getattr(strategy, "mp_precision", "32-true"))
            # the strategy loads a resumed checkpoint itself, before on_load_checkpoint can put the frozen backbone
            # back: its keys are absent by design (it is rebuilt from the config), so they may be missing there
            self.strict_loading = False

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        if not self.automatic_optimization:
            return self._grad_cache_step(batch["micro_batches"])
        # drop path draws from the global RNG: reseed it from the step counter so a resumed run
        # (whose RNG state is not in the checkpoint) draws the same masks as an uninterrupted one
        torch.manual_seed(mix_seed(self.seed, self.micro_batches, self.global_rank))
        self.micro_batches += 1
        if self.gram is not None:
            loss, gram = contrastive_and_gram_loss(self.model, self.loss_fn, batch, self.gram, self.backbone_autocast)
            self.log("train/gram_loss", gram, batch_size=batch["text"].shape[0])
        else:
            loss = contrastive_loss(self.model, self.loss_fn, batch, self.backbone_autocast)
        self._check_loss(loss)
        self._log_step(loss, batch["text"].shape[0], self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _grad_cache_step(self, micro_batches: List[Dict[str, Any]]) -> torch.Tensor:
        """One optimizer step over the global batch of all ranks' micro-batches (manual optimization)."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        seeds = [mix_seed(self.seed, self.micro_batches + i, self.global_rank) for i in range(len(micro_batches))]
        self.micro_batches += len(micro_batches)
        strategy = self.trainer.strategy

        def backward(surrogate: torch.Tensor, last: bool) -> None:
            # under DDP only the step's last backward pass all-reduces the accumulated gradients
            parallel = isinstance(strategy, ParallelStrategy) and not last
            with strategy.block_backward_sync() if parallel else contextlib.nullcontext():
                self.manual_backward(surrogate)

        opt.zero_grad(set_to_none=True)
        loss = gradcache_backward(self.model, self.loss_fn, micro_batches, seeds, backward, self.backbone_autocast,
                                  check_loss=self._check_loss)
        self._log_step(loss, sum(mb["text"].shape[0] for mb in micro_batches), opt.param_groups[0]["lr"])
        opt.step()  # on_before_optimizer_step: the non-finite check, then the gradient clipping
        self.model.clamp_logit_scale_()
        sched.step()
        return loss

    def _check_loss(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}; the weights were not updated. "
                "Lower optim.lr, raise optim.warmup_steps or set optim.grad_clip, then resume with --resume."
            )

    def _log_step(self, loss: torch.Tensor, samples: int, lr: float) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=samples)
        self.log("train/logit_scale", self.model.logit_scale.exp(), prog_bar=True, batch_size=samples)
        if self.model.logit_bias is not None:
            self.log("train/logit_bias", self.model.logit_bias, batch_size=samples)
        self.log("train/lr", lr, batch_size=samples)

    def on_before_optimizer_step(self, optimizer) -> None:
        # fp16 AMP skips steps with inf gradients by design; everywhere else a non-finite
        # gradient would poison the weights and the AdamW moments
        sync_replicated_grads(self.model)  # fsdp2: the temperature's gradient, averaged like every other
        if not str(self.trainer.precision).startswith("16"):
            self._check_gradients()
        if not self.automatic_optimization and self.optim.grad_clip:  # Lightning clips automatic steps itself
            self.clip_gradients(optimizer, gradient_clip_val=self.optim.grad_clip, gradient_clip_algorithm="norm")

    def _check_gradients(self) -> None:
        # FSDP2 gradients are shards (DTensors): each rank checks its own, and the ranks agree on the verdict
        grads = [(n, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad)
                 for n, p in self.model.named_parameters() if p.grad is not None]
        finite = torch.stack([g.isfinite().all() for _, g in grads]).all() if grads else torch.tensor(True)
        if getattr(self.model, "fsdp2", False):
            finite = finite.to(torch.int32)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            bad = [n for n, g in grads if not g.isfinite().all()] or ["a shard on another rank"]
            raise FloatingPointError(
                f"non-finite gradient in {bad[0]} (and {len(bad) - 1} more tensors) at step {self.global_step}; "
                "the weights were not updated. Lower optim.lr or set optim.grad_clip, then resume with --resume."
            )

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # clamp right after the update, before any callback (e.g. a checkpoint) sees the weights
        self.model.clamp_logit_scale_()

    # ------------------------------------------------------------------ validation (zero-shot)
    def on_validation_epoch_start(self) -> None:
        self._val_logits, self._val_targets = [], []
        self._classifier = self.zeroshot.classifier(self.model, self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        feats = self.model.encode_image(images, normalize=True)
        self._val_logits.append((feats.float() @ self._classifier.t()).cpu())
        self._val_targets.append(targets.cpu())

    def on_validation_epoch_end(self) -> None:
        res = zeroshot_metrics(torch.cat(self._val_logits), torch.cat(self._val_targets), self.zeroshot.classnames)
        self.val_metrics = {**res, "step": self.global_step, "world_size": self.trainer.world_size}
        for key in ("top1", "top5", "mean_per_class_recall"):
            self.log(f"zeroshot/{key}", res[key], prog_bar=(key == "top1"), sync_dist=True)

    # ------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        o = self.optim
        opt, sched = build_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps, o.warmup_steps, o.max_steps,
                                     o.min_lr_ratio, backbone_lr=o.get("backbone_lr"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        backbone = self.model.backbone
        for k in [k for k in sd if k.startswith("model.backbone.") and not backbone.is_unlocked(k[len("model.backbone."):])]:
            del sd[k]
        checkpoint["dinotxt"] = {"micro_batches": self.micro_batches}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        sd = checkpoint.get("state_dict")  # fsdp2: the strategy has taken and loaded it already
        if sd is not None:
            # runs saved before the head attribute was named after its config section call it "visual"
            for k in [k for k in sd if k.startswith("model.visual.")]:
                sd["model.vision_head." + k[len("model.visual."):]] = sd.pop(k)
            # the frozen backbone is rebuilt from its config, not stored: put the live weights back
            sd.update({f"model.{k}": v for k, v in self.model.backbone_state().items()})
        self.micro_batches = int(checkpoint.get("dinotxt", {}).get("micro_batches", 0))
