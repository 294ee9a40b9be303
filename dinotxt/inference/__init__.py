"""Using an aligned model: zero-shot classifiers from prompt ensembles (``classifier``), dense
open-vocabulary prediction (``dense``, its settings in ``settings``), and the pictures made from
it (``visualize``). Loaded on first use, so ``settings`` imports without torch."""
from ..utils.plugins import lazy_attributes

_API = {"load_classnames": "classifier", "load_templates": "classifier", "zero_shot_classifier": "classifier",
        "DenseSettings": "settings", "SegmentationResult": "dense", "segment": "dense", "segment_batch": "dense"}

__all__ = sorted(_API)


__getattr__ = lazy_attributes(__name__, _API)
