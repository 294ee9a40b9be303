"""``dinotxt train``: a resolved config becomes a run folder.

    runs/<name>/
      config.yaml           resolved training config (written before training starts)
      tokenizer.model       SentencePiece model (trained on the captions unless given)
      checkpoints/last.ckpt Lightning checkpoint for --resume (trainable weights,
                            optimizer, scheduler, step, data positions)
      checkpoint/           dinotxt checkpoint for dinotxt.load (safetensors + config + tokenizer)
      logs/                 TensorBoard and CSV logs
      metrics.json          final numbers; loss_curve.png

``run_training(recipe, overrides)`` is what the command runs: compose the config once
(``resolve_run``), write the data the recipe asks to generate, then ``train(cfg)``, which reads top
to bottom: the parts are built once, each preparation step skips when its output exists, then fit.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ..checkpoint.init_from import apply_init, read_init_source
from ..config import ConfigError, TrainConfig, check_train_config, finalize, load_train_config, merge_config, parse_overrides
from ..data.world import ensure_world
from ..evaluation.zeroshot import zeroshot_task
from ..models.factory import create_backbone, create_model
from ..utils.fileio import atomic_write_bytes
from ..utils.log import quiet_lightning
from .callbacks import HoldoutValidation, PeriodicCheckpoint, StepTimer
from .datamodule import ImageTextDataModule, StreamProgress
from .diagnostics import diagnostics_callbacks
from .gradcache import check_batch_config, micro_batches_per_step
from .loggers import build_loggers, check_loggers
from .prepare import check_inputs, fit_config_to_tokenizer, prepare_feature_cache, prepare_tokenizer
from .strategy import build_strategy
from .summary import plot_loss_curve, run_metrics
from .system import DinoTxtSystem

log = logging.getLogger(__name__)


def run_training(recipe: Optional[str], overrides: List[str] = (), resume: bool = False, trust_code: bool = False) -> Dict:
    """What ``dinotxt train RECIPE key=value ...`` runs (``trust_code`` lets the recipe name a backbone by
    import path); returns the run's metrics."""
    cfg = resolve_run(recipe, list(overrides), resume)
    ensure_world(cfg.data.world)  # the demo world, when the recipe asks for it (reused when it is there)
    return train(cfg, resume=resume, trust_code=trust_code)


def resolve_run(recipe: Optional[str], overrides: List[str], resume: bool) -> DictConfig:
    """The run's config, composed once: the recipe with the overrides, or a resumed run's saved config
    with the command line's overrides (e.g. a longer schedule)."""
    cfg = load_train_config(recipe, overrides)
    run_dir = Path(cfg.output_dir) / cfg.name
    last = run_dir / "checkpoints" / "last.ckpt"
    if not resume and cfg.trainer.auto_resume and last.is_file():
        log.info(f"trainer.auto_resume: continuing the run in {run_dir} from its last checkpoint")
        resume = True
    if resume:
        if not last.is_file():
            raise ConfigError(f"--resume: no checkpoint at {last}; start the run without --resume first")
        saved = merge_config(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml"),
                             str(run_dir / "config.yaml"))
        cfg = check_train_config(finalize(merge_config(saved, parse_overrides(overrides), "command line")))
    elif last.is_file():
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume, or pick a new folder with name=NEW_NAME"
        )
    check_batch_config(cfg)
    check_loggers(cfg.trainer)  # a missing wandb / mlflow stops the run before anything is written
    return cfg


def train(cfg: DictConfig, resume: bool = False, trust_code: bool = False) -> Dict:
    """Train a resolved config into ``output_dir/name`` and return its metrics (``resume``, or
    ``trainer.auto_resume`` with a checkpoint in the folder: continue from ``checkpoints/last.ckpt``)."""
    quiet_lightning()
    run_dir = Path(cfg.output_dir) / cfg.name
    resume = resume or bool(cfg.trainer.auto_resume and (run_dir / "checkpoints" / "last.ckpt").is_file())
    check_loggers(cfg.trainer)  # a missing wandb / mlflow stops the run before any work
    init = read_init_source(cfg.model.init_from)  # what model.init_from names, read before anything is built
    b = cfg.model.backbone
    backbone = create_backbone(b, trust_code=trust_code, trainable_blocks=b.trainable_blocks)  # built once
    check_inputs(cfg, backbone)  # data, zero-shot folder, a finished cache: before anything is written
    cached = prepare_feature_cache(cfg, backbone, trust_code)  # skips when the cache is complete
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # after the cache: the same run whether it was built now

    with run_folder(run_dir):  # a run that stops before its first checkpoint leaves no folder behind
        tokenizer = prepare_tokenizer(cfg, run_dir, init)  # skips when the run folder holds it
        cfg = fit_config_to_tokenizer(cfg, tokenizer, init)
        OmegaConf.set_readonly(cfg, True)  # resolved: nothing below changes it
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())

        val_dir, zeroshot = cfg.eval.zeroshot_dir, None
        if val_dir:
            val_dir, zeroshot = zeroshot_task(val_dir, tokenizer, cfg.eval.classnames, cfg.eval.templates)
        datamodule = ImageTextDataModule(cfg, tokenizer, val_dir if cfg.trainer.val_every_n_steps > 0 else None)
        model = build_model(cfg, backbone, init, datamodule)
        holdout = holdout_validation(cfg, datamodule, run_dir, tokenizer)  # None when no pairs are held out
        system = DinoTxtSystem(model, cfg.optim, cfg.seed, cfg.trainer.backbone_autocast, zeroshot,
                               loss_block_size=cfg.loss.block_size, grad_cache=bool(cfg.data.global_batch),
                               loss_kind=cfg.loss.kind, gram=cfg.loss.gram)
        trainer = build_trainer(cfg, run_dir, datamodule, tokenizer, validates=bool(val_dir),
                                extra=[holdout] if holdout else [])

        start = time.time()
        last = run_dir / "checkpoints" / "last.ckpt"
        trainer.fit(system, datamodule=datamodule, ckpt_path=str(last) if resume else None)
        metrics = run_metrics(cfg, trainer, system, datamodule, val_dir, zeroshot, tokenizer, time.time() - start)
        if cached is not None:
            metrics["cache_seconds"] = cached["seconds"]
        if holdout is not None:
            metrics["holdout"] = holdout.summary()
        if trainer.is_global_zero:
            # the batch sets the InfoNCE's chance level; the sigmoid loss has none (it depends on the bias)
            batch = cfg.data.global_batch or cfg.data.batch_size * trainer.world_size
            plot_loss_curve(run_dir, batch if cfg.loss.kind == "infonce" else None)
            atomic_write_bytes(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
        metrics["run_dir"] = str(run_dir)
        return metrics


@contextlib.contextmanager
def run_folder(run_dir: Path):
    """Create ``run_dir``; when what runs inside fails before the run's first checkpoint, remove it again if
    this run created it (a bad shard, a wrong setting): finished work is never removed."""
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if created and not (run_dir / "checkpoints" / "last.ckpt").exists() and not (run_dir / "checkpoint").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def build_model(cfg: DictConfig, backbone, init, datamodule: ImageTextDataModule):
    """The aligned model around the run's frozen backbone, initialised from ``model.init_from`` (on resume the
    checkpoint's weights replace it), compiled when asked."""
    model = create_model(cfg.model, frozen_backbone=backbone)
    apply_init(model, init)
    if datamodule.cache is not None:  # check_inputs made sure it fits
        log.info(f"training on the feature cache {cfg.cache.path} ({len(datamodule.cache.names)} shards, "
                 f"{datamodule.cache.views} view(s), tokens={datamodule.cache.spec['tokens']}): the backbone runs only "
                 "for validation")
    apply_speed_options(model, cfg.trainer)
    return model


def apply_speed_options(model, trainer_cfg: DictConfig) -> None:
    """``trainer.activation_checkpointing`` (full / selective, on every trainable block) and
    ``trainer.compile`` (true: each tower whole; blocks: each transformer block on its own, in place)."""
    mode = trainer_cfg.get("activation_checkpointing")
    if mode:
        model.vision_head.grad_checkpointing = mode
        model.text.set_grad_checkpointing(mode if hasattr(model.text, "backbone") else True)
    if trainer_cfg.compile == "blocks":
        blocks = list(model.vision_head.block_list) + list(getattr(getattr(model.text, "backbone", None), "blocks", []))
        for block in blocks:
            block.compile()  # nn.Module.compile: in place, the state dict keys stay
    elif trainer_cfg.compile:
        model.text = torch.compile(model.text)
        model.vision_head = torch.compile(model.vision_head)


def holdout_validation(cfg: DictConfig, datamodule: ImageTextDataModule, run_dir: Path,
                       tokenizer) -> Optional[HoldoutValidation]:
    """Validation on the pairs ``data.holdout`` keeps out of training, at the zero-shot validation's steps (or
    ten times over the run), keeping the best checkpoint; None when nothing is held out."""
    pairs = datamodule.held_out_pairs()
    if not pairs:
        return None
    every = cfg.trainer.val_every_n_steps if cfg.trainer.val_every_n_steps > 0 else max(1, cfg.optim.max_steps // 10)
    log.info(f"validation: {len(pairs):,} pairs held out of training (data.holdout={cfg.data.holdout}; "
             f"{100 * datamodule.holdout:.1f}% of the pairs), measured every {every} steps")
    return HoldoutValidation(pairs, run_dir, every, tokenizer, cfg, batch_size=cfg.eval.batch_size)


def build_trainer(cfg: DictConfig, run_dir: Path, datamodule: ImageTextDataModule, tokenizer,
                  validates: bool, extra: List = ()) -> L.Trainer:
    """Lightning's Trainer for the run: strategy, precision, schedule, validation, loggers and callbacks."""
    t = cfg.trainer
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    val_every = t.val_every_n_steps if (validates and t.val_every_n_steps > 0) else None
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(t.strategy, precision),
        precision=precision, max_steps=cfg.optim.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        # gradient caching optimizes manually and clips in the system (Lightning refuses to clip manual steps)
        gradient_clip_val=None if cfg.data.global_batch else cfg.optim.grad_clip,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=1.0 if val_every else 0,
        logger=build_loggers(cfg, run_dir) or False,  # trainer.logger: csv, tensorboard, wandb, mlflow
        callbacks=[TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps // 5)),
                   StepTimer(),  # the measured time per step and the run's expected length
                   StreamProgress(datamodule),  # before the checkpoint: a checkpoint includes its batch
                   PeriodicCheckpoint(run_dir, t.checkpoint_every_n_steps, tokenizer, cfg)]
                  + list(extra) + diagnostics_callbacks(cfg, tokenizer, run_dir, validates=bool(val_every)),
        enable_checkpointing=False, deterministic=t.deterministic, default_root_dir=str(run_dir),
        enable_model_summary=False,
        # FSDP2 gathers parameters into buffers it reuses: gathered under inference mode they could not be
        # written again in training, so its validation runs under no_grad instead
        inference_mode=t.strategy != "fsdp2",
    )
    if cfg.data.global_batch:  # the device count is known now: refuse a global batch they cannot split
        micro_batches_per_step(cfg.data.global_batch, cfg.data.batch_size, trainer.world_size)
    return trainer


__all__ = ["run_training", "resolve_run", "train", "build_model", "build_trainer"]
