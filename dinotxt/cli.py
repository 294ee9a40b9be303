"""The ``dinotxt`` command line.

    dinotxt train RECIPE [key=value ...] [--resume]
    dinotxt tokenizer train --data SHARDS_OR_MANIFEST --out tok.model [--vocab-size N]
    dinotxt eval zeroshot --checkpoint DIR --data IMAGE_FOLDER [--classnames F] [--templates T]
    dinotxt demo [key=value ...]
    dinotxt export CHECKPOINT --format official|safetensors [--out PATH] [--include-backbone]
    dinotxt models

User errors (bad config, missing files, wrong checkpoints) print one line and exit 2;
set DINOTXT_DEBUG=1 to see the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _cmd_train(args) -> int:
    from .train.run import run_training

    metrics = run_training(args.recipe, args.overrides, resume=args.resume)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_cache(args) -> int:
    from .cache import build_cache
    from .config import load_train_config
    from .train.run import generate_world

    cfg = load_train_config(args.recipe, args.overrides)
    generate_world(cfg)
    summary = build_cache(cfg, device=args.device)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_tokenizer_train(args) -> int:
    from omegaconf import OmegaConf

    from .config import TrainConfig
    from .tokenizer import train_tokenizer
    from .train.run import _captions_for_tokenizer

    cfg = OmegaConf.structured(TrainConfig)
    cfg.data.train = args.data
    captions = _captions_for_tokenizer(cfg, args.max_sentences)
    tok = train_tokenizer(captions, args.vocab_size, args.context_length)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.vocab_size} ids (SOT={tok.sot_id}, EOT={tok.eot_id}) from {len(captions):,} captions")
    return 0


def _cmd_eval_zeroshot(args) -> int:
    from .checkpoint import load
    from .evaluation.zeroshot import evaluate_zeroshot

    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    model, transform, tokenizer = load(args.checkpoint, device=device, backbone_weights=args.backbone_weights)
    res = evaluate_zeroshot(model, transform, tokenizer, args.data, args.classnames, args.templates,
                            args.batch_size, args.num_workers, device)
    print(f"{'dataset':<28}{'images':>8}{'classes':>9}{'top-1':>8}{'top-5':>8}{'mean recall':>13}{'chance':>8}")
    print(f"{os.path.basename(os.path.normpath(args.data)):<28}{res['num_images']:>8}{res['num_classes']:>9}"
          f"{100 * res['top1']:>7.1f}%{100 * res['top5']:>7.1f}%{100 * res['mean_per_class_recall']:>12.1f}%"
          f"{100 * res['chance_top1']:>7.1f}%")
    if args.json:
        print(json.dumps(res))
    return 0


def _cmd_demo(args) -> int:
    from .demo.run import run_demo

    run_demo(args.overrides, fresh=args.fresh)
    return 0


def _cmd_export(args) -> int:
    from .export import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.format, args.out, layout=args.layout,
                               include_backbone=args.include_backbone, backbone_weights=args.backbone_weights)
    if args.format == "official":
        print(f"wrote {', '.join(report['files'])} ({report['layout']} release layout) and export.json to {report['out']}")
        for note in report["notes"]:
            print(f"note: {note}")
    else:
        backbone = " with the frozen backbone" if report["includes_backbone"] else ""
        print(f"wrote {report['out']} ({report['bytes'] / 2**20:.1f} MiB{backbone}); load it with dinotxt.load")
    return 0


def _cmd_models(args) -> int:
    from .config import list_models

    print("\n".join(list_models()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinotxt", description="Align text to a frozen vision encoder (dino.txt / LiT).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an aligner from a recipe YAML")
    t.add_argument("recipe", help="recipe YAML (e.g. recipes/debug.yaml)")
    t.add_argument("overrides", nargs="*", help="key=value overrides (e.g. optim.lr=3e-4)")
    t.add_argument("--resume", action="store_true", help="continue the run in the recipe's run folder")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("cache", help="run the frozen backbone once over data.train and store its tokens (feature cache)")
    c.add_argument("recipe", help="recipe YAML; cache.* settings say where and how (e.g. cache.path=runs/cache)")
    c.add_argument("overrides", nargs="*", help="key=value overrides (e.g. cache.views=4 cache.dtype=bfloat16)")
    c.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
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
    z = ev.add_parser("zeroshot", help="zero-shot classification on an image folder (one folder per class)")
    z.add_argument("--checkpoint", required=True, help="dinotxt checkpoint folder (runs/NAME/checkpoint)")
    z.add_argument("--data", required=True, help="image folder: DIR/<class name>/<image>")
    z.add_argument("--classnames", default=None, help="text file with one class name per line (folder order)")
    z.add_argument("--templates", default="imagenet", help="imagenet | simple | a text file of templates with {}")
    z.add_argument("--batch-size", type=int, default=64)
    z.add_argument("--num-workers", type=int, default=2)
    z.add_argument("--device", default=None)
    z.add_argument("--backbone-weights", default=None, help="backbone weights file, if it moved since training")
    z.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    z.set_defaults(func=_cmd_eval_zeroshot)

    d = sub.add_parser("demo", help="the built-in end-to-end demo (no downloads)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of recipes/demo.yaml")
    d.add_argument("--fresh", action="store_true", help="discard a previous demo run and start again")
    d.set_defaults(func=_cmd_demo)

    x = sub.add_parser("export", help="write a checkpoint in the official dino.txt layout or as one safetensors file")
    x.add_argument("checkpoint", help="checkpoint folder (runs/NAME/checkpoint) or single .safetensors file")
    x.add_argument("--format", required=True, choices=["official", "safetensors"],
                   help="official: *_vision_head.pth + *_text_encoder.pth (the official code loads them); "
                        "safetensors: one self-describing file for dinotxt.load")
    x.add_argument("--out", default=None, help="output folder (official) or file (safetensors); default next to CHECKPOINT")
    x.add_argument("--layout", default=None, choices=["dinov2", "dinov3"],
                   help="official layout: dinov2 (two files) or dinov3 (one file); default from the backbone")
    x.add_argument("--include-backbone", action="store_true", help="safetensors: also store the frozen backbone")
    x.add_argument("--backbone-weights", default=None, help="backbone weights file, if it moved since training")
    x.set_defaults(func=_cmd_export)

    m = sub.add_parser("models", help="list registered model configs")
    m.set_defaults(func=_cmd_models)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (``train R --resume optim.max_steps=30``)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if os.environ.get("DINOTXT_DEBUG"):
        return args.func(args)
    from .config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, ImportError, FloatingPointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"dinotxt: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinotxt: interrupted; finished checkpoints are kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
