"""The settings of dense open-vocabulary inference, in one object (no torch import, so the
command line can show its defaults without loading the library)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Tuple, Union

MODES = ("slide", "whole")


@dataclass(frozen=True)
class DenseSettings:
    """How dense inference runs: every command, the evaluation and the suite take one of these
    (the defaults are the official protocol, METHOD.md section 4, and are written here only).

    Args:
        mode: ``slide`` (windows averaged by visit count, official) or ``whole`` (one pass).
        short_side: the image's short side before inference (None keeps the size).
        window, stride: slide window side and step, in pixels of the resized image.
        logit_scale: cosine multiplier before the softmax (1 = the plain cosine of the protocol).
        background_threshold: pixels whose best class probability is below it become background.
        templates: prompt ensemble of the class embeddings (``imagenet`` 80, ``ovseg`` 14,
            ``simple``, a file, or a list).
        batch_size: windows (slide) or images (whole) per forward pass; memory only.
    """

    mode: str = "slide"
    short_side: Optional[int] = 512
    window: int = 384
    stride: int = 192
    logit_scale: float = 1.0
    background_threshold: Optional[float] = None
    templates: Union[str, Tuple[str, ...]] = "imagenet"
    batch_size: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown segmentation mode '{self.mode}' (use {' or '.join(MODES)})")
        if self.window <= 0 or self.stride <= 0:
            raise ValueError(f"window ({self.window}) and stride ({self.stride}) must be positive")
        if self.stride > self.window:
            raise ValueError(f"stride {self.stride} is larger than the window {self.window}: pixels between windows "
                             "would get no score")
        if self.short_side is not None and self.short_side <= 0:
            object.__setattr__(self, "short_side", None)  # 0 on the command line: keep the size
        if not isinstance(self.templates, str):
            object.__setattr__(self, "templates", tuple(self.templates))

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def but(self, **changes) -> "DenseSettings":
        """A copy with some settings changed; an unknown name is a TypeError naming it."""
        return replace(self, **changes)


DEFAULTS = DenseSettings()


__all__ = ["MODES", "DenseSettings", "DEFAULTS"]
