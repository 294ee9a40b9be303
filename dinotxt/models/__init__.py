from .backbone import FrozenBackbone, load_state_dict_file
from .dinotxt import DinoTxt
from .factory import create_model
from .text_tower import TextTower
from .vision_head import HeadBlock, VisionHead, pool_patches, swiglu_hidden_dim

__all__ = ["FrozenBackbone", "VisionHead", "HeadBlock", "TextTower", "DinoTxt", "create_model",
           "pool_patches", "swiglu_hidden_dim", "load_state_dict_file"]
