"""``dinotxt eval suite RECIPE``: several evaluations of one model from a short YAML file.

The recipe names the model and a list of tasks; the run writes ``results.json`` (every
metric, the resolved recipe, timings) and ``results.md`` (one table) to
``output_dir/name/``, plus each segmentation task's report folder. The model is a dinotxt
checkpoint, an open_clip architecture (a registered name or your own JSON config file;
random weights unless ``pretrained`` names a tag or a local file), or any loader
``package.module:function`` returning ``(model, transform, tokenizer)`` like CLIP_benchmark's.
Zero-shot and retrieval only need ``encode_image`` / ``encode_text``; segmentation needs a
dinotxt model (``encode_patches``)::

    name: demo_suite
    output_dir: runs/eval
    model:
      checkpoint: runs/demo/checkpoint
    tasks:
      - {task: zeroshot, dataset: folder, root: runs/demo_world/eval/classes, templates: simple}
      - {task: segmentation, dataset: demo, root: runs/demo_world/eval, templates: simple}
      - {task: retrieval, dataset: shards, root: runs/demo_world/eval}

Every dataset is opened before the model loads, so a wrong path fails in the first second.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from ..config import ConfigError, choice, compose, finalize, find_recipe, merge_config
from ..utils.fileio import atomic_write_json, atomic_write_text
from ..inference.settings import DEFAULTS as DENSE
from ..inference.settings import EXAMPLE_OVERLAYS, MODES, DenseSettings

log = logging.getLogger(__name__)

TASKS = ("zeroshot", "segmentation", "retrieval")


@dataclass
class SuiteModelConfig:
    checkpoint: Optional[str] = None  # dinotxt checkpoint folder (runs/NAME/checkpoint), file or hf-hub:org/name
    backbone_weights: Optional[str] = None  # the frozen backbone's weights, if they moved since training
    open_clip: Optional[str] = None  # open_clip architecture name (e.g. ViT-B-32) or a JSON model config file
    pretrained: Optional[str] = None  # open_clip pretrained tag or local weights file; None = random init
    loader: Optional[str] = None  # "package.module:function" returning (model, transform, tokenizer)
    loader_kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of the loader
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    # checkpoint: the zero-shot transform when not the model's own protocol (its config's zeroshot section)
    image_size: Optional[int] = None
    crop_fraction: Optional[float] = None


@dataclass
class SuiteTaskConfig:
    task: str = choice("zeroshot", *TASKS)
    dataset: str = "folder"  # zeroshot: imagenet | folder; segmentation: ade20k ... demo | custom; retrieval: coco | flickr30k | shards
    root: Optional[str] = None  # dataset folder (or shards)
    name: Optional[str] = None  # label in the report (default: task/dataset)
    split: Optional[str] = None  # dataset split (default: val for segmentation, test for retrieval)
    classnames: Optional[str] = None  # class-name file (or a shipped list name) overriding the defaults
    templates: str = DENSE.templates  # imagenet (80) | ovseg (14) | simple | a file with {} templates
    annotations: Optional[str] = None  # retrieval: the caption JSON (default: looked up under root)
    # segmentation: the dense inference settings (dinotxt.inference.settings.DenseSettings)
    mode: str = choice(DENSE.mode, *MODES)
    short_side: Optional[int] = DENSE.short_side  # image short side before inference
    window: int = DENSE.window  # slide window
    stride: int = DENSE.stride  # slide stride
    logit_scale: float = DENSE.logit_scale  # cosine multiplier before the softmax
    background_threshold: Optional[float] = DENSE.background_threshold  # background below this probability
    reduce_zero_label: bool = False  # segmentation, custom layout: label 0 ignored, others - 1
    has_background: bool = False  # segmentation, custom layout: label 0 is background
    limit: Optional[int] = None  # segmentation: first N images only
    num_examples: int = EXAMPLE_OVERLAYS  # segmentation: example overlays written
    batch_size: int = 64  # zeroshot / retrieval image batch
    num_workers: int = 0  # dataloader workers


@dataclass
class SuiteConfig:
    name: str = "suite"  # the run folder under output_dir
    output_dir: str = "runs/eval"
    model: SuiteModelConfig = field(default_factory=SuiteModelConfig)
    tasks: List[Any] = field(default_factory=list)  # SuiteTaskConfig entries, checked one by one


def load_suite_config(path: str, overrides: Optional[List[str]] = None):
    """Defaults <- recipe <- ``key=value`` overrides (``dinotxt.config.compose``), every key checked (tasks one
    by one against ``SuiteTaskConfig``)."""
    path = str(find_recipe(path))
    return compose(SuiteConfig, path, overrides, check=lambda cfg: check_suite(cfg, path))


def check_suite(cfg, path: str):
    """Each task merged over its defaults and checked; the model names exactly one source; task names unique."""
    tasks = cfg.tasks or []
    if not len(tasks):
        raise ConfigError(f"{path} has no tasks: add a list 'tasks:' of {{task, dataset, root}} entries")
    resolved = []
    for i, t in enumerate(tasks):
        source = f"{path} tasks[{i}]"
        task = merge_config(OmegaConf.structured(SuiteTaskConfig), t, source)
        try:
            finalize(task)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if not task.root:
            raise ConfigError(f"{source}: set root: the {task.dataset} dataset folder")
        if task.name is None:
            task.name = f"{task.task}/{task.dataset}"
        resolved.append(task)
    cfg.tasks = resolved
    sources = [k for k in ("checkpoint", "open_clip", "loader") if cfg.model.get(k)]
    if len(sources) != 1:
        raise ConfigError(f"{path}: the model needs exactly one of model.checkpoint, model.open_clip, model.loader "
                          f"(got {', '.join(sources) or 'none'})")
    names = [t.name for t in resolved]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"{path}: two tasks are called '{dup}'; give them distinct name: fields")
    return cfg


def load_model(mcfg, trust_code: bool = False) -> Tuple[Any, Any, Any, str]:
    """(model, transform, tokenizer, description) for the suite's model section; a ``loader`` import path
    (or a checkpoint whose backbone is one) needs ``trust_code=True``."""
    device = mcfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if mcfg.checkpoint:
        from ..checkpoint import load

        model, transform, tokenizer = load(mcfg.checkpoint, device=device, backbone_weights=mcfg.backbone_weights,
                                           trust_code=trust_code, image_size=mcfg.image_size,
                                           crop_fraction=mcfg.crop_fraction)
        return model, transform, tokenizer, f"dinotxt checkpoint {mcfg.checkpoint}"
    if mcfg.open_clip:
        import open_clip

        name = mcfg.open_clip
        if name.endswith(".json"):
            config = Path(name)
            if not config.is_file():
                raise FileNotFoundError(f"open_clip model config not found: {config}")
            open_clip.add_model_config(config)
            name = config.stem
        if name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model '{name}' (open_clip.list_models() lists them, or give a JSON config)")
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=mcfg.pretrained, device=device)
        what = f"open_clip {name} ({'weights ' + mcfg.pretrained if mcfg.pretrained else 'random init'})"
        return model.eval(), transform, open_clip.get_tokenizer(name), what
    from ..utils.plugins import import_object

    loader = import_object(mcfg.loader, trust_code=trust_code, setting="model.loader")
    loaded = loader(device=device, **OmegaConf.to_container(mcfg.loader_kwargs))
    if not (isinstance(loaded, tuple) and len(loaded) == 3):
        raise ValueError(f"loader {mcfg.loader} must return (model, transform, tokenizer)")
    model, transform, tokenizer = loaded
    return model.eval(), transform, tokenizer, f"loader {mcfg.loader}"


def _open_dataset(task):
    """Open the task's dataset (checks the layout) before any model is loaded."""
    from .datasets import retrieval_dataset, segmentation_dataset, zeroshot_folder

    if task.task == "segmentation":
        return segmentation_dataset(task.dataset, task.root, task.split or "val", task.classnames,
                                    task.reduce_zero_label, task.has_background)
    if task.task == "retrieval":
        return retrieval_dataset(task.dataset, task.root, task.annotations, task.split or "test")
    return zeroshot_folder(task.dataset, task.root, task.classnames)


def _rows(task, res: Dict) -> List[Tuple[str, float, Optional[float]]]:
    """(metric, value, chance or trivial baseline) rows of the summary table."""
    if task.task == "zeroshot":
        rows = [("top-1", res["top1"], res["chance_top1"]), ("top-5", res["top5"], min(1.0, 5 * res["chance_top1"])),
                ("mean per-class recall", res["mean_per_class_recall"], res["chance_top1"])]
        if "worst_group_top1" in res:  # the folder lists its groups (groups.csv, the spurious world)
            rows.append((f"worst-group top-1 ({res['worst_group']})", res["worst_group_top1"], res["chance_top1"]))
        return rows
    if task.task == "segmentation":
        rows = [("mIoU", res["miou"], res["baseline_majority_miou"]), ("pixel accuracy", res["aacc"], None),
                ("mean class accuracy", res["macc"], None)]
        if "baseline_all_background_miou" in res:
            rows.append(("mIoU of all-background", res["baseline_all_background_miou"], None))
        return rows
    rows = []
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            rows.append((f"{direction.replace('_to_', '->').replace('image', 'img').replace('text', 'txt')} R@{k}",
                         res[f"{direction}_R@{k}"], min(1.0, k * res["chance_R@1"])))
    return rows


def markdown_table(results: Dict) -> str:
    lines = [f"# {results['name']}", "",
             f"model: {results['model']}  ", f"finished: {results['finished']} ({results['seconds']:.0f} s)", "",
             "| task | dataset | images | metric | value | chance / trivial |", "|---|---|---:|---|---:|---:|"]
    for t in results["tasks"]:
        for metric, value, ref in t["rows"]:
            ref_s = "" if ref is None else f"{100 * ref:.1f}"
            lines.append(f"| {t['name']} | {t['dataset']} | {t['num_images']} | {metric} | {100 * value:.1f} | {ref_s} |")
    lines += ["", "Values in percent. Trivial baseline of mIoU: every pixel predicted as the most frequent class."]
    return "\n".join(lines) + "\n"


def run_suite(recipe: str, overrides: Optional[List[str]] = None, trust_code: bool = False) -> Dict:
    """Run every task of the recipe; returns the results dict written to ``results.json``. ``trust_code``
    lets the recipe name code by import path (``model.loader``)."""
    from .retrieval import evaluate_retrieval
    from .segmentation import evaluate_segmentation
    from .zeroshot import evaluate_zeroshot

    cfg = load_suite_config(recipe, overrides)
    datasets = [_open_dataset(t) for t in cfg.tasks]
    start = time.time()
    model, transform, tokenizer, what = load_model(cfg.model, trust_code)
    dense = hasattr(model, "encode_patches") and hasattr(model, "dense_text")
    seg = [t.name for t in cfg.tasks if t.task == "segmentation"]
    if seg and not dense:
        raise ValueError(f"task {seg[0]} needs dense patch features (encode_patches), which {what} does not have; "
                         "segmentation works with dinotxt checkpoints")
    out_dir = Path(cfg.output_dir) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    tasks = []
    for task, data in zip(cfg.tasks, datasets):
        t0 = time.time()
        log.info(f"suite {cfg.name}: {task.name} ...")
        if task.task == "zeroshot":
            folder, names = data
            res = evaluate_zeroshot(model, transform, tokenizer, folder, names, task.templates, task.batch_size,
                                    task.num_workers, device)
            res.pop("confusion"), res.pop("classnames")
        elif task.task == "segmentation":
            settings = DenseSettings(**{k: task[k] for k in DenseSettings.names() if k in task})
            res = evaluate_segmentation(model, tokenizer, data, settings, task.limit,
                                        out_dir / task.name.replace("/", "_"), task.num_examples)
            res.pop("confusion")
        else:
            res = evaluate_retrieval(model, transform, tokenizer, data, task.batch_size, task.num_workers)
        rows = _rows(task, res)
        tasks.append({"name": task.name, "task": task.task, "dataset": task.dataset, "root": task.root,
                      "num_images": res["num_images"], "metrics": res, "rows": rows, "seconds": round(time.time() - t0, 1)})
    results = {
        "name": cfg.name,
        "model": what,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": round(time.time() - start, 1),
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "tasks": tasks,
    }
    atomic_write_json(out_dir / "results.json", json.loads(json.dumps(results, default=float)))
    atomic_write_text(out_dir / "results.md", markdown_table(results))
    results["output_dir"] = str(out_dir)
    return results
