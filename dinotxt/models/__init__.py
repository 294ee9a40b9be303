from .backbone import FrozenBackbone
from .weights import load_state_dict_file
from .dinotxt import DinoTxt
from .factory import create_model
from .text_tower import TextTower
from .layers import swiglu_hidden_dim
from .vision_head import HeadBlock, VisionHead, pool_patches

__all__ = ["FrozenBackbone", "VisionHead", "HeadBlock", "TextTower", "DinoTxt", "create_model",
           "pool_patches", "swiglu_hidden_dim", "load_state_dict_file"]
