"""Image transforms of METHOD.md: train = RandomResizedCrop (bicubic) + flip; eval =
resize size / crop_fraction (bicubic) + center crop of size (the model's zero-shot protocol,
``model_eval_transform``); both with ImageNet mean/std."""
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


def model_eval_transform(model_cfg, image_size=None, crop_fraction=None) -> T.Compose:
    """The evaluation transform a model config records (``zeroshot.image_size`` / ``crop_fraction``; image size
    defaults to the backbone's), each overridable (``dinotxt eval zeroshot --image-size --crop-fraction``)."""
    protocol = model_cfg.get("zeroshot") if hasattr(model_cfg, "get") else None
    size = image_size or (protocol.image_size if protocol is not None and protocol.image_size else None) \
        or int(model_cfg.backbone.img_size)
    fraction = crop_fraction or (float(protocol.crop_fraction) if protocol is not None else 224 / 256)
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"crop fraction {fraction} must lie in (0, 1]: the crop is that share of the resized side")
    return eval_transform(int(size), 1.0 / float(fraction))
