"""dinotxt: give language to frozen self-supervised vision encoders (dino.txt / LiT).

The public API loads on first use (PEP 562), so ``import dinotxt`` and ``dinotxt --help`` cost
nothing; ``dinotxt.load`` & co. need torch, timm and sentencepiece only. Lightning, faiss and the
rest of the training and curation stack load where they are used (the ``[train]`` and
``[curate]`` extras).
"""
from .utils.plugins import lazy_attributes

__version__ = "0.1.0"

_API = {
    "ConfigError": "config", "list_models": "config", "model_config": "config",
    "DinoTxt": "models", "FrozenBackbone": "models", "TextTower": "models", "VisionHead": "models",
    "create_model": "models",
    "Tokenizer": "text", "train_tokenizer": "text", "ClipTokenizer": "text", "HFTokenizer": "text",
    "ClipLoss": "train.loss", "clip_loss": "train.loss", "blocked_clip_loss": "train.loss",
    "load_templates": "inference", "zero_shot_classifier": "inference", "segment": "inference",
    "DenseSettings": "inference",
    "load": "checkpoint", "save_checkpoint": "checkpoint", "load_official": "checkpoint",
    "create_model_and_transforms": "checkpoint", "create_model_from_pretrained": "checkpoint",
    "get_tokenizer": "checkpoint",
}

__all__ = sorted(_API)


__getattr__ = lazy_attributes(__name__, _API)


def __dir__():
    return sorted(list(globals()) + __all__)
