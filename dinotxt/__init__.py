"""dinotxt: give language to frozen self-supervised vision encoders (dino.txt / LiT).

The public API loads on first use (PEP 562), so ``import dinotxt`` and ``dinotxt --help`` cost
nothing; ``dinotxt.load`` & co. need torch, timm and sentencepiece only. Lightning, faiss and the
rest of the training and curation stack load where they are used (the ``[train]`` and
``[curate]`` extras).
"""
from .plugins import lazy_attributes

__version__ = "0.1.0"

_API = {
    "ConfigError": "config", "list_models": "config", "model_config": "config",
    "DinoTxt": "models", "FrozenBackbone": "models", "TextTower": "models", "VisionHead": "models",
    "create_model": "models",
    "Tokenizer": "tokenizer", "train_tokenizer": "tokenizer", "ClipTokenizer": "clip_tokenizer",
    "ClipLoss": "loss", "clip_loss": "loss", "blocked_clip_loss": "loss",
    "load_templates": "inference", "zero_shot_classifier": "inference", "segment": "inference",
    "DenseSettings": "inference",
    "load": "checkpoint", "save_checkpoint": "checkpoint", "load_official": "models.official",
    "create_model_and_transforms": "pretrained", "create_model_from_pretrained": "pretrained",
    "get_tokenizer": "pretrained",
}

__all__ = sorted(_API)


__getattr__ = lazy_attributes(__name__, _API)


def __dir__():
    return sorted(list(globals()) + __all__)
