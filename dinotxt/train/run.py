"""``dinotxt train``: turn a resolved recipe into a run folder.

    runs/<name>/
      config.yaml           resolved training config (written before training starts)
      tokenizer.model       SentencePiece model (trained on the captions unless given)
      checkpoints/last.ckpt Lightning checkpoint for --resume (trainable weights,
                            optimizer, scheduler, step, data positions)
      checkpoint/           dinotxt checkpoint for dinotxt.load (safetensors + config + tokenizer)
      logs/                 TensorBoard and CSV logs
      metrics.json          final numbers; loss_curve.png
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import save_checkpoint
from ..config import (ConfigError, TrainConfig, check_train_config, finalize, load_train_config, merge_config,
                      parse_overrides)
from ..data.cache import cache_complete
from ..data.sources import expand_shards, is_manifest, iter_tar_samples, read_manifest
from ..data.stream import extract_caption
from ..data.world import ensure_world
from ..fileio import atomic_write_bytes
from ..tokenizer import Tokenizer, train_tokenizer
from ..evaluation.zeroshot import zeroshot_task
from ..models.factory import create_model
from .datamodule import ImageTextDataModule, StreamProgress
from .gradcache import check_batch_config, micro_batches_per_step
from .init_from import apply_init, read_init_source
from .loggers import build_loggers, check_loggers
from .strategy import build_strategy
from .diagnostics import diagnostics_callbacks
from .system import DinoTxtSystem

log = logging.getLogger(__name__)


class PeriodicCheckpoint(Callback):
    """Every N steps and at the end: an atomic Lightning checkpoint for --resume, and a
    dinotxt checkpoint folder for use, so a killed run always leaves a usable model."""

    def __init__(self, run_dir: Path, every_n_steps: int, tokenizer: Tokenizer, cfg: DictConfig):
        self.run_dir, self.every, self.tokenizer, self.cfg = run_dir, every_n_steps, tokenizer, cfg
        self._last_step = -1

    def save(self, trainer: L.Trainer, module: DinoTxtSystem) -> None:
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


def _captions_for_tokenizer(cfg: DictConfig, limit: int) -> List[str]:
    """Up to ``limit`` captions of the training data, read in order (no images decoded)."""
    d = cfg.data
    if d.train is None and cfg.cache.path:  # training on the feature cache alone
        from ..data.cache import FeatureCache

        cache = FeatureCache(cfg.cache.path)
        captions = []
        for name in cache.names:
            for raw in cache.index(name)["captions"]:
                caption = extract_caption({"__caption__": raw})
                if caption:
                    captions.append(caption)
                if len(captions) >= limit:
                    return captions
        return captions
    if is_manifest(d.train):
        return [c for _, c in read_manifest(d.train, d.manifest_image_column, d.manifest_caption_column)[:limit] if c]
    errors: Dict[str, int] = {}
    captions: List[str] = []
    for shard in expand_shards(d.train):
        for sample in iter_tar_samples(shard, errors):
            caption = extract_caption(sample, d.caption_key, d.caption_json_field)
            if caption:
                captions.append(caption)
            if len(captions) >= limit:
                return captions
    return captions


def prepare_tokenizer(cfg: DictConfig, run_dir: Path, init=None):
    """The run's tokenizer, kept in the run folder (so ``--resume`` uses the same one): SentencePiece
    (given, or trained on the captions) or OpenAI's CLIP BPE (``tokenizer.kind=clip``), or the one the
    ``model.init_from`` weights bring. The text tower's vocabulary size follows it."""
    ctx = cfg.model.text.context_length
    if cfg.model.text.pretrained:
        return _pretrained_text_tokenizer(cfg, run_dir, init)
    if init is not None:
        wanted = "clip" if init.tokenizer_kind == "clip_bpe" else "sentencepiece"
        if wanted != cfg.tokenizer.kind or cfg.tokenizer.path:
            log.info(f"tokenizer: the {init.tokenizer_kind} tokenizer of model.init_from ({init.describe()})")
        cfg.tokenizer.kind, cfg.tokenizer.path = wanted, None
        if wanted == "sentencepiece" and not (run_dir / "tokenizer.model").is_file():
            Tokenizer(init.tokenizer_bytes, ctx).save(run_dir / "tokenizer.model")
        elif wanted == "clip" and init.tokenizer_bytes is not None:
            from ..clip_tokenizer import BPE_FILENAME

            if not (run_dir / BPE_FILENAME).is_file():
                atomic_write_bytes(run_dir / BPE_FILENAME, init.tokenizer_bytes)
    if cfg.tokenizer.kind == "clip":
        from ..clip_tokenizer import BPE_FILENAME, ClipTokenizer

        path = run_dir / BPE_FILENAME
        tok = ClipTokenizer(path if path.is_file() else cfg.tokenizer.path, context_length=ctx)
        if not path.is_file():
            tok.save(path)
        cfg.model.text.vocab_size = tok.vocab_size
        return tok
    path = run_dir / "tokenizer.model"
    if path.is_file():
        tok = Tokenizer(path, ctx)
    elif cfg.tokenizer.path:
        tok = Tokenizer(cfg.tokenizer.path, ctx)
        tok.save(path)
    else:
        captions = _captions_for_tokenizer(cfg, cfg.tokenizer.max_sentences)
        log.info(f"training a SentencePiece tokenizer on {len(captions):,} captions "
              f"(vocab_size {cfg.tokenizer.vocab_size})")
        tok = train_tokenizer(captions, cfg.tokenizer.vocab_size, ctx)
        tok.save(path)
    cfg.model.text.vocab_size = tok.vocab_size
    return tok


def plot_loss_curve(run_dir: Path, batch_size: Optional[int] = None) -> Optional[Path]:
    import csv

    steps, losses = [], []
    for f in sorted((run_dir / "logs").glob("csv/*/metrics.csv")):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("train/loss"):
                    steps.append(int(row["step"]))
                    losses.append(float(row["train/loss"]))
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, lw=1.2, label="training loss")
    if batch_size:  # an untrained model scores every pair alike: loss = ln(global batch)
        import math

        ax.axhline(math.log(batch_size), ls="--", color="gray", lw=1, label=f"chance: ln {batch_size}")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title(f"{run_dir.name}: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    tmp = run_dir / ".loss_curve.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _pretrained_text_tokenizer(cfg: DictConfig, run_dir: Path, init=None):
    """The own tokenizer of ``model.text.pretrained`` (its tokenizer.json, kept in the run folder)."""
    from ..hf_tokenizer import HF_TOKENIZER_FILENAME, HFTokenizer
    from ..models.pretrained_text import resolve_text_model

    t = cfg.model.text
    if init is not None:
        raise ConfigError("model.init_from and model.text.pretrained both name text weights; keep one of them")
    if cfg.tokenizer.kind != "sentencepiece" or cfg.tokenizer.path:
        raise ConfigError(f"model.text.pretrained brings its own tokenizer: remove tokenizer.kind={cfg.tokenizer.kind}"
                          + (f" / tokenizer.path={cfg.tokenizer.path}" if cfg.tokenizer.path else ""))
    path = run_dir / HF_TOKENIZER_FILENAME
    tok = HFTokenizer(path if path.is_file() else resolve_text_model(t.pretrained), t.context_length)
    if not path.is_file():
        tok.save(path)
    log.info(f"tokenizer: the own tokenizer of {t.pretrained} ({tok.vocab_size:,} ids, pad id {tok.pad_id})")
    t.vocab_size, t.pad_id = tok.vocab_size, tok.pad_id
    return tok


def resolve_run(recipe: Optional[str], overrides: List[str], resume: bool) -> DictConfig:
    cfg = load_train_config(recipe, overrides)
    run_dir = Path(cfg.output_dir) / cfg.name
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise ConfigError(f"--resume: no checkpoint at {last}; start the run without --resume first")
        saved = merge_config(OmegaConf.structured(TrainConfig), OmegaConf.load(run_dir / "config.yaml"),
                             str(run_dir / "config.yaml"))
        # a resumed run keeps its saved config; only command-line overrides (e.g. a longer schedule) apply
        cfg = check_train_config(finalize(merge_config(saved, parse_overrides(overrides), "command line")))
    elif last.is_file():
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume, or pick a new folder with name=NEW_NAME"
        )
    check_batch_config(cfg)
    return cfg


def _quiet_expected_warnings() -> None:
    import warnings

    # the frozen backbone is in eval mode on purpose (FrozenBackbone pins it)
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def run_training(recipe: Optional[str], overrides: List[str] = (), resume: bool = False, trust_code: bool = False) -> Dict:
    """Train the recipe (``trust_code`` lets it name a backbone by import path) and return its metrics."""
    _quiet_expected_warnings()
    cfg = resolve_run(recipe, list(overrides), resume)
    check_loggers(cfg.trainer)  # a missing wandb / mlflow stops the run before any work
    run_dir = Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_world(cfg.data.world)
    if cfg.cache.path and cfg.data.train and not cache_complete(cfg.cache.path):
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # several processes: `dinotxt cache` first (the loader says so)
            from ..features.cache import build_cache

            log.info(f"feature cache {cfg.cache.path}: not complete, building it first (the frozen backbone runs once "
                     "over data.train; `dinotxt cache RECIPE` does the same on its own)")
            build_cache(cfg, trust_code=trust_code)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    init = read_init_source(cfg.model.init_from)
    tokenizer = prepare_tokenizer(cfg, run_dir, init)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())

    val_dir, zeroshot = cfg.eval.zeroshot_dir, None
    if val_dir:
        val_dir, zeroshot = zeroshot_task(val_dir, tokenizer, cfg.eval.classnames, cfg.eval.templates)
    datamodule = ImageTextDataModule(cfg, tokenizer, val_dir if cfg.trainer.val_every_n_steps > 0 else None)
    model = create_model(cfg.model, trust_code=trust_code)
    apply_init(model, init)  # step 0 is the released model (on resume the checkpoint's weights replace it)
    if datamodule.cache is not None:  # refuse features of another backbone, image size, transform or data
        datamodule.cache.check_fits(cfg, model.backbone)
        log.info(f"training on the feature cache {cfg.cache.path} ({len(datamodule.cache.names)} shards, "
              f"{datamodule.cache.views} view(s), tokens={datamodule.cache.spec['tokens']}): the backbone runs only "
              "for validation")
    if cfg.trainer.compile:
        model.text = torch.compile(model.text)
        model.vision_head = torch.compile(model.vision_head)
    system = DinoTxtSystem(model, cfg.optim, cfg.seed, cfg.trainer.backbone_autocast, zeroshot,
                           loss_block_size=cfg.loss.block_size, grad_cache=bool(cfg.data.global_batch),
                           loss_kind=cfg.loss.kind)

    t = cfg.trainer
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    val_every = t.val_every_n_steps if (val_dir and t.val_every_n_steps > 0) else None
    loggers = build_loggers(cfg, run_dir)  # trainer.logger: csv, tensorboard, wandb, mlflow
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=build_strategy(t.strategy, precision),
        precision=precision, max_steps=cfg.optim.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        # gradient caching optimizes manually and clips in the system (Lightning refuses to clip manual steps)
        gradient_clip_val=None if cfg.data.global_batch else cfg.optim.grad_clip,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, limit_val_batches=1.0 if val_every else 0, logger=loggers or False,
        callbacks=[TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps // 5)),
                   StreamProgress(datamodule),  # before the checkpoint: a checkpoint includes its batch
                   PeriodicCheckpoint(run_dir, t.checkpoint_every_n_steps, tokenizer, cfg)]
                  + diagnostics_callbacks(cfg, tokenizer, run_dir, validates=bool(val_every)),
        enable_checkpointing=False, deterministic=t.deterministic, default_root_dir=str(run_dir),
        enable_model_summary=False,
    )
    if cfg.data.global_batch:  # the device count is known now: refuse a global batch they cannot split
        micro_batches_per_step(cfg.data.global_batch, cfg.data.batch_size, trainer.world_size)
    start = time.time()
    last = run_dir / "checkpoints" / "last.ckpt"
    trainer.fit(system, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    elapsed = time.time() - start

    metrics: Dict = {
        "steps": trainer.global_step,
        "train_seconds": round(elapsed, 1),
        "final_train_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
        "logit_scale": float(model.logit_scale.detach().exp()),
        "skipped_samples": dict(datamodule.skipped),
    }
    if val_dir and trainer.is_global_zero:
        last = system.val_metrics
        if last.get("step") == trainer.global_step and last.get("world_size") == 1:
            res = {k: v for k, v in last.items() if k not in ("step", "world_size")}  # validated at the last step
        else:  # on one process, over the whole folder
            from ..evaluation.zeroshot import evaluate_zeroshot
            from ..transforms import eval_transform

            model.eval()
            res = evaluate_zeroshot(model, eval_transform(cfg.model.backbone.img_size), tokenizer, val_dir,
                                    zeroshot.classnames, zeroshot.templates, cfg.eval.batch_size, num_workers=0)
        metrics["zeroshot"] = {**res, "templates": cfg.eval.templates}
    if trainer.is_global_zero:
        # the contrastive batch sets the InfoNCE's chance level; the sigmoid loss has no such line (it depends on the bias)
        batch = cfg.data.global_batch or cfg.data.batch_size * trainer.world_size
        plot_loss_curve(run_dir, batch if cfg.loss.kind == "infonce" else None)
        atomic_write_bytes(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    metrics["run_dir"] = str(run_dir)
    return metrics
