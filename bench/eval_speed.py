"""Evaluation speed: dense (open-vocabulary segmentation) inference in ``whole`` and ``slide``
mode, zero-shot image encoding and the text side, on CPU, with the number of backbone
forward passes each image costs.

Models are built offline with random weights through our factory (``dinotxt.create_model``,
timm ``pretrained=False``); speed does not depend on the weights. Default architectures:
``dinotxt_demo`` (the CPU demo: ViT-S/14 reg4 cut to 4 blocks, 1 head block) and
``dinotxt_vits14_reg4`` (full ViT-S/14 reg4, 2 head blocks, 512 x 12 text tower); add
``--arch dinotxt_vitb14_reg4`` for ViT-B (about 3x slower than ViT-S).

Inputs are synthetic RGB noise images (PIL) of 375 x 500, the size of a typical Pascal VOC /
ADE20K image, queried against 150 classes (ADE20K names; random unit class embeddings of the
patch half, so the text tower is timed on its own below). Everything ``segment_batch`` does
per image is inside the timed loop: the short-side resize to 512 (375 x 500 -> 512 x 682),
normalisation, the backbone and head, cosine maps, upsampling, softmax, the resize back to
375 x 500 and the argmax, exactly as ``dinotxt.evaluation.segmentation`` calls it
(``keep_scores=False``, ``output_sizes`` = the label size).

Rows (per architecture):
  whole, batched      ``segment_batch`` in whole mode on ``--images`` images at once (same size,
                      so one backbone pass over the batch), as the evaluation loop runs whole mode.
  whole, 1 at a time  ``segment_batch`` in whole mode on one image per call.
  slide (baseline)    ``segment_batch`` in slide mode on one image per call (the official protocol,
                      as the evaluation loop runs it): 384 x 384 windows at stride 192 (each
                      resized to 378 x 378, a multiple of the patch), ``--window-batch`` windows
                      per backbone call.
  zero-shot encode    ``model.encode_image`` on 224 x 224 tensors, ``--zs-batch`` per call, plus the
                      logits against 1000 class embeddings (the ImageNet protocol's image side).
  text side           ``zero_shot_classifier(..., half="patch")`` (what ``dense_classifier`` runs):
                      ``--text-classes`` class names x the 80 ImageNet templates, CLIP BPE
                      tokenisation included; reported as seconds per class and extrapolated to
                      150 classes (ADE20K) and 1000 (ImageNet), since every class costs the same
                      80 prompts (the ViT-S text tower needs ~10 min on 2 cores for all 150).

Columns: images/s (median over interleaved rounds; classes/s for the text row), ms per image,
backbone forwards per image twice: from ``dinotxt.inference.dense.forwards_per_image`` (images
the backbone sees per input image: 1 in whole mode, the number of windows in slide mode) and
counted by a forward hook on ``model.backbone`` (the images in the batches it received, per
input image), plus the hooked number of backbone *calls* per image (windows and images are
batched, so fewer calls than passes), the speed relative to slide mode of the same model (for
the zero-shot row only a ratio of images/s: 224 px classification, not segmentation) and the
round-to-round spread, (max - min) / median.

Timing: the rows are interleaved (each row processes its images, in turn, for several
rounds) so a noisy shared machine slows them alike; the figure is the median over rounds.

    python bench/eval_speed.py                 # the table (about 4-5 min on 2 busy CPU cores)
    python bench/eval_speed.py --quick         # smoke test in seconds (demo model, small images)
    python bench/eval_speed.py --arch dinotxt_vits14_reg4,dinotxt_vitb14_reg4 --rounds 5 --json speed.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

DEFAULT_ARCHS = "dinotxt_demo,dinotxt_vits14_reg4"
INPUT_SIZE = (375, 500)  # (H, W) of a typical VOC / ADE20K image
ZS_SIZE = 224
IMAGENET_CLASSES = 1000
ADE_CLASSES = 150


# --------------------------------------------------------------------------- inputs


class FoldedTokenizer:
    """CLIP BPE ids folded into a small vocabulary (the demo's 1024 ids, context 32).

    Keeps the token count of every prompt (what the text tower's cost depends on): padding
    stays 0, SOT / EOT become the two largest ids (EOT the largest, as the tower pools at the
    argmax), every other id is folded into ``[1, vocab - 3]``.
    """

    def __init__(self, clip, vocab_size: int, context_length: int):
        self.clip, self.vocab_size, self.context_length = clip, vocab_size, context_length

    def __call__(self, texts):
        ids = self.clip(texts, context_length=self.context_length)
        out = torch.where(ids > 0, 1 + ids % (self.vocab_size - 3), ids)
        out[ids == self.clip.sot_id] = self.vocab_size - 2
        out[ids == self.clip.eot_id] = self.vocab_size - 1
        return out


def make_tokenizer(model):
    from dinotxt.text.clip_bpe import VOCAB_SIZE, ClipTokenizer

    clip = ClipTokenizer(context_length=model.text.context_length)
    if model.text.vocab_size == VOCAB_SIZE:
        return clip
    return FoldedTokenizer(clip, model.text.vocab_size, model.text.context_length)


def noise_images(count: int, size, seed: int = 0):
    """``count`` RGB noise PIL images of (H, W) ``size``, smoothed a little so they compress like photos."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        array = rng.integers(0, 256, size=(size[0], size[1], 3), dtype=np.uint8)
        images.append(Image.fromarray(array).filter(ImageFilter.BoxBlur(2)))
    return images


def random_classifier(num: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=g), dim=-1)


# --------------------------------------------------------------------------- rows


class ForwardCounter:
    """Forward hook on the backbone: calls and images (batch rows) it has seen."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.passes = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.calls += 1
        self.passes += int(inputs[0].shape[0])

    def reset(self) -> None:
        self.calls = self.passes = 0


class Row:
    """One measured configuration. ``run(n)`` processes ``n`` units (images or classes)."""

    def __init__(self, name: str, short: str, arch: str, unit: str, per_round: int, run: Callable[[int], None],
                 formula: Optional[float], counter: Optional[ForwardCounter], baseline: bool = False):
        self.name, self.short, self.arch, self.unit, self.per_round = name, short, arch, unit, per_round
        self._run, self.formula, self.counter, self.baseline = run, formula, counter, baseline
        self.rates: List[float] = []
        self.units = 0
        self.calls = 0
        self.passes = 0

    def run(self, n: int) -> None:
        self._run(n)

    def timed(self, device: torch.device) -> None:
        if self.counter is not None:
            self.counter.reset()
        _sync(device)
        start = time.perf_counter()
        self._run(self.per_round)
        _sync(device)
        self.rates.append(self.per_round / (time.perf_counter() - start))
        self.units += self.per_round
        if self.counter is not None:
            self.calls += self.counter.calls
            self.passes += self.counter.passes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_rows(arch: str, args, device: torch.device, log) -> Tuple[List[Row], Dict]:
    import dinotxt
    from dinotxt.inference.classifier import load_classnames, load_templates, zero_shot_classifier
    from dinotxt.inference.dense import (forwards_per_image, resized_short_side, segment_batch, snap_to_patch,
                                         window_grid)
    from dinotxt.inference.settings import DenseSettings

    torch.manual_seed(0)
    start = time.perf_counter()
    model = dinotxt.create_model(arch).to(device).eval()
    patch = model.patch_size
    counter = ForwardCounter(model.backbone)
    names = (load_classnames("ade20k") * (1 + args.classes // ADE_CLASSES))[:args.classes]
    dense = random_classifier(len(names), model.vision_head.dim, 1).to(device)
    full = random_classifier(IMAGENET_CLASSES, model.embed_dim, 2).to(device)
    tokenizer = make_tokenizer(model)
    templates = load_templates("imagenet")
    text_names = load_classnames("ade20k")[:: max(1, ADE_CLASSES // max(1, args.text_classes))][:args.text_classes]

    height, width = args.input_size
    pool = noise_images(max(args.images, args.slide_images, 2), (height, width), seed=0)
    zs = torch.randn(args.zs_batch, 3, ZS_SIZE, ZS_SIZE, generator=torch.Generator().manual_seed(3)).to(device)
    geometry = DenseSettings(short_side=args.short_side, window=args.window, stride=args.stride)
    sizes = [(height, width)]

    def seg(mode: str, per_call: int) -> Callable[[int], None]:
        def run(n: int) -> None:
            for i in range(0, n, per_call):
                imgs = pool[i:i + per_call] if per_call > 1 else [pool[i % len(pool)]]
                settings = geometry.but(mode=mode, batch_size=per_call if mode == "whole" else args.window_batch)
                segment_batch(model, imgs, dense, names, settings, output_sizes=sizes * len(imgs), keep_scores=False)
        return run

    @torch.no_grad()
    def zero_shot(n: int) -> None:
        for i in range(0, n, args.zs_batch):
            feats = model.encode_image(zs[:min(args.zs_batch, n - i)], normalize=True).float()
            (feats @ full.t()).argmax(dim=1)

    def text(n: int) -> None:
        for i in range(n):
            zero_shot_classifier(model, tokenizer, [text_names[i % len(text_names)]], templates, half="patch")

    whole_fwd = forwards_per_image(height, width, geometry.but(mode="whole"))
    slide_fwd = forwards_per_image(height, width, geometry.but(mode="slide"))
    rows = [
        Row(f"whole, batched x{args.images}", "whole-batch", arch, "image", args.images, seg("whole", args.images), whole_fwd, counter),
        Row("whole, 1 at a time", "whole-1", arch, "image", args.images, seg("whole", 1), whole_fwd, counter),
        Row(f"slide, 1 at a time ({args.window_batch} win/call)", "slide", arch, "image", args.slide_images, seg("slide", 1),
            slide_fwd, counter, baseline=True),
        Row(f"zero-shot encode {ZS_SIZE}px x{args.zs_batch}", "zero-shot", arch, "image", args.zs_batch, zero_shot, 1, counter),
        Row("text: 80 templates / class", "text", arch, "class", args.text_classes, text, None, counter),
    ]
    prepared = resized_short_side(height, width, args.short_side)
    boxes = window_grid(*prepared, args.window, args.stride)
    win = (boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2])
    snapped = lambda hw: tuple(snap_to_patch(s, patch) for s in hw)  # noqa: E731
    whole_in, win_in = snapped(prepared), snapped(win)
    info = {
        "arch": arch, "patch": patch, "backbone": model.config.backbone.name,
        "backbone_depth": len(getattr(model.backbone.encoder, "blocks", [])), "width": model.backbone.embed_dim,
        "head_blocks": model.config.vision_head.num_blocks,
        "text": f"{model.text.backbone.positional_embedding.shape[1]} x {len(model.text.backbone.blocks)}",
        "input": [height, width], "prepared": list(prepared), "whole_model_input": list(whole_in),
        "windows": len(boxes), "window_size": list(win), "window_model_input": list(win_in),
        "classes": len(names), "build_s": time.perf_counter() - start,
    }
    log(f"[bench] {arch}: {info['backbone']} ({info['backbone_depth']} blocks, width {info['width']}), "
        f"{info['head_blocks']} head block(s), text {info['text']}; built in {info['build_s']:.1f} s")
    log(f"        {height}x{width} input -> {prepared[0]}x{prepared[1]} prepared; whole: {whole_in[0]}x{whole_in[1]} "
        f"({whole_in[0] // patch}x{whole_in[1] // patch} patches); slide: {len(boxes)} windows of {win[0]}x{win[1]} "
        f"-> {win_in[0]}x{win_in[1]} ({win_in[0] // patch}x{win_in[1] // patch} patches); {len(names)} classes")
    return rows, info


def time_rows(rows: List[Row], rounds: int, device: torch.device, log) -> None:
    """Warm every row up (one small call), then run them in turn for ``rounds`` rounds."""
    for row in rows:
        row.run(min(row.per_round, 2 if row.short == "whole-batch" else 1))
    for r in range(rounds):
        for row in rows:
            row.timed(device)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{row.short} {row.rates[-1]:.2f}"
                                                    for row in rows))


# --------------------------------------------------------------------------- main


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=None, help=f"comma-separated registry names (default: {DEFAULT_ARCHS})")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 3; --quick 2)")
    p.add_argument("--images", type=int, default=None, help="images per round of the whole rows = the whole batch (default 3)")
    p.add_argument("--slide-images", type=int, default=None, help="images per round of the slide row (default 2)")
    p.add_argument("--window-batch", type=int, default=8, help="slide windows per backbone call (segment_batch's batch_size)")
    p.add_argument("--zs-batch", type=int, default=None, help="zero-shot images per encode_image call (default 32)")
    p.add_argument("--text-classes", type=int, default=None, help="class names timed per round on the text side (default 2)")
    p.add_argument("--classes", type=int, default=ADE_CLASSES, help="classes queried in segmentation")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default 375 500)")
    p.add_argument("--short-side", type=int, default=None, help="short side before inference (default 512)")
    p.add_argument("--window", type=int, default=None, help="slide window (default 384)")
    p.add_argument("--stride", type=int, default=None, help="slide stride (default 192)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test in seconds: demo model, 120x160 images, short side 160, window 112 / stride 56")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    p.add_argument("--device", default="cpu", help="cpu (the requirement) or cuda")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    from dinotxt.inference.settings import DEFAULTS

    quick = args.quick
    defaults = {"arch": "dinotxt_demo" if quick else DEFAULT_ARCHS, "rounds": 2 if quick else 3,
                "images": 2 if quick else 3, "slide_images": 1 if quick else 2, "zs_batch": 8 if quick else 32,
                "text_classes": 1 if quick else 2, "input_size": (120, 160) if quick else INPUT_SIZE,
                "short_side": 160 if quick else DEFAULTS.short_side, "window": 112 if quick else DEFAULTS.window,
                "stride": 56 if quick else DEFAULTS.stride}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("rounds", "images", "slide_images", "zs_batch", "text_classes", "classes", "window_batch"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    from dinotxt.config import list_models

    unknown = [a for a in archs if a not in list_models()]
    if unknown:
        p.error(f"unknown architecture {unknown[0]!r}; registered: {', '.join(list_models())}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    log(f"[bench] {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}), "
        f"torch {torch.__version__}, {args.rounds} interleaved rounds per row, random-weight models"
        + (" [--quick: small images and windows, not the protocol]" if quick else ""))
    results: Dict = {"device": str(device), "threads": args.threads, "rounds": args.rounds, "quick": quick,
                     "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                                  if k not in ("json", "quick", "device", "threads", "rounds")},
                     "models": [], "rows": []}
    table: List[Row] = []
    for arch in archs:
        rows, info = build_rows(arch, args, device, log)
        time_rows(rows, args.rounds, device, log)
        results["models"].append(info)
        table.extend(rows)
        for row in rows:
            row._run = None  # drop the model and its inputs before the next architecture
        for row in rows:
            if row.counter is not None:
                row.counter.handle.remove()
                row.counter = None

    print()
    head = (f"{'model':<22}{'row':<34}{'images/s':>10}{'ms/image':>10}{'fwd/img':>9}{'hooked':>8}"
            f"{'calls/img':>11}{'x slide':>9}{'spread':>8}")
    print(head)
    print(f"{'':<56}{'':>10}{'':>10}{'formula':>9}{'passes':>8}")
    spreads = []
    for row in table:
        median = statistics.median(row.rates)
        spread = (max(row.rates) - min(row.rates)) / median
        spreads.append(spread)
        base = next((r for r in table if r.arch == row.arch and r.baseline), None)
        ratio = median / statistics.median(base.rates) if base and row.unit == "image" else None
        passes, calls = row.passes / row.units, row.calls / row.units
        entry = {"arch": row.arch, "row": row.name, "unit": row.unit, "per_s": median, "ms_per_unit": 1000 / median,
                 "rounds_per_s": row.rates, "forwards_per_image_formula": row.formula,
                 "forwards_per_image_hooked": passes, "backbone_calls_per_image": calls, "x_slide": ratio,
                 "spread": spread}
        results["rows"].append(entry)
        if row.unit == "class":
            print(f"{row.arch:<22}{row.name:<34}{median:>10.3f}{1000 / median:>10.0f}{'-':>9}{_fmt(passes, '.0f'):>8}"
                  f"{_fmt(calls, '.0f'):>11}{'-':>9}{100 * spread:>7.0f}%   (classes/s, ms/class)")
            continue
        ratio_s = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"{row.arch:<22}{row.name:<34}{median:>10.2f}{1000 / median:>10.0f}{_fmt(row.formula, 'g'):>9}"
              f"{_fmt(passes, 'g'):>8}{_fmt(calls, '.3g'):>11}{ratio_s:>9}{100 * spread:>7.0f}%")
        if row.formula is not None and passes is not None and abs(passes - row.formula) > 1e-9:
            print(f"  !! {row.arch} {row.name}: forwards_per_image says {row.formula} but the hook counted {passes:g}")
    print(f"(median of {args.rounds} interleaved rounds; spread: (max - min) / median over the rounds; "
          f"fwd/img: images through the backbone per input image; calls/img: batched backbone calls per input image)")

    print()
    print(f"{'text side (dense_classifier)':<30}{'s/class':>9}{'ms/prompt':>11}{f'{ADE_CLASSES} classes s':>15}"
          f"{f'{IMAGENET_CLASSES} classes s':>16}")
    results["text"] = []
    for row in table:
        if row.unit != "class":
            continue
        per_class = 1 / statistics.median(row.rates)
        est = {"arch": row.arch, "s_per_class": per_class, "ms_per_prompt": 1000 * per_class / 80,
               f"est_s_{ADE_CLASSES}_classes": per_class * ADE_CLASSES,
               f"est_s_{IMAGENET_CLASSES}_classes": per_class * IMAGENET_CLASSES}
        results["text"].append(est)
        print(f"{row.arch:<30}{per_class:>9.2f}{est['ms_per_prompt']:>11.1f}{per_class * ADE_CLASSES:>15.0f}"
              f"{per_class * IMAGENET_CLASSES:>16.0f}")
    print(f"(measured on {args.text_classes} class name(s) x 80 ImageNet templates per round, CLIP BPE "
          f"tokenisation included; the class counts are extrapolated: every class costs the same 80 prompts)")
    total = time.perf_counter() - started
    print(f"[bench] done in {total:.0f} s")
    results["seconds"] = total
    if args.json:
        from dinotxt.utils.fileio import atomic_write_json

        atomic_write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
