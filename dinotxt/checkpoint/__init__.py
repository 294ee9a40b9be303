"""Checkpoints: one record read once (``record``), our layouts (``format``: a folder or one
safetensors file), the official dino.txt releases (``official``: load, key maps), writing a checkpoint
in another layout (``export``), the Hugging Face Hub (``hub``: ``hf-hub:`` names; ``push``: upload with a
model card), open_clip's factory (``factory``) and ``model.init_from`` (``init_from``).

Names load on first use, so ``import dinotxt.checkpoint`` costs nothing.
"""
from ..utils.plugins import lazy_attributes

_API = {
    **dict.fromkeys(["CheckpointRecord", "read_record", "local_checkpoint", "backbone_weights", "backbone_state",
                     "WEIGHTS_NAME", "CONFIG_NAME", "SINGLE_FILE_FORMAT", "TOKENIZER_TENSOR", "BACKBONE_PREFIX",
                     "BACKBONE_NAME"], "record"),
    **dict.fromkeys(["save_checkpoint", "save_single_file", "read_checkpoint", "read_single_file", "load",
                     "load_single_file", "build_from_record", "checkpoint_config"], "format"),
    **dict.fromkeys(["load_official", "get_release", "RELEASES", "KEY_MAPS", "official_state_dicts"], "official"),
    **dict.fromkeys(["export_checkpoint", "export_official", "export_safetensors", "FORMATS"], "export"),
    **dict.fromkeys(["HUB_PREFIX", "is_hub_name", "parse_hub_name", "check_repo_id", "hub_snapshot"], "hub"),
    **dict.fromkeys(["push_to_hub", "stage_hub_folder", "model_card", "find_source", "backbone_provenance"], "push"),
    **dict.fromkeys(["create_model_and_transforms", "create_model_from_pretrained", "get_tokenizer",
                     "official_files", "OFFICIAL_PREFIX", "PRECISIONS"], "factory"),
    **dict.fromkeys(["InitSource", "read_init_source", "apply_init"], "init_from"),
}
__all__ = sorted(_API)
__getattr__ = lazy_attributes(__name__, _API)
