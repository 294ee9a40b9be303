"""dinotxt in CLIP_benchmark (LAION-AI/CLIP_benchmark): its model type, and its dataset format.

CLIP_benchmark builds every model through a loading function
``load(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)`` and then
only calls ``model.encode_image(images)``, ``model.encode_text(tokenizer(texts))`` (it
normalises the features itself) and ``transform(PIL image)``. ``DinoTxt`` and the dinotxt
tokenizer already have that interface, so the loader just opens a checkpoint: ``--pretrained``
is a checkpoint folder / file or ``hf-hub:org/name``; with ``--model official:<release>`` it is
the folder holding the official release files (``dinotxt.checkpoint.factory``).

Use it from Python::

    from dinotxt.evaluation.clip_benchmark import register
    register()   # adds model_type "dinotxt" to clip_benchmark.models.TYPE2FUNC

or run CLIP_benchmark's own command line with the loader registered (``--no_amp`` keeps CPU
runs in fp32; CLIP_benchmark's default autocasts to bf16 on CPU)::

    python -m dinotxt.evaluation.clip_benchmark eval --model_type dinotxt \\
        --pretrained runs/demo/checkpoint --dataset cifar10 --dataset_root DIR

``write_wds_classification`` / ``write_wds_retrieval`` turn the data ``dinotxt eval zeroshot`` and
``dinotxt eval retrieval --dataset shards`` read (an image folder, webdataset shards) into
CLIP_benchmark's webdataset layout (``--dataset wds/NAME --dataset_root OUT``), image bytes
unchanged, so both tools score the very same images::

    OUT/test/0.tar ...                           key.jpg + key.cls (class index) | key.txt (captions)
    OUT/test/nshards.txt                         number of tar files
    OUT/classnames.txt                           classification: one name per class index
    OUT/zeroshot_classification_templates.txt    classification: prompts with {c}
    OUT/dataset_type.txt                         retrieval: "retrieval"
"""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..utils.fileio import add_tar_member, atomic_output, atomic_write_text

MODEL_TYPE = "dinotxt"
SAMPLES_PER_TAR = 10_000  # CLIP_benchmark's own converter default (max_count)


def load_dinotxt(model_name: str = MODEL_TYPE, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", backbone_weights: Optional[str] = None,
                 image_size: Optional[int] = None, crop_fraction: Optional[float] = None, **_: object):
    """``(model, transform, tokenizer)`` of a dinotxt model, CLIP_benchmark's loader signature.

    Args:
        model_name: ``official:<release>`` for the official dino.txt release; anything else (CLIP_benchmark's
            default ``--model``) means the checkpoint's config names the architecture.
        pretrained: the checkpoint (folder, single file or ``hf-hub:org/name``), or for ``official:`` names
            the folder holding the release files.
        cache_dir: the Hugging Face cache for ``hf-hub:`` names (CLIP_benchmark: ``--model_cache_dir``).
        device: where the model goes.
        backbone_weights: the frozen backbone's weights file, if it moved since training.
        image_size, crop_fraction: the evaluation transform, when not the model's own protocol.
    """
    from ..checkpoint import load
    from ..checkpoint.factory import create_model_from_pretrained, get_tokenizer, is_official_name

    if is_official_name(model_name):
        model, transform = create_model_from_pretrained(model_name, pretrained, device=device)
        return model.eval(), transform, get_tokenizer(model_name, pretrained)
    if not pretrained:
        raise ValueError("pass the dinotxt checkpoint as pretrained= (CLIP_benchmark: --pretrained DIR or hf-hub:org/name)")
    model, transform, tokenizer = load(pretrained, device=device, backbone_weights=backbone_weights, cache_dir=cache_dir,
                                       image_size=image_size, crop_fraction=crop_fraction)
    return model.eval(), transform, tokenizer


def register() -> None:
    """Make ``--model_type dinotxt`` available in an installed CLIP_benchmark."""
    try:
        from clip_benchmark import models
    except ImportError:
        raise ImportError("CLIP_benchmark is not installed: pip install clip-benchmark") from None
    models.TYPE2FUNC[MODEL_TYPE] = load_dinotxt
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)
    _numpy_compat()


def _numpy_compat() -> None:
    """CLIP_benchmark (<= 1.6.2) computes top-k accuracy with ``float(array of shape (1,))``, which NumPy 2.4
    refuses (deprecated since 1.25). Where NumPy refuses it, its ``accuracy`` is replaced by the same
    computation taking the one element with ``.item()``; the numbers are CLIP_benchmark's formula."""
    import numpy as np

    try:
        float(np.ones(1))
        return
    except TypeError:
        pass
    from clip_benchmark.metrics import zeroshot_classification

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        n = len(target)
        return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item()) / n for k in topk]

    zeroshot_classification.accuracy = accuracy


def main(argv=None) -> int:
    """CLIP_benchmark's command line (``clip_benchmark eval ...``) with ``--model_type dinotxt`` registered."""
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    saved = sys.argv
    sys.argv = [saved[0]] + list(saved[1:] if argv is None else argv)
    try:
        return clip_benchmark_main() or 0
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------- the webdataset layout


def _write_tars(out: Path, split: str, samples: Sequence[Tuple[bytes, str, str, bytes]]) -> int:
    """``samples``: (image bytes, image extension, label member extension, label bytes). Returns the tar count."""
    folder = out / split
    count = 0
    for count, start in enumerate(range(0, len(samples), SAMPLES_PER_TAR), start=1):
        with atomic_output(folder / f"{count - 1}.tar") as tmp:
            with tarfile.open(tmp, "w") as tar:
                for i, (image, ext, label_ext, label) in enumerate(samples[start:start + SAMPLES_PER_TAR], start=start):
                    for suffix, data in ((ext, image), (label_ext, label)):
                        add_tar_member(tar, f"s{i:07d}.{suffix}", data)
    atomic_write_text(folder / "nshards.txt", f"{count}\n")
    return count


def _extension(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    return "jpg" if ext == "jpeg" else ext


def write_wds_classification(image_folder: Union[str, Path], out: Union[str, Path], templates: Sequence[str],
                             classnames: Optional[List[str]] = None, split: str = "test") -> dict:
    """An image folder (``DIR/<class>/<image>``, as ``dinotxt eval zeroshot`` reads it: classes in sorted
    folder order, names with ``_`` read as spaces) as a CLIP_benchmark classification dataset.

    Args:
        image_folder: the folder.
        out: the dataset root to write (``--dataset_root``).
        templates: prompts in dinotxt's form (``"a photo of a {}."``); written with CLIP_benchmark's ``{c}``.
        classnames: names per class folder (default: the folder names).
        split: the split folder (CLIP_benchmark's ``--split``).
    """
    from ..data.folder import ImageFolderDataset

    dataset = ImageFolderDataset(str(image_folder))
    names = list(classnames) if classnames is not None else [c.replace("_", " ") for c in dataset.classes]
    if len(names) != len(dataset.classes):
        raise ValueError(f"{len(names)} class names for {len(dataset.classes)} class folders in {image_folder}")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name")
    out = Path(out)
    samples = [(Path(p).read_bytes(), _extension(Path(p).name), "cls", str(label).encode()) for p, label in dataset.samples]
    shards = _write_tars(out, split, samples)
    atomic_write_text(out / "classnames.txt", "".join(f"{n}\n" for n in names))
    atomic_write_text(out / "zeroshot_classification_templates.txt", "".join(f"{t.replace('{}', '{c}')}\n" for t in templates))
    return {"root": str(out), "images": len(samples), "classes": len(names), "shards": shards}


def write_wds_retrieval(shards: Union[str, Path, Sequence[str]], out: Union[str, Path], split: str = "test") -> dict:
    """Webdataset shards with captions (as ``dinotxt eval retrieval --dataset shards`` reads them, every
    caption line of ``key.txt``) as a CLIP_benchmark retrieval dataset."""
    from .datasets import retrieval_dataset

    dataset = retrieval_dataset("shards", shards if isinstance(shards, (str, Path)) else "::".join(shards))
    out = Path(out)
    samples = []
    for item in dataset.items:
        image = item.image if isinstance(item.image, bytes) else Path(item.image).read_bytes()
        kind = "png" if image[:8] == b"\x89PNG\r\n\x1a\n" else "webp" if image[8:12] == b"WEBP" else "jpg"
        samples.append((image, kind, "txt", "\n".join(c.replace("\n", " ") for c in item.captions).encode()))
    tars = _write_tars(out, split, samples)
    atomic_write_text(out / "dataset_type.txt", "retrieval\n")
    return {"root": str(out), "images": len(samples), "texts": len(dataset.texts), "shards": tars}


__all__ = ["MODEL_TYPE", "load_dinotxt", "register", "main", "write_wds_classification", "write_wds_retrieval"]
