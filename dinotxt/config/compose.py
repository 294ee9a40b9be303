"""Composing a config: the one mechanism of dinotxt (training, curation, the evaluation suite, the demo).

Every default is written once, in the dataclasses of ``schema.py`` (the curation and evaluation-suite
schemas live next to their code and use the same mechanism). Registered architectures
(``dinotxt/config/models/*.yaml``) and recipes (``recipes/*.yaml``) are short diffs merged
over the defaults with OmegaConf, in the order defaults -> model registry entry -> recipe ->
command line, as DINOv2 does:

- ``merge_config(base, update, source)``: refuses a key ``base`` lacks, naming the closest valid
  one (``optim.lrr=1e-3`` stops the run before it starts), and a value of the wrong type;
- ``read_yaml`` / ``parse_overrides``: a recipe file and ``key=value`` command-line overrides;
- ``finalize``: resolves ``${...}`` interpolations and checks every choice field (declared with
  ``choice(...)``: the value must be one of its choices) at load, not deep inside a run;
- ``load_config(schema, recipe, overrides)``: all of it, for a schema without a registry layer.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

from .schema import MODEL_CONFIG_DIR, RECIPE_DIRS, ConfigError, ModelConfig, TrainConfig

# ---------------------------------------------------------------------- the mechanism


def _flat_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, (DictConfig, dict)):
        items = node.items() if isinstance(node, dict) else node.items_ex(resolve=False)
        for k, v in items:
            path = f"{prefix}{k}"
            keys.append(path)
            if isinstance(v, (DictConfig, dict)) and not path.endswith("kwargs"):
                keys.extend(_flat_keys(v, path + "."))
    return keys


def check_keys(schema: Any, update: Any, source: str) -> None:
    """Raise ConfigError naming the first key of ``update`` that ``schema`` lacks."""
    valid = set(_flat_keys(schema))
    for key in _flat_keys(update):
        if key in valid or any(key.startswith(v + ".") for v in valid if v.endswith("kwargs")):
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}")


def merge_config(base: DictConfig, update: Any, source: str) -> DictConfig:
    """``base`` with ``update`` merged over it; unknown keys and wrong types are a ConfigError naming ``source``."""
    check_keys(base, update, source)
    try:
        return OmegaConf.merge(base, update)
    except Exception as e:  # type errors (e.g. lr=abc) from OmegaConf
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid value in {source}: {msg}") from None


def read_yaml(path: Union[str, Path]) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(f"cannot parse YAML {path}: {str(e).splitlines()[0]}") from None
    return cfg if cfg is not None else OmegaConf.create({})


def parse_overrides(overrides: List[str]) -> DictConfig:
    """``["optim.lr=3e-4", ...]`` as a config to merge."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command-line override '{item}' must look like key=value (e.g. optim.lr=3e-4)")
    return OmegaConf.from_dotlist(list(overrides))


def check_choices(cfg: DictConfig, prefix: str = "") -> None:
    """Every ``choice(...)`` field of the structured ``cfg`` (nested sections too) holds one of its choices."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        value = cfg.get(f.name)
        choices = f.metadata.get("choices")
        many = f.metadata.get("many") and isinstance(value, (list, ListConfig))
        bad = [v for v in (value if many else [value]) if v not in choices] if choices is not None else []
        if bad:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            what = f"{prefix}{f.name} has {bad[0]!r}, which" if many else f"{prefix}{f.name}={value!r}"
            hint = " (one name or a list of them)" if f.metadata.get("many") else ""
            raise ConfigError(f"{what} is not one of {shown}{hint}")
        if isinstance(value, DictConfig):
            check_choices(value, f"{prefix}{f.name}.")


def finalize(cfg: DictConfig) -> DictConfig:
    """Resolve ``${...}`` interpolations (saved as plain values) and check the choice fields."""
    try:
        OmegaConf.resolve(cfg)
    except Exception as e:
        raise ConfigError(f"cannot resolve config: {str(e).splitlines()[0]}") from None
    check_choices(cfg)
    return cfg


def compose(schema: type, recipe: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None,
            default_name: Optional[str] = None, registry: Optional[str] = None,
            check: Optional[Callable[[DictConfig], Any]] = None) -> DictConfig:
    """The one way a config is made: defaults (``schema``) -> model registry entry -> recipe (a file, or a
    shipped recipe by name) -> ``key=value`` overrides -> interpolations resolved and choices checked ->
    ``check`` (the schema's own rules).

    Args:
        registry: the section holding a ``ModelConfig`` (``model`` for training): the registry file of its
            ``arch`` (the one named last: command line, recipe, default) is the base the recipe edits.
        default_name: a ``name`` field left unset becomes the recipe's file stem, else this.
        check: called on the finished config; may raise ``ConfigError`` or return a corrected config.
    """
    cfg = OmegaConf.structured(schema)
    recipe = find_recipe(recipe) if recipe else None
    recipe_cfg = read_yaml(recipe) if recipe else OmegaConf.create({})
    cli_cfg = parse_overrides(overrides or [])
    if registry is not None:
        key = f"{registry}.arch"
        arch = OmegaConf.select(cli_cfg, key) or OmegaConf.select(recipe_cfg, key) or OmegaConf.select(cfg, key)
        cfg[registry] = model_config(arch)
    cfg = merge_config(cfg, recipe_cfg, str(recipe) if recipe else "recipe")
    cfg = merge_config(cfg, cli_cfg, "command line")
    if "name" in cfg and cfg.name is None:
        cfg.name = Path(recipe).stem if recipe else default_name
    cfg = finalize(cfg)
    if check is not None:
        cfg = check(cfg) or cfg
    return cfg


def load_config(schema: type, recipe: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None,
                default_name: Optional[str] = None) -> DictConfig:
    """Defaults (``schema``) -> recipe -> ``key=value`` overrides, for a schema without a registry layer."""
    return compose(schema, recipe, overrides, default_name)


def shipped_recipes() -> List[str]:
    """Names of the recipes that ship with dinotxt (``demo``, ``curation/demo``, ...)."""
    for folder in RECIPE_DIRS:
        if folder.is_dir():
            return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))
    return []


def find_recipe(recipe: Union[str, Path]) -> Path:
    """A recipe file: the path as given if it exists, else a shipped recipe by name (``demo``,
    ``curation/demo``, ``recipes/demo.yaml`` ...), so commands work from any folder."""
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.as_posix()
    name = name[len("recipes/"):] if name.startswith("recipes/") else name
    name = name[:-len(".yaml")] if name.endswith(".yaml") else name
    for folder in RECIPE_DIRS:
        candidate = folder / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    shipped = shipped_recipes()
    close = difflib.get_close_matches(name, shipped, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"shipped recipes: {', '.join(shipped) or 'none found'}"
    raise ConfigError(f"recipe not found: {recipe} is not a file and not a shipped recipe; {hint}")


def list_models() -> List[str]:
    """Names of the registered model configs (files in dinotxt/config/models)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def model_config(arch: str, overrides: Any = None) -> DictConfig:
    """ModelConfig of registry entry ``arch`` (a name or a YAML path), with optional overrides."""
    path = Path(arch)
    if not path.suffix:
        path = MODEL_CONFIG_DIR / f"{arch}.yaml"
        if not path.is_file():
            close = difflib.get_close_matches(arch, list_models(), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else f"; registered: {', '.join(list_models())}"
            raise ConfigError(f"unknown model '{arch}'{hint}")
    cfg = merge_config(OmegaConf.structured(ModelConfig), read_yaml(path), str(path))
    cfg.arch = path.stem
    if overrides:
        cfg = merge_config(cfg, overrides, "model overrides")
    check_choices(cfg, "model.")
    return cfg


def load_train_config(recipe: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Resolve defaults -> model registry entry -> recipe -> command-line overrides -> training checks."""
    return compose(TrainConfig, recipe, overrides, default_name="run", registry="model", check=check_train_config)


SIGLIP_INIT_LOGIT_BIAS = -10.0  # Zhai et al. 2023: b' = -10 (with t' = ln 10)


def check_train_config(cfg: DictConfig) -> DictConfig:
    """Settings that only make sense together: warmup within the run, the sigmoid loss and the logit bias,
    unlocked backbone blocks and the feature cache. Fills SigLIP's bias when the sigmoid loss leaves it unset."""
    m = cfg.model
    o = cfg.optim
    if o.warmup_steps > o.max_steps:  # the official trainer refuses it too: the rate would never reach optim.lr
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is longer than the run (optim.max_steps={o.max_steps}): "
                          f"the learning rate would never reach optim.lr={o.lr}; set optim.warmup_steps to at most "
                          f"{o.max_steps}")
    if cfg.trainer.strategy == "fsdp2" and cfg.trainer.compile is True:
        raise ConfigError("trainer.compile=true compiles each tower whole, which FSDP2 cannot shard per block: "
                          "use trainer.compile=blocks with trainer.strategy=fsdp2 (the official trainer's way)")
    problem = embed_dim_problem(m.vision_head.embed_dim, m.vision_head.use_patch_tokens)
    if problem:
        raise ConfigError(f"model.{problem}")
    g = cfg.loss.gram
    if g.enabled:
        if not 0.0 < g.patch_sampling_rate <= 1.0:
            raise ConfigError(f"loss.gram.patch_sampling_rate={g.patch_sampling_rate} must lie in (0, 1]")
        if m.vision_head.num_blocks == 0:
            raise ConfigError("loss.gram compares the head's output patch tokens with the backbone's: the head needs "
                              "blocks (model.vision_head.num_blocks >= 1)")
        if cfg.cache.path and cfg.cache.tokens == "pooled":
            raise ConfigError("loss.gram needs every patch token: a pooled feature cache has none (cache.tokens=all)")
        if cfg.data.global_batch:
            raise ConfigError("loss.gram is not available with data.global_batch (gradient caching) yet: leave "
                              "data.global_batch=null")
    if cfg.loss.kind == "sigmoid" and m.init_logit_bias is None:
        m.init_logit_bias = SIGLIP_INIT_LOGIT_BIAS
    elif cfg.loss.kind == "infonce" and m.init_logit_bias is not None:
        raise ConfigError(f"model.init_logit_bias={m.init_logit_bias} is a parameter of the sigmoid loss (the InfoNCE "
                          "does not depend on it): set loss.kind=sigmoid, or model.init_logit_bias=null")
    k = m.backbone.trainable_blocks
    if k < 0:
        raise ConfigError(f"model.backbone.trainable_blocks={k}: use 0 (all frozen) or the number of last blocks to train")
    if k and cfg.cache.path:
        raise ConfigError(f"model.backbone.trainable_blocks={k} trains the backbone's last blocks, so its tokens change "
                          "every step and cannot come from the feature cache: set cache.path=null")
    if cfg.optim.backbone_lr is not None and not k:
        raise ConfigError(f"optim.backbone_lr={cfg.optim.backbone_lr} is the learning rate of unlocked backbone blocks, "
                          "but model.backbone.trainable_blocks=0: set trainable_blocks, or optim.backbone_lr=null")
    if cfg.optim.backbone_lr is not None and cfg.optim.backbone_lr < 0:
        raise ConfigError(f"optim.backbone_lr={cfg.optim.backbone_lr} must be >= 0")
    return cfg


def embed_dim_problem(embed_dim: Optional[int], use_patch_tokens: bool) -> Optional[str]:
    """Why the head cannot make an image embedding of ``embed_dim`` (None: its default width), or None."""
    multiplier = 2 if use_patch_tokens else 1
    if embed_dim is None or (embed_dim >= multiplier and embed_dim % multiplier == 0):
        return None
    if multiplier == 1:
        return f"vision_head.embed_dim={embed_dim} must be positive"
    return (f"vision_head.embed_dim={embed_dim} must be a positive multiple of 2 "
            "(the embedding is [CLS] || patch average, two halves of equal width)")


def projection_width(dim: int, use_patch_tokens: bool, embed_dim: Optional[int] = None,
                     linear_projection: bool = False) -> Optional[int]:
    """The output width of the head's linear projection per token, or None for no projection.

    As the official head: a projection exists when asked for (``linear_projection``) or when the
    image embedding width ``embed_dim`` differs from the unprojected one (2D with patch tokens, D
    without); it maps D to ``embed_dim / 2`` (patch tokens) or ``embed_dim`` (CLS only).
    """
    problem = embed_dim_problem(embed_dim, use_patch_tokens)
    if problem:
        raise ValueError(problem)
    multiplier = 2 if use_patch_tokens else 1
    embed_dim = multiplier * dim if embed_dim is None else int(embed_dim)
    if not linear_projection and embed_dim == multiplier * dim:
        return None
    return embed_dim // multiplier


def resolve_model_dims(cfg: DictConfig, embed_dim: int, backbone_heads: Optional[int] = None) -> None:
    """Fill derived model fields from the backbone: the head's attention heads (the backbone's own count, as
    the official head takes it; width // 64 for a backbone without heads, a CNN) and the text output width."""
    if cfg.vision_head.num_heads is None:
        cfg.vision_head.num_heads = int(backbone_heads) if backbone_heads else max(1, embed_dim // 64)
    if cfg.text.output_dim is None:
        h = cfg.vision_head
        try:
            width = projection_width(embed_dim, h.use_patch_tokens, h.get("embed_dim"), h.get("linear_projection", False))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        cfg.text.output_dim = (embed_dim if width is None else width) * (2 if h.use_patch_tokens else 1)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
