"""dinotxt: give language to frozen self-supervised vision encoders (dino.txt / LiT).

``import dinotxt`` needs torch, timm and sentencepiece only; Lightning, faiss and the
training stack load where they are used.
"""
from .config import ConfigError, list_models, model_config
from .models import DinoTxt, FrozenBackbone, TextTower, VisionHead, create_model
from .tokenizer import Tokenizer, train_tokenizer
from .loss import ClipLoss, clip_loss
from .inference import DenseSettings, load_templates, segment, zero_shot_classifier
from .checkpoint import load, save_checkpoint
from .clip_tokenizer import ClipTokenizer
from .models.official import load_official

__version__ = "0.1.0"

__all__ = ["ConfigError", "list_models", "model_config", "DinoTxt", "FrozenBackbone", "TextTower", "VisionHead",
           "create_model", "Tokenizer", "train_tokenizer", "ClipLoss", "clip_loss", "load_templates",
           "zero_shot_classifier", "load", "save_checkpoint", "ClipTokenizer", "load_official"]
