"""What a finished run reports: its metrics (``metrics.json``) and its loss curve (``loss_curve.png``)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Optional

from omegaconf import DictConfig


def run_metrics(cfg: DictConfig, trainer, system, datamodule, val_dir: Optional[str], zeroshot, tokenizer,
                seconds: float) -> Dict:
    """The numbers of a finished run: steps, time, final loss, temperature, skipped samples and, with a
    zero-shot folder, the last validation (or an evaluation over the whole folder on one process)."""
    model = system.model
    metrics: Dict = {
        "steps": trainer.global_step,
        "train_seconds": round(seconds, 1),
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
            from ..models.transforms import model_eval_transform

            if getattr(model, "fsdp2", False):  # its tensors are shards: the full weights of the final checkpoint
                from ..checkpoint.format import load

                model = load(Path(trainer.default_root_dir) / "checkpoint", device=system.device)[0]
            model.eval()
            res = evaluate_zeroshot(model, model_eval_transform(cfg.model), tokenizer, val_dir,
                                    zeroshot.classnames, zeroshot.templates, cfg.eval.batch_size, num_workers=0)
        metrics["zeroshot"] = {**res, "templates": cfg.eval.templates}
    return metrics


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


__all__ = ["run_metrics", "plot_loss_curve"]
