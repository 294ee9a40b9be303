"""A dinotxt loader in the form CLIP_benchmark (LAION-AI/CLIP_benchmark) expects.

CLIP_benchmark builds every model through a loading function
``load(model_name, pretrained, cache_dir, device) -> (model, transform, tokenizer)`` and then
only calls ``model.encode_image(images)``, ``model.encode_text(tokenizer(texts))`` (it
normalises the features itself) and ``transform(PIL image)``. ``DinoTxt`` and the dinotxt
tokenizer already have that interface, so the loader just opens a checkpoint folder.

Use it from Python::

    from dinotxt.evaluation.clip_benchmark import register
    register()   # adds model_type "dinotxt" to clip_benchmark.models.TYPE2FUNC

or run CLIP_benchmark's command line with the loader registered::

    python -m dinotxt.evaluation.clip_benchmark eval --model_type dinotxt \\
        --pretrained runs/demo/checkpoint --dataset cifar10 --dataset_root DIR
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch

MODEL_TYPE = "dinotxt"


def load_dinotxt(model_name: str = MODEL_TYPE, pretrained: Optional[str] = None, cache_dir: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu", backbone_weights: Optional[str] = None, **_: object):
    """``(model, transform, tokenizer)`` of a dinotxt checkpoint, CLIP_benchmark's loader signature.

    Args:
        model_name: unused (the checkpoint's config names the architecture).
        pretrained: the checkpoint folder (``runs/NAME/checkpoint``).
        cache_dir: unused (nothing is downloaded).
        device: where the model goes.
        backbone_weights: the frozen backbone's weights file, if it moved since training.
    """
    from ..checkpoint import load

    if not pretrained:
        raise ValueError("pass the dinotxt checkpoint folder as pretrained= (CLIP_benchmark: --pretrained DIR)")
    model, transform, tokenizer = load(pretrained, device=device, backbone_weights=backbone_weights)
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


def main(argv=None) -> int:
    register()
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    return clip_benchmark_main() or 0


if __name__ == "__main__":
    sys.exit(main())
