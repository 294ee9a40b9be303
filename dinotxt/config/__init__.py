"""Configuration: the schemas with every default (``schema``), the one way a config is composed
(``compose``: defaults -> model registry entry -> recipe -> command line -> checks), and the model
registry (``models/*.yaml``)."""
from omegaconf import ListConfig

from .compose import (SIGLIP_INIT_LOGIT_BIAS, check_choices, check_keys, check_train_config, finalize, find_recipe,
                      compose, list_models, load_config, load_train_config, merge_config, model_config, parse_overrides,
                      read_yaml, resolve_model_dims, shipped_recipes, to_yaml)
from .schema import (CONFIG_DIR, MODEL_CONFIG_DIR, RECIPE_DIRS, BackboneConfig, CacheConfig, ConfigError, DataConfig,
                     EvalConfig, LossConfig, ModelConfig, OptimConfig, SourceConfig, SpuriousConfig, TextConfig, TokenizerConfig,
                     TrainConfig, TrainerConfig, VisionHeadConfig, WorldConfig, choice)

__all__ = [
    "BackboneConfig", "VisionHeadConfig", "TextConfig", "ModelConfig", "TrainConfig", "DataConfig", "OptimConfig",
    "LossConfig", "SourceConfig", "TokenizerConfig", "TrainerConfig", "EvalConfig", "CacheConfig", "WorldConfig", "SpuriousConfig",
    "ConfigError", "choice", "compose", "list_models", "model_config", "load_train_config", "check_train_config", "load_config",
    "merge_config", "read_yaml", "parse_overrides", "check_keys", "check_choices", "finalize", "find_recipe",
    "shipped_recipes", "resolve_model_dims", "to_yaml", "ListConfig", "CONFIG_DIR", "MODEL_CONFIG_DIR", "RECIPE_DIRS",
    "SIGLIP_INIT_LOGIT_BIAS",
]
