"""``dinotxt curate RECIPE``: the whole curation as a chain of resumable stages, on one process
or on N (``torchrun`` / ``srun``; ``curation.ranks``).

    <output_dir>/<name>/
      config.yaml                resolved recipe
      embed/                     image embeddings + metadata per pool unit   (embed)
      embed_text/                caption embeddings per pool unit            (embed_text)
      dedup/                     removed.npy: pool rows removed as near duplicates (+ hits/, edges/ per shard)
      cluster/level{l}/          centroids.npy, assignment/ and dist2/ per grid chunk (+ phase centroids)
      image_balance/rows/        the balanced hierarchical sample, per grid chunk
      text_balance/              entries.txt, counts.npy, matches/ and rows/ per grid chunk (MetaCLIP-style)
      curated/                   uids.npy, manifest.parquet, shards/ (+ their per-chunk parts)   (combine)
      report/                    report.json + PNG plots

Row indices saved by the stages are POOL rows (positions in the concatenated embedding
shards), so every selection can be mapped back to sample ids. After de-duplication the pool's
rows are cut into a fixed grid of ``cluster.chunk_size`` rows: the work items of k-means,
balancing and combine, written as one part per chunk by the process that ran it. The number of
processes only decides who runs which chunk, so every output is byte-identical for 1 or N
processes, and for a resume with another N. Each stage is skipped when done, resumed when
interrupted, and recomputed when a setting it depends on changed (``curation.stages``).
``--stage NAME`` runs one stage (its inputs must exist), e.g. each k-means level as its own job;
``--until NAME`` stops after a stage.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from omegaconf import OmegaConf

from dinotxt.config import ConfigError
from dinotxt.data.units import data_units
from dinotxt.utils.fileio import atomic_write_text

from .config import load_curation_config, per_level
from .ranks import Ranks
from .stages import Stage, fingerprint, run_stage
from .store import EmbeddingStore, Grid, KeptRows, load_array, read_json, part_path, read_parts, save_npy, shard_paths

log = logging.getLogger(__name__)


class Curation:
    """The stages of one curation run, wired to the run folder.

    Args:
        cfg: resolved CurationConfig (``load_curation_config``).
        trust_code: allow the recipe to name code by import path (a backbone factory, a caption
            encoder; ``dinotxt.utils.plugins``).
        ranks: the processes running it (one by default; ``run_curation`` reads the launcher's).
    """

    def __init__(self, cfg, trust_code: bool = False, ranks: Optional[Ranks] = None):
        self.cfg = cfg
        self.trust_code = trust_code
        self.ranks = ranks or Ranks()
        self.out = Path(cfg.output_dir) / cfg.name
        self.units = data_units(cfg.pool.data, cfg.pool, cfg.pool.manifest_rows_per_unit, key="pool.data")
        if not self.units:
            raise ValueError(f"the pool {cfg.pool.data} has no samples")
        self._pool = None
        self.stages: Dict[str, Tuple[Stage, Callable[[bool], Dict], List[str], Callable[[], List[Path]]]] = {}
        self._define()

    # ---------------------------------------------------------------- wiring
    def _add(self, name: str, folder: str, fp: str, work: Callable[[bool], Dict], needs: List[str],
             outputs: Callable[[], List[Path]], expensive: bool = False) -> str:
        self.stages[name] = (Stage(name, self.out / folder, fp, expensive), work, needs, outputs)
        return fp

    def _define(self) -> None:
        from .embed_pool import backbone_config

        c = self.cfg
        units = len(self.units)
        pool_keys = {k: c.pool[k] for k in ("image_keys", "caption_key", "caption_json_field",
                                             "manifest_image_column", "manifest_caption_column")}
        # read from a pooled feature cache, the embeddings are the same up to the cache's fp16 tokens: its
        # weights hash is part of what they depend on
        from_cache = None
        if c.embed.from_cache:
            from dinotxt.data.feature_cache import FeatureCache

            from_cache = FeatureCache(c.embed.from_cache).meta["weights_hash"]
        fp_embed = self._add("embed", "embed", fingerprint(
            "embed", [u.name for u in self.units], [(u.start, u.stop) for u in self.units], pool_keys,
            backbone_config(c.embed), *([("from_cache", from_cache)] if from_cache else [])), self._embed, [],
            lambda: shard_paths(self.out / "embed" / "meta", units, ".parquet") + [self.out / "embed" / "rows.npy"],
            expensive=True)
        e = c.embed
        fp_text = self._add("embed_text", "embed_text", fingerprint(
            "embed_text", fp_embed, e.text_encoder, e.text_dim, e.text_ngrams, e.text_kwargs), self._embed_text,
            ["embed"], lambda: shard_paths(self.out / "embed_text", units))
        fp_dedup = self._add("dedup", "dedup", fingerprint("dedup", fp_embed, c.dedup, c.seed), self._dedup, ["embed"],
                             lambda: [self.out / "dedup" / "removed.npy"])
        grid = c.cluster.chunk_size  # the grid of the de-duplicated pool: the work items from here on
        fp_image = None
        if c.image_balance.enabled:
            upstream = [fp_dedup] + ([fp_text] if c.cluster.embeddings == "text" else [])
            needs = ["dedup"] + (["embed_text"] if c.cluster.embeddings == "text" else [])
            levels = list(c.cluster.levels)
            steps = per_level(c.cluster.resampling_steps, len(levels), "cluster.resampling_steps")
            sizes = per_level(c.cluster.sample_size, len(levels), "cluster.sample_size")
            common = {k: c.cluster[k] for k in ("embeddings", "iters", "init", "init_sample_per_centroid", "chunk_size")}
            for i, k in enumerate(levels):
                name = f"cluster_level{i + 1}"
                upstream = [fingerprint(name, *upstream, common, k, steps[i], sizes[i], c.seed)]
                self._add(name, f"cluster/level{i + 1}", upstream[0], self._cluster_level(i), needs,
                          self._level_outputs(i))
                needs = [name]
            fp_image = self._add("image_balance", "image_balance", fingerprint(
                "image_balance", upstream[0], c.image_balance, c.seed), self._image_balance, needs,
                lambda: self._chunk_parts(self.out / "image_balance" / "rows"))
        fp_textbal = None
        if c.text_balance.enabled:
            vocab = hashlib.sha256(Path(c.text_balance.metadata).read_bytes()).hexdigest() if (
                c.text_balance.metadata and Path(c.text_balance.metadata).is_file()) else None
            fp_textbal = self._add("text_balance", "text_balance", fingerprint(
                "text_balance", fp_dedup, c.text_balance, vocab, grid, c.seed), self._text_balance, ["dedup"],
                lambda: self._chunk_parts(self.out / "text_balance" / "rows") + [self.out / "text_balance" / "counts.npy"])
        selections = [n for n, fp in (("image_balance", fp_image), ("text_balance", fp_textbal)) if fp]
        fp_combine = self._add("combine", "curated", fingerprint("combine", fp_image, fp_textbal, c.combine, grid),
                               self._combine, selections, self._combine_outputs)
        self._add("report", "report", fingerprint("report", fp_combine, c.report), self._report, ["combine"],
                  lambda: [self.out / "report" / "report.json"])

    @property
    def names(self) -> List[str]:
        return list(self.stages)

    # ---------------------------------------------------------------- the pool and its grid
    def log(self, msg: str) -> None:
        if self.ranks.is_zero:
            log.info(msg)

    @property
    def pool(self):
        """The pool's metadata, read per unit where it lies (``embed.PoolIndex``)."""
        if self._pool is None:
            from .embed_pool import PoolIndex

            self._pool = PoolIndex(self.out / "embed", self.units)
        return self._pool

    def kept(self) -> KeptRows:
        """The pool rows left after de-duplication (position -> pool row), from the rows it removed."""
        return KeptRows(len(self.pool), load_array(self.out / "dedup" / "removed.npy"))

    def grid(self) -> Grid:
        """The fixed chunks of the de-duplicated pool (``cluster.chunk_size`` rows): the stages' work items."""
        return Grid(len(self.kept()), self.cfg.cluster.chunk_size)

    def _chunk_parts(self, folder: Path, suffix: str = ".npy") -> List[Path]:
        return [part_path(folder, j, suffix) for j in range(len(self.grid()))]

    def image_store(self, rows=None) -> EmbeddingStore:
        # once embed is done, every shard must have the width it recorded (so a bad shard 0 is named too)
        return EmbeddingStore(shard_paths(self.out / "embed" / "image", len(self.units)), rows,
                              expect_dim=self.stages["embed"][0].stats.get("dim"))

    def text_store(self, rows=None) -> EmbeddingStore:
        return EmbeddingStore(shard_paths(self.out / "embed_text", len(self.units)), rows)

    def faiss_gpus(self):
        """The GPUs faiss may use: none, every visible one (one process), or this process's own."""
        from .kmeans import faiss_gpus

        count = faiss_gpus(self.cfg.cluster.device)
        return count if self.ranks.world == 1 else self.ranks.faiss_gpus(count)

    # ---------------------------------------------------------------- stages
    def _embed(self, resuming: bool) -> Dict:
        from .embed_pool import embed_images, index_units, read_skipped

        self.ranks.items += embed_images(self.cfg, self.units, self.out / "embed", self.trust_code, self.ranks)
        self.ranks.barrier()  # every unit's files are on disk
        samples = index_units(self.out / "embed", self.units, self.ranks)["samples"]  # checks that ids are unique
        return self.ranks.on_zero(lambda: {"units": len(self.units), "samples": samples, "dim": self.image_store().dim,
                                           "skipped": read_skipped(self.out / "embed", self.units)})

    def _embed_text(self, resuming: bool) -> Dict:
        from .embed_pool import embed_texts

        stats = embed_texts(self.cfg, self.units, self.out / "embed", self.out / "embed_text", self.trust_code,
                            self.ranks)
        self.ranks.barrier()
        return stats

    def _dedup(self, resuming: bool) -> Dict:
        from .dedup import DedupSettings, dedup_stage

        d = self.cfg.dedup
        n = len(self.pool)
        if d.enabled:
            settings = DedupSettings(n, d.threshold, d.neighbors, d.index, d.flat_max, d.nlist, d.nprobe, d.chunk_size,
                                     d.shard_rows, self.cfg.seed, self.faiss_gpus())
            removed, stats = dedup_stage(self.ranks, self.image_store(), self.out / "dedup", settings, self.pool.uids,
                                         log=self.log)
        else:
            self.ranks.on_zero(save_npy, self.out / "dedup" / "removed.npy", np.zeros(0, np.int64))
            removed, stats = [], {"groups": 0, "removed": 0, "kept": n, "group_sizes": {}}
        self.log(f"dedup: {stats['removed']:,} near duplicates removed in {stats['groups']:,} groups; "
                 f"{stats['kept']:,} of {n:,} left")
        return stats

    def _level_outputs(self, i: int) -> Callable[[], List[Path]]:
        def outputs() -> List[Path]:
            folder = self.out / "cluster" / f"level{i + 1}"
            chunks = len(self.grid()) if i == 0 else len(Grid(self.cfg.cluster.levels[i - 1], self.cfg.cluster.chunk_size))
            return [folder / "centroids.npy"] + [part_path(folder / name, j) for name in ("assignment", "dist2")
                                                 for j in range(chunks)]
        return outputs

    def _cluster_level(self, i: int) -> Callable[[bool], Dict]:
        def work(resuming: bool) -> Dict:
            from .kmeans import KMeansOptions, kmeans_level
            from .store import ArrayView

            c = self.cfg.cluster
            folder = self.out / "cluster" / f"level{i + 1}"
            levels = list(c.levels)
            steps = per_level(c.resampling_steps, len(levels), "cluster.resampling_steps")[i]
            size = per_level(c.sample_size, len(levels), "cluster.sample_size")[i]

            def fit(ranks: Ranks) -> Dict:
                opts = KMeansOptions(c.iters, c.init, c.init_sample_per_centroid, c.chunk_size, self.faiss_gpus(),
                                     c.gpu_index == "shard")
                if i == 0:
                    kept = self.kept()
                    data = self.image_store(kept) if c.embeddings == "image" else self.text_store(kept)
                else:  # levels >= 2 cluster the level below's centroids: small, on rank 0 alone
                    data = ArrayView(load_array(self.out / "cluster" / f"level{i}" / "centroids.npy"))
                result = kmeans_level(data, int(levels[i]), opts, int(steps), size, self.cfg.seed, i + 1,
                                      checkpoint=folder, log=self.log, ranks=ranks)
                sizes = np.zeros(len(result.centroids), dtype=np.int64)
                for j, (a, d) in result.assigned.items():
                    save_npy(part_path(folder / "assignment", j), a)
                    save_npy(part_path(folder / "dist2", j), d)
                    sizes += np.bincount(a, minlength=len(sizes))
                sizes = ranks.all_reduce(sizes)
                if ranks.is_zero:
                    save_npy(folder / "centroids.npy", result.centroids)
                return {"items": int(len(data)), "clusters": int(levels[i]), "empty_clusters": int((sizes == 0).sum()),
                        "dim": int(data.dim), "chunks": len(result.chunks)}

            if i == 0:
                stats = fit(self.ranks)
                self.ranks.barrier()
                return stats
            stats = self.ranks.on_zero(fit, Ranks())
            if self.ranks.is_zero:
                self.ranks.items += stats["chunks"]
            return stats
        return work

    def upper_levels(self):
        """Levels 2.. of the hierarchy as ``KMeansLevel`` (small: each assigns the centroids of the level below)."""
        from .kmeans import KMeansLevel

        levels = []
        for i in range(1, len(self.cfg.cluster.levels)):
            folder = self.out / "cluster" / f"level{i + 1}"
            chunks = len(Grid(self.cfg.cluster.levels[i - 1], self.cfg.cluster.chunk_size))
            levels.append(KMeansLevel(load_array(folder / "centroids.npy"), read_parts(folder / "assignment", chunks),
                                      read_parts(folder / "dist2", chunks)))
        return levels

    def _image_balance(self, resuming: bool) -> Dict:
        from .sampling import balanced_selection, normalized_entropy, upper_sizes

        b, ranks = self.cfg.image_balance, self.ranks
        kept, grid = self.kept(), self.grid()
        n = len(kept)
        target = int(round(b.target_size * n)) if isinstance(b.target_size, float) and b.target_size <= 1 \
            else int(b.target_size)
        if target > n:
            raise ValueError(f"image_balance.target_size={b.target_size} asks for {target:,} samples, but the pool "
                             f"has {n:,} after de-duplication; lower it (an int, or a fraction such as 0.5)")
        level1 = self.out / "cluster" / "level1"
        k1 = int(self.cfg.cluster.levels[0])
        leaves = {j: (load_array(part_path(level1 / "assignment", j)), load_array(part_path(level1 / "dist2", j)),
                      grid.bounds(j)[0]) for j in ranks.share(len(grid))}
        upper = self.upper_levels()
        picked = balanced_selection(ranks, leaves, upper, k1, target, b.strategy, self.cfg.seed)
        before, after = np.zeros(k1, np.int64), np.zeros(k1, np.int64)
        for j, mask in picked.items():
            save_npy(part_path(self.out / "image_balance" / "rows", j), kept[slice(*grid.bounds(j))][mask])
            before += np.bincount(leaves[j][0], minlength=k1)
            after += np.bincount(leaves[j][0][mask], minlength=k1)
        before, after = ranks.all_reduce(before), ranks.all_reduce(after)
        widths = [len(lvl.centroids) for lvl in upper]
        top = [upper_sizes(x, [lvl.assignment for lvl in upper], widths)[-1] for x in (before, after)]
        self.log(f"image_balance: {int(after.sum()):,} of {n:,} samples; top-level cluster entropy "
                 f"{normalized_entropy(top[0]):.3f} -> {normalized_entropy(top[1]):.3f}")
        ranks.barrier()
        return {"target": target, "selected": int(after.sum())}

    def _text_balance(self, resuming: bool) -> Dict:
        from .text_balance import text_balance_stage

        kept, grid = self.kept(), self.grid()
        stats = text_balance_stage(self.ranks, self.out / "text_balance", len(grid),
                                   lambda j: kept[slice(*grid.bounds(j))], self.pool.columns, self.cfg.text_balance,
                                   self.cfg.seed, log=self.log)
        self.ranks.barrier()
        return stats

    def _combine_outputs(self) -> List[Path]:
        out, c = self.out / "curated", self.cfg.combine
        files = [out / "uids.npy", out / "manifest.parquet"] + self._chunk_parts(out / "manifest", ".parquet")
        if c.write_shards and files[0].is_file():
            shards = -(-len(load_array(files[0], mmap_mode="r")) // c.samples_per_shard)
            files += [out / "shards" / f"{i:06d}.tar" for i in range(shards)]
        return files

    def _combine(self, resuming: bool) -> Dict:
        from .combine import combine_selections, write_subset_parts

        c, grid = self.cfg.combine, self.grid()
        parts = {}
        for j in self.ranks.share(len(grid)):
            image = load_array(part_path(self.out / "image_balance" / "rows", j)) if self.cfg.image_balance.enabled else None
            text = load_array(part_path(self.out / "text_balance" / "rows", j)) if self.cfg.text_balance.enabled else None
            parts[j] = combine_selections(image, text, c.mode)
        stats = write_subset_parts(self.ranks, self.out / "curated", parts, len(grid), self.pool, self.units,
                                   self.cfg.pool, c.write_shards, c.samples_per_shard)
        self.log(f"combine ({c.mode}): {stats['samples']:,} pairs curated -> {self.out / 'curated'}")
        return stats

    def _report(self, resuming: bool) -> Dict:
        if self.ranks.is_zero:
            self.ranks.items += 1
        return self.ranks.on_zero(self._write_report)

    def _write_report(self) -> Dict:
        """The report, by rank 0 alone, reading the stages' parts a grid chunk at a time."""
        from .report import distribution_summary, write_report

        cfg = self.cfg
        kept, grid = self.kept(), self.grid()
        stats = {name: st.stats for name, (st, _, _, _) in self.stages.items()}
        report: Dict = {"name": cfg.name, "pool": stats["embed"], "kept": {"pool": len(self.pool), "dedup": len(kept)},
                        "dedup": stats["dedup"]}
        curated = self.out / "curated"

        def in_final(j: int) -> np.ndarray:  # which of chunk j's rows were curated
            rows, final = kept[slice(*grid.bounds(j))], load_array(part_path(curated / "rows", j))
            return np.isin(rows, final, assume_unique=True)
        cluster_counts = []
        if cfg.image_balance.enabled:
            report["kept"]["image_balance"] = int(stats["image_balance"]["selected"])
            upper = self.upper_levels()
            k1 = int(cfg.cluster.levels[0])
            before, after = np.zeros(k1, np.int64), np.zeros(k1, np.int64)
            for j in range(len(grid)):
                a = load_array(part_path(self.out / "cluster" / "level1" / "assignment", j))
                before += np.bincount(a, minlength=k1)
                after += np.bincount(a[in_final(j)], minlength=k1)
            from .sampling import upper_sizes

            widths = [len(lvl.centroids) for lvl in upper]
            tops = [upper_sizes(x, [lvl.assignment for lvl in upper], widths)[-1] for x in (before, after)]
            report["clusters"] = {}
            for title, b, a in (("level 1", before, after), (f"level {len(upper) + 1} (top)", *tops)):
                report["clusters"][title] = {"pool": distribution_summary(b), "curated": distribution_summary(a)}
                cluster_counts.append({"title": f"{title} clusters", "before": b, "after": a})
                if not upper:
                    break
        names, before, after = [], None, None
        if cfg.text_balance.enabled:
            report["kept"]["text_balance"] = int(stats["text_balance"]["selected"])
            folder = self.out / "text_balance"
            names = (folder / "entries.txt").read_text().splitlines()
            before = load_array(folder / "counts.npy")
            after = np.zeros(len(names), np.int64)
            for j in range(len(grid)):
                with load_array(part_path(folder / "matches", j, ".npz")) as z:
                    offsets, entries = z["offsets"], z["entries"]
                pair_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
                after += np.bincount(entries[in_final(j)[pair_of]], minlength=len(names))
            top = np.argsort(-before, kind="stable")[:20]
            report["concepts"] = {"pool": distribution_summary(before), "curated": distribution_summary(after),
                                  "top": [{"entry": names[i], "pool": int(before[i]), "curated": int(after[i])} for i in top]}
        report["kept"]["curated"] = int(stats["combine"]["samples"])
        report["seconds"] = {name: st._read("done.json").get("seconds") for name, (st, _, _, _) in self.stages.items()
                             if st.done}
        write_report(self.out / "report", report, cfg.report.plots, cluster_counts=cluster_counts,
                     concept_names=names, concept_before=before, concept_after=after)
        return {"curated": report["kept"]["curated"]}

    # ---------------------------------------------------------------- running
    def run(self, stage: Optional[str] = None, until: Optional[str] = None) -> Optional[Dict]:
        for name in (stage, until):
            if name is not None and name not in self.stages:
                raise ConfigError(f"unknown stage '{name}'; stages of this recipe: {', '.join(self.names)}")
        selected = [stage] if stage else self.names[:self.names.index(until) + 1] if until else self.names
        if stage:
            for need in self.stages[stage][2]:
                if not self.ranks.on_zero(lambda: self.stages[need][0].done):
                    raise ConfigError(f"stage '{stage}' needs '{need}', which is not done; run "
                                      f"'dinotxt curate RECIPE --until {need}' first")

        def prepare() -> None:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        self.ranks.on_zero(prepare)
        start = time.time()
        for name in selected:
            st, work, _, outputs = self.stages[name]
            run_stage(st, work, self.ranks, outputs)
        if "report" in selected:
            if self.ranks.is_zero:
                self.print_summary(time.time() - start)
            return self.ranks.on_zero(lambda: json.loads((self.out / "report" / "report.json").read_text()))
        return self.ranks.on_zero(lambda: {name: self.stages[name][0].stats for name in selected})

    def print_summary(self, seconds: float) -> None:
        report = json.loads((self.out / "report" / "report.json").read_text())
        print("\n" + "=" * 60)
        print(f"curation '{self.cfg.name}' ({self.cfg.combine.mode}): {self.out}/")
        print("-" * 60)
        print(f"{'stage':<22}{'samples kept':>16}{'seconds':>12}")
        seconds_of = {"pool": "embed", "dedup": "dedup", "image_balance": "image_balance",
                      "text_balance": "text_balance", "curated": "combine"}
        for name, count in report["kept"].items():
            s = report["seconds"].get(seconds_of.get(name, ""), None)
            print(f"{name:<22}{count:>16,}{(f'{s:.1f}' if s is not None else '-'):>12}")
        for title, item in report.get("clusters", {}).items():
            print(f"{title + ' cluster entropy':<30} pool {item['pool']['normalized_entropy']:.3f} -> "
                  f"curated {item['curated']['normalized_entropy']:.3f}  (1 = uniform)")
        if "concepts" in report:
            c = report["concepts"]
            print(f"{'metadata entry entropy':<30} pool {c['pool']['normalized_entropy']:.3f} -> "
                  f"curated {c['curated']['normalized_entropy']:.3f}")
        embedded = read_json(self.out / "embed" / "done.json").get("stats", {})
        skipped = {k: v for k, v in (embedded.get("skipped") or {}).items() if v}
        print(f"{'skipped while embedding':<30} "
              + (", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items())) or "none")
              + (" (not in the pool above)" if skipped else ""))
        print("-" * 60)
        print(f"uids: {self.out}/curated/uids.npy   manifest: {self.out}/curated/manifest.parquet")
        if self.cfg.combine.write_shards:
            print(f"shards: {self.out}/curated/shards/   (train: data.train={self.out}/curated/shards)")
        print(f"report: {self.out}/report/report.json + PNG plots   ({seconds:.0f} s this run)")
        print("=" * 60, flush=True)


def run_curation(recipe: Optional[str], overrides: List[str] = (), stage: Optional[str] = None,
                 until: Optional[str] = None, trust_code: bool = False, ranks: Optional[Ranks] = None) -> Optional[Dict]:
    """Resolve the recipe and run its stages (all, one, or up to one) on the processes the launcher started
    (one without a launcher). Returns the report (or stage statistics) on every rank."""
    cfg = load_curation_config(recipe, list(overrides))
    ranks = ranks or Ranks.from_env(cfg.processes.timeout_s)
    if not ranks.is_zero:  # the other ranks' progress lines would repeat rank 0's; their warnings still show
        for name in ("curation", "dinotxt"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    return Curation(cfg, trust_code, ranks).run(stage, until)
