"""The settings of dense open-vocabulary inference, in one object (no torch import, so the
command line can show its defaults without loading the library)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
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

    mode: str = field(default="slide", metadata={"help": "slide windows (official) or one pass", "choices": MODES})
    short_side: Optional[int] = field(default=512, metadata={
        "help": "resize the image's short side to this (0 keeps it)", "type": int})
    window: int = field(default=384, metadata={"help": "slide window side in pixels", "type": int})
    stride: int = field(default=192, metadata={"help": "slide stride in pixels", "type": int})
    logit_scale: float = field(default=1.0, metadata={"help": "cosine multiplier before the softmax", "type": float})
    background_threshold: Optional[float] = field(default=None, metadata={
        "help": "pixels whose best class probability is below this become background", "type": float})
    templates: Union[str, Tuple[str, ...]] = field(default="imagenet", metadata={
        "help": "imagenet (80) | ovseg (14) | simple | a file of templates with {}", "type": str})
    batch_size: int = field(default=8, metadata={
        "help": "windows (slide) or images (whole) per forward pass; memory only", "type": int})

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
EXAMPLE_OVERLAYS = 4  # example overlays an evaluation report writes (prediction | ground truth)


def dense_flags():
    """``(flag, dest, argparse keywords)`` of every setting: the command line declares its dense-inference
    options from this dataclass, so a default or a help text is written once, here."""
    for f in fields(DenseSettings):
        meta = dict(f.metadata)
        default = f.default
        kwargs = {"dest": f.name, "default": default,
                  "help": f"{meta.pop('help')} (default {'none' if default is None else default})", **meta}
        yield "--" + f.name.replace("_", "-"), kwargs


def settings_from(args) -> DenseSettings:
    """The ``DenseSettings`` of parsed command-line arguments made with ``dense_flags``."""
    return DenseSettings(**{name: getattr(args, name) for name in DenseSettings.names()})


__all__ = ["MODES", "DenseSettings", "DEFAULTS", "EXAMPLE_OVERLAYS", "dense_flags", "settings_from"]
