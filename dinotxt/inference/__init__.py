"""Using an aligned model: zero-shot classifiers from prompt ensembles (``classifier``), dense
open-vocabulary prediction (``dense``, its settings in ``settings``), and the pictures made from
it (``visualize``). Loaded on first use, so ``settings`` imports without torch."""
from importlib import import_module

_API = {"load_classnames": "classifier", "load_templates": "classifier", "zero_shot_classifier": "classifier",
        "DenseSettings": "settings", "SegmentationResult": "dense", "segment": "dense", "segment_batch": "dense"}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dinotxt.inference' has no attribute {name!r}")
