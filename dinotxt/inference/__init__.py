"""Using an aligned model: zero-shot classifiers from prompt ensembles (``classifier``), dense
open-vocabulary prediction (``dense``), and the pictures made from it (``visualize``)."""
from .classifier import load_classnames, load_templates, zero_shot_classifier
from .dense import DenseSettings, SegmentationResult, segment, segment_batch

__all__ = ["load_classnames", "load_templates", "zero_shot_classifier", "DenseSettings", "SegmentationResult",
           "segment", "segment_batch"]
