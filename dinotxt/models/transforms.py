"""Image transforms of METHOD.md: train = RandomResizedCrop (bicubic) + flip; eval =
resize 256/224 of the crop (bicubic) + center crop; both with ImageNet mean/std."""
from __future__ import annotations

from typing import Sequence

from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_rgb(img):
    return img.convert("RGB") if img.mode != "RGB" else img


def train_transform(size: int = 224, scale: Sequence[float] = (0.08, 1.0), hflip: float = 0.5) -> T.Compose:
    ops = [_to_rgb, T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


def eval_transform(size: int = 224, resize_ratio: float = 256 / 224) -> T.Compose:
    return T.Compose([
        _to_rgb,
        T.Resize(int(round(size * resize_ratio)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
