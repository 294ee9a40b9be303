"""Building blocks shared by the trainable vision head and the text tower, one per file (as in
DINOv2's ``dinov2/layers``): attention with a causal flag, drop path, LayerScale, SwiGLU."""
from .attention import Attention, attention
from .drop_path import DropPath, StochasticResidual, batch_subset_residual, subset_size
from .layer_scale import LayerScale
from .swiglu import SwiGLU, swiglu_hidden_dim

__all__ = ["Attention", "attention", "DropPath", "StochasticResidual", "batch_subset_residual", "subset_size", "LayerScale", "SwiGLU", "swiglu_hidden_dim"]
