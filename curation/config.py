"""Typed curation recipes (dino.txt curation, METHOD.md section 7).

A recipe is a short YAML diff over the defaults below, merged with dinotxt's one config
mechanism (``dinotxt.config.compose``): defaults -> recipe -> command-line ``key=value``,
choice fields checked at load. A mistyped key stops the run with a message naming
the nearest valid key. The resolved recipe is written to ``<output_dir>/<name>/config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from dinotxt.config import ConfigError, SourceConfig, choice, compose


@dataclass
class PoolConfig(SourceConfig):
    # webdataset shards ("dir/{00000..00099}.tar", a folder, a glob, a list; fsspec URLs and "pipe:COMMAND"
    # too) or a .csv/.tsv/.parquet manifest with image_path, caption columns; read as training reads its data
    # (dinotxt.data; the reading fields come from dinotxt.config.SourceConfig)
    data: Any = None
    manifest_rows_per_unit: int = 10000  # a manifest is processed (and resumed) in units of this many rows


@dataclass
class BackboneOverrides:
    # each field, when set, replaces that field of the registry entry's backbone (dinotxt.config.BackboneConfig)
    name: Optional[str] = None
    weights: Optional[str] = None  # e.g. the official dinov2_vitl14_reg4_pretrain.pth
    img_size: Optional[int] = None
    init_seed: Optional[int] = None
    kwargs: Optional[Dict[str, Any]] = None


@dataclass
class EmbedConfig:
    # registry entry (dinotxt/config/models) whose frozen backbone embeds the images
    model: str = "dinotxt_vitl14_reg4"
    backbone: BackboneOverrides = field(default_factory=BackboneOverrides)
    batch_size: int = 64
    num_workers: int = 2  # dataloader workers decoding images
    accelerator: str = "auto"  # Lightning accelerator; GPUs are used when present
    devices: Any = "auto"  # several GPUs split the input shards between them (Lightning predict, DDP); auto under
    # torchrun / srun: one per process on each node
    num_nodes: Any = "auto"  # machines of a multi-node launch (auto: from the launcher's world size)
    precision: str = choice("auto", "auto", "32-true", "bf16-mixed", "16-mixed")  # auto = bf16-mixed on GPU, 32-true on CPU
    # caption encoder: "tfidf" (hashed word n-gram TF-IDF, no download) or "package.module:factory"
    # returning an object with encode(list_of_captions) -> (n, dim) array (any sentence encoder you have)
    text_encoder: str = "tfidf"
    text_dim: int = 512  # width of the hashed TF-IDF embedding
    text_ngrams: int = 2  # word n-grams 1..text_ngrams
    text_kwargs: Dict[str, Any] = field(default_factory=dict)  # passed to a plug-in factory
    text_batch_size: int = 1024
    # a feature cache of the same backbone with [CLS, mean(patches)] of one eval crop per image
    # (`dinotxt cache RECIPE cache.tokens=pooled cache.augment=false cache.views=1 model.vision_head.num_blocks=0
    # model.vision_head.final_norm=false` over the same shards): the embeddings are read from it, no second pass
    from_cache: Optional[str] = None


@dataclass
class DedupConfig:
    enabled: bool = True
    threshold: float = 0.95  # cosine similarity of image embeddings at or above which two samples are duplicates
    neighbors: int = 16  # nearest neighbours searched per sample (groups connect transitively beyond this)
    index: str = choice("auto", "auto", "flat", "ivf")  # flat (exact) | ivf (approximate, for large pools) | auto (flat up to flat_max rows)
    flat_max: int = 200_000
    nlist: Optional[int] = None  # IVF lists; default 4 * sqrt(N)
    nprobe: int = 16
    chunk_size: int = 16384  # query rows per faiss search call
    # the index (and the queries) in fixed shards of this many pool rows: a work item is one (index shard, query
    # shard) pair, so (N / shard_rows)^2 items for processes to share; each pair reads its query shard once
    shard_rows: int = 4_194_304


@dataclass
class ClusterConfig:
    embeddings: str = choice("image", "image", "text")  # which embeddings the hierarchical k-means runs on
    levels: List[int] = field(default_factory=lambda: [1000, 100])  # clusters per level, bottom level first
    iters: int = 50  # Lloyd iterations of every k-means run
    resampling_steps: Any = 1  # R per level (an int for all levels, or a list)
    sample_size: Any = None  # s points per cluster kept in a resampling step (int or list); None = half the mean cluster size
    init: str = choice("kmeans++", "kmeans++", "random")
    init_sample_per_centroid: int = 64  # k-means++ seeds on at most this many points per centroid (a random subset)
    device: str = choice("auto", "auto", "cpu", "cuda")  # faiss device for k-means and de-duplication: auto = GPU when faiss sees one
    gpu_index: str = choice("replicate", "replicate", "shard")  # several GPUs: replicate the centroids (split the queries) | shard them
    # rows of the de-duplicated pool per grid chunk: one faiss search and one work item of k-means, balancing
    # and combine, whatever the number of processes (bounds memory; the pool stays memory-mapped)
    chunk_size: int = 65536


@dataclass
class ImageBalanceConfig:
    enabled: bool = True
    target_size: Any = 0.5  # samples to keep: an int, or a fraction (0, 1] of the deduplicated pool
    strategy: str = choice("closest", "closest", "random")  # closest (to the leaf centroid first) | random


@dataclass
class TextBalanceConfig:
    enabled: bool = True
    metadata: Optional[str] = None  # vocabulary file, one entry (word or phrase) per line; None = mine it from the captions
    t: int = 20000  # per-entry cap: a pair matching entry e survives with probability t / max(count(e), t)
    keep_unmatched: bool = False  # MetaCLIP drops captions that match no entry
    mine_max_ngram: int = 2  # mined entries are word n-grams up to this length
    mine_min_count: int = 5  # ... occurring in at least this many captions
    mine_max_entries: int = 100_000
    mine_stopwords: bool = False  # keep n-grams made only of stop words ("of the") as entries
    mine_buckets: int = 64  # mining sums n-gram counts in this many hash buckets, one process per bucket


@dataclass
class CombineConfig:
    mode: str = choice("intersection", "intersection", "union", "image", "text")  # intersection is dino.txt's
    write_shards: bool = False  # also write the curated pairs as webdataset shards that training reads directly
    samples_per_shard: int = 1000


@dataclass
class ReportConfig:
    plots: bool = True  # PNG plots next to report.json


@dataclass
class ProcessesConfig:
    # several processes (torchrun, srun): a process that stops answering makes the others stop after this long
    timeout_s: int = 1800


@dataclass
class CurationConfig:
    name: Optional[str] = None  # default: the recipe file's stem
    output_dir: str = "runs/curation"  # outputs go to <output_dir>/<name>/
    seed: int = 0  # every random choice (k-means, sampling, text caps) derives from it
    pool: PoolConfig = field(default_factory=PoolConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    image_balance: ImageBalanceConfig = field(default_factory=ImageBalanceConfig)
    text_balance: TextBalanceConfig = field(default_factory=TextBalanceConfig)
    combine: CombineConfig = field(default_factory=CombineConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    processes: ProcessesConfig = field(default_factory=ProcessesConfig)


def per_level(value: Any, levels: int, key: str) -> List[Any]:
    """An int (or None) for every level, or a list with one value per level."""
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        values = list(value)
        if len(values) != levels:
            raise ConfigError(f"{key} has {len(values)} values for {levels} cluster levels; give one per level or a single int")
        return values
    return [value] * levels


def validate(cfg: DictConfig) -> None:
    """Reject values that would fail deep inside a stage, with a message saying what to fix."""
    if cfg.pool.data is None:
        raise ConfigError("no pool: set pool.data to shards (dir/{00000..00009}.tar, a folder) or a .csv/.parquet manifest")
    levels = list(cfg.cluster.levels)
    if not levels or any(int(k) < 1 for k in levels):
        raise ConfigError(f"cluster.levels must list positive cluster counts, bottom level first (got {levels})")
    if any(b > a for a, b in zip(levels, levels[1:])):
        raise ConfigError(f"cluster.levels must not grow from one level to the next (got {levels}): "
                          "level l clusters the centroids of level l-1")
    for r in per_level(cfg.cluster.resampling_steps, len(levels), "cluster.resampling_steps"):
        if int(r) < 0:
            raise ConfigError("cluster.resampling_steps must be >= 0")
    for s in per_level(cfg.cluster.sample_size, len(levels), "cluster.sample_size"):
        if s is not None and int(s) < 1:
            raise ConfigError("cluster.sample_size must be >= 1 (or null for half the mean cluster size)")
    if cfg.cluster.iters < 1:
        raise ConfigError("cluster.iters must be >= 1")
    for key, value in (("cluster.chunk_size", cfg.cluster.chunk_size), ("dedup.shard_rows", cfg.dedup.shard_rows),
                       ("dedup.chunk_size", cfg.dedup.chunk_size), ("text_balance.mine_buckets", cfg.text_balance.mine_buckets)):
        if int(value) < 1:
            raise ConfigError(f"{key} must be >= 1 (got {value})")
    ts = cfg.image_balance.target_size
    if not isinstance(ts, (int, float)) or ts <= 0:
        raise ConfigError(f"image_balance.target_size must be a positive int or a fraction in (0, 1] (got {ts!r})")
    if isinstance(ts, float) and ts > 1 and not ts.is_integer():  # would silently become int(ts) samples
        raise ConfigError(f"image_balance.target_size={ts} is neither a fraction in (0, 1] nor a whole number "
                          "of samples")
    if cfg.text_balance.t < 1:
        raise ConfigError("text_balance.t must be >= 1")
    if not 0 < cfg.dedup.threshold <= 1:
        raise ConfigError("dedup.threshold is a cosine similarity in (0, 1]")
    if cfg.combine.mode in ("intersection", "image") and not cfg.image_balance.enabled:
        raise ConfigError(f"combine.mode={cfg.combine.mode} needs image_balance.enabled=true")
    if cfg.combine.mode in ("intersection", "text") and not cfg.text_balance.enabled:
        raise ConfigError(f"combine.mode={cfg.combine.mode} needs text_balance.enabled=true")
    if cfg.combine.mode == "union" and not (cfg.image_balance.enabled and cfg.text_balance.enabled):
        raise ConfigError("combine.mode=union needs both image_balance and text_balance enabled")


def load_curation_config(recipe: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Resolve defaults -> recipe -> command-line overrides into a validated CurationConfig."""
    return compose(CurationConfig, recipe, overrides, default_name="curation", check=validate)


__all__ = ["CurationConfig", "PoolConfig", "BackboneOverrides", "EmbedConfig", "DedupConfig", "ClusterConfig", "ImageBalanceConfig",
           "TextBalanceConfig", "CombineConfig", "ReportConfig", "ProcessesConfig", "load_curation_config", "per_level", "validate"]
