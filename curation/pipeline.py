"""``dinotxt curate RECIPE``: the whole curation as a chain of resumable stages.

    <output_dir>/<name>/
      config.yaml                resolved recipe
      embed/                     image embeddings + metadata per pool unit   (embed)
      embed_text/                caption embeddings per pool unit            (embed_text)
      dedup/                     kept.npy: pool rows left after near-duplicate removal
      cluster/level{l}/          centroids, assignment, dist2 (+ phase checkpoints)  (cluster_level{l})
      image_balance/             rows.npy: balanced hierarchical sample
      text_balance/              entries.txt, matches, rows.npy: MetaCLIP-style balancing
      curated/                   uids.npy, manifest.parquet, shards/          (combine)
      report/                    report.json + PNG plots

Row indices saved by the stages are POOL rows (positions in the concatenated embedding
shards), so every selection can be mapped back to sample ids. Each stage is skipped when
done, resumed when interrupted, and recomputed when a setting it depends on changed
(``curation.stages``). ``--stage NAME`` runs one stage (its inputs must exist), e.g. each
k-means level as its own job; ``--until NAME`` stops after a stage.
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
from dinotxt.fileio import atomic_write_text

from .config import load_curation_config, per_level
from dinotxt.data.units import data_units
from .stages import Stage, fingerprint, run_stage
from .store import EmbeddingStore, save_npy, shard_paths

log = logging.getLogger(__name__)


class Curation:
    """The stages of one curation run, wired to the run folder.

    Args:
        cfg: resolved CurationConfig (``load_curation_config``).
        trust_code: allow the recipe to name code by import path (a backbone factory, a caption
            encoder; ``dinotxt.plugins``).
    """

    def __init__(self, cfg, trust_code: bool = False):
        self.cfg = cfg
        self.trust_code = trust_code
        self.out = Path(cfg.output_dir) / cfg.name
        self.units = data_units(cfg.pool.data, cfg.pool, cfg.pool.manifest_rows_per_unit, key="pool.data")
        if not self.units:
            raise ValueError(f"the pool {cfg.pool.data} has no samples")
        self._pool: Optional[Dict] = None
        self.stages: Dict[str, Tuple[Stage, Callable[[bool], Dict], List[str]]] = {}
        self._define()

    # ---------------------------------------------------------------- wiring
    def _add(self, name: str, folder: str, fp: str, work: Callable[[bool], Dict], needs: List[str],
             expensive: bool = False) -> str:
        self.stages[name] = (Stage(name, self.out / folder, fp, expensive), work, needs)
        return fp

    def _define(self) -> None:
        from .embed import backbone_config

        c = self.cfg
        pool_keys = {k: c.pool[k] for k in ("image_keys", "caption_key", "caption_json_field",
                                             "manifest_image_column", "manifest_caption_column")}
        # read from a pooled feature cache, the embeddings are the same up to the cache's fp16 tokens: its
        # weights hash is part of what they depend on
        from_cache = None
        if c.embed.from_cache:
            from dinotxt.data.cache import FeatureCache

            from_cache = FeatureCache(c.embed.from_cache).meta["weights_hash"]
        fp_embed = self._add("embed", "embed", fingerprint(
            "embed", [u.name for u in self.units], [(u.start, u.stop) for u in self.units], pool_keys,
            backbone_config(c.embed), *([("from_cache", from_cache)] if from_cache else [])), self._embed, [],
            expensive=True)
        e = c.embed
        fp_text = self._add("embed_text", "embed_text", fingerprint(
            "embed_text", fp_embed, e.text_encoder, e.text_dim, e.text_ngrams, e.text_kwargs), self._embed_text, ["embed"])
        fp_dedup = self._add("dedup", "dedup", fingerprint("dedup", fp_embed, c.dedup, c.seed), self._dedup, ["embed"])
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
                self._add(name, f"cluster/level{i + 1}", upstream[0], self._cluster_level(i), needs)
                needs = [name]
            fp_image = self._add("image_balance", "image_balance", fingerprint(
                "image_balance", upstream[0], c.image_balance, c.seed), self._image_balance, needs)
        fp_textbal = None
        if c.text_balance.enabled:
            vocab = hashlib.sha256(Path(c.text_balance.metadata).read_bytes()).hexdigest() if (
                c.text_balance.metadata and Path(c.text_balance.metadata).is_file()) else None
            fp_textbal = self._add("text_balance", "text_balance", fingerprint(
                "text_balance", fp_dedup, c.text_balance, vocab, c.seed), self._text_balance, ["dedup"])
        selections = [n for n, fp in (("image_balance", fp_image), ("text_balance", fp_textbal)) if fp]
        fp_combine = self._add("combine", "curated", fingerprint("combine", fp_image, fp_textbal, c.combine),
                               self._combine, selections)
        self._add("report", "report", fingerprint("report", fp_combine, c.report), self._report, ["combine"])

    @property
    def names(self) -> List[str]:
        return list(self.stages)

    # ---------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        log.info(f"{msg}")

    @property
    def pool(self) -> Dict:
        if self._pool is None:
            from .embed import load_pool_index

            self._pool = load_pool_index(self.out / "embed", self.units)
        return self._pool

    def image_store(self, rows: Optional[np.ndarray] = None) -> EmbeddingStore:
        # once embed is done, every shard must have the width it recorded (so a bad shard 0 is named too)
        return EmbeddingStore(shard_paths(self.out / "embed" / "image", len(self.units)), rows,
                              expect_dim=self.stages["embed"][0].stats.get("dim"))

    def text_store(self, rows: Optional[np.ndarray] = None) -> EmbeddingStore:
        return EmbeddingStore(shard_paths(self.out / "embed_text", len(self.units)), rows)

    def kept_rows(self) -> np.ndarray:
        return np.load(self.out / "dedup" / "kept.npy")

    def faiss_gpus(self) -> int:
        from .kmeans import faiss_gpus

        return faiss_gpus(self.cfg.cluster.device)

    # ---------------------------------------------------------------- stages
    def _embed(self, resuming: bool) -> Dict:
        from .embed import embed_images, read_skipped

        if not embed_images(self.cfg, self.units, self.out / "embed", self.trust_code):
            raise _NotGlobalZero()
        pool = self.pool  # checks that sample ids are unique
        store = self.image_store()
        return {"units": len(self.units), "samples": int(len(pool["uid"])), "dim": store.dim,
                "skipped": read_skipped(self.out / "embed", self.units)}

    def _embed_text(self, resuming: bool) -> Dict:
        from .embed import embed_texts

        return embed_texts(self.cfg, self.units, self.out / "embed", self.out / "embed_text", self.trust_code)

    def _dedup(self, resuming: bool) -> Dict:
        from .dedup import near_duplicates

        d = self.cfg.dedup
        n = len(self.pool["uid"])
        if d.enabled:
            keep, stats = near_duplicates(self.image_store(), self.pool["uid"], d.threshold, d.neighbors, d.index,
                                          d.flat_max, d.nlist, d.nprobe, d.chunk_size, self.cfg.seed, self.faiss_gpus())
        else:
            keep, stats = np.ones(n, dtype=bool), {"groups": 0, "removed": 0, "kept": n, "group_sizes": {}}
        save_npy(self.out / "dedup" / "kept.npy", np.flatnonzero(keep).astype(np.int64))
        self.log(f"dedup: {stats['removed']:,} near duplicates removed in {stats['groups']:,} groups; "
                 f"{stats['kept']:,} of {n:,} left")
        return stats

    def _cluster_level(self, i: int) -> Callable[[bool], Dict]:
        def work(resuming: bool) -> Dict:
            from .kmeans import KMeansOptions, kmeans_level
            from .store import ArrayView

            c = self.cfg.cluster
            opts = KMeansOptions(c.iters, c.init, c.init_sample_per_centroid, c.chunk_size, self.faiss_gpus(),
                                 c.gpu_index == "shard")
            if i == 0:
                rows = self.kept_rows()
                data = self.image_store(rows) if c.embeddings == "image" else self.text_store(rows)
            else:
                data = ArrayView(np.load(self.out / "cluster" / f"level{i}" / "centroids.npy"))
            levels = list(c.levels)
            steps = per_level(c.resampling_steps, len(levels), "cluster.resampling_steps")[i]
            size = per_level(c.sample_size, len(levels), "cluster.sample_size")[i]
            folder = self.out / "cluster" / f"level{i + 1}"
            result = kmeans_level(data, int(levels[i]), opts, int(steps), size, self.cfg.seed, i + 1,
                                  checkpoint=folder, log=lambda m: self.log(m))
            save_npy(folder / "centroids.npy", result.centroids)
            save_npy(folder / "assignment.npy", result.assignment)
            save_npy(folder / "dist2.npy", result.dist2)
            sizes = np.bincount(result.assignment, minlength=len(result.centroids))
            return {"items": int(len(data)), "clusters": int(levels[i]), "empty_clusters": int((sizes == 0).sum()),
                    "dim": int(data.dim)}
        return work

    def load_levels(self):
        from .kmeans import KMeansLevel

        levels = []
        for i in range(len(self.cfg.cluster.levels)):
            folder = self.out / "cluster" / f"level{i + 1}"
            levels.append(KMeansLevel(np.load(folder / "centroids.npy"), np.load(folder / "assignment.npy"),
                                      np.load(folder / "dist2.npy")))
        return levels

    def _image_balance(self, resuming: bool) -> Dict:
        from .kmeans import cluster_sizes
        from .sampling import balanced_sample, normalized_entropy

        b = self.cfg.image_balance
        rows = self.kept_rows()
        target = int(round(b.target_size * len(rows))) if isinstance(b.target_size, float) and b.target_size <= 1 \
            else int(b.target_size)
        if target > len(rows):
            raise ValueError(f"image_balance.target_size={b.target_size} asks for {target:,} samples, but the pool "
                             f"has {len(rows):,} after de-duplication; lower it (an int, or a fraction such as 0.5)")
        levels = self.load_levels()
        picked = balanced_sample(levels, target, b.strategy, self.cfg.seed)
        save_npy(self.out / "image_balance" / "rows.npy", rows[picked])
        top_before = cluster_sizes(levels)[-1]
        mask = np.zeros(len(rows), dtype=bool)
        mask[picked] = True
        leaf_after = np.bincount(levels[0].assignment[mask], minlength=len(levels[0].centroids))
        self.log(f"image_balance: {len(picked):,} of {len(rows):,} samples; top-level cluster entropy "
                 f"{normalized_entropy(top_before):.3f} -> {normalized_entropy(self._top_counts(levels, leaf_after)):.3f}")
        return {"target": target, "selected": int(len(picked))}

    @staticmethod
    def _top_counts(levels, leaf_counts: np.ndarray) -> np.ndarray:
        counts = leaf_counts
        for lvl in levels[1:]:
            counts = np.bincount(lvl.assignment, weights=counts, minlength=len(lvl.centroids)).astype(np.int64)
        return counts

    def _text_balance(self, resuming: bool) -> Dict:
        from .text_balance import EntryMatcher, balance, mine_metadata, read_metadata

        t = self.cfg.text_balance
        rows = self.kept_rows()
        captions = [self.pool["caption"][r] for r in rows]
        if t.metadata:
            entries, source = read_metadata(t.metadata), t.metadata
        else:
            entries = mine_metadata(captions, t.mine_max_ngram, t.mine_min_count, t.mine_max_entries, t.mine_stopwords)
            source = "mined from the captions"
            if not entries:
                raise ValueError(f"no metadata entry occurs in {t.mine_min_count} or more captions; lower "
                                 "text_balance.mine_min_count or give a vocabulary file (text_balance.metadata)")
        folder = self.out / "text_balance"
        atomic_write_text(folder / "entries.txt", "\n".join(entries) + "\n")
        match = EntryMatcher(entries)
        matches = [match(c) for c in captions]
        offsets = np.cumsum([0] + [len(m) for m in matches]).astype(np.int64)
        save_npy(folder / "match_offsets.npy", offsets)
        save_npy(folder / "match_entries.npy", np.fromiter((e for m in matches for e in m), np.int64, int(offsets[-1])))
        keep, counts = balance(matches, self.pool["uid"][rows], len(entries), t.t, self.cfg.seed, t.keep_unmatched)
        save_npy(folder / "counts.npy", counts)
        save_npy(folder / "rows.npy", rows[keep])
        unmatched = int(sum(1 for m in matches if not m))
        self.log(f"text_balance: {len(entries):,} entries ({source}); {unmatched:,} captions match none; "
                 f"{int(keep.sum()):,} of {len(rows):,} kept with t={t.t}")
        return {"entries": len(entries), "metadata": source, "unmatched": unmatched, "selected": int(keep.sum()),
                "capped_entries": int((counts > t.t).sum())}

    def _combine(self, resuming: bool) -> Dict:
        from .combine import combine_selections, write_subset

        c = self.cfg.combine
        image = np.load(self.out / "image_balance" / "rows.npy") if self.cfg.image_balance.enabled else None
        text = np.load(self.out / "text_balance" / "rows.npy") if self.cfg.text_balance.enabled else None
        rows = combine_selections(image, text, c.mode)
        stats = write_subset(self.out / "curated", rows, self.pool, self.units, self.cfg.pool, c.write_shards,
                             c.samples_per_shard)
        self.log(f"combine ({c.mode}): {len(rows):,} pairs curated -> {self.out / 'curated'}")
        return stats

    def _report(self, resuming: bool) -> Dict:
        from .report import distribution_summary, write_report

        cfg = self.cfg
        n = len(self.pool["uid"])
        kept = self.kept_rows()
        final = np.load(self.out / "curated" / "uids.npy")
        final_rows = np.flatnonzero(np.isin(self.pool["uid"], final))
        report: Dict = {"name": cfg.name, "pool": self.stages["embed"][0].stats,
                        "kept": {"pool": n, "dedup": int(len(kept))}, "dedup": self.stages["dedup"][0].stats}
        cluster_counts = []
        if cfg.image_balance.enabled:
            report["kept"]["image_balance"] = int(len(np.load(self.out / "image_balance" / "rows.npy")))
            levels = self.load_levels()
            in_final = np.isin(kept, final_rows)
            leaf_before = np.bincount(levels[0].assignment, minlength=len(levels[0].centroids))
            leaf_after = np.bincount(levels[0].assignment[in_final], minlength=len(levels[0].centroids))
            report["clusters"] = {}
            for title, before, after in (("level 1", leaf_before, leaf_after),
                                         (f"level {len(levels)} (top)", self._top_counts(levels, leaf_before),
                                          self._top_counts(levels, leaf_after))):
                report["clusters"][title] = {"pool": distribution_summary(before), "curated": distribution_summary(after)}
                cluster_counts.append({"title": f"{title} clusters", "before": before, "after": after})
                if len(levels) == 1:
                    break
        names, before, after = [], None, None
        if cfg.text_balance.enabled:
            report["kept"]["text_balance"] = int(len(np.load(self.out / "text_balance" / "rows.npy")))
            folder = self.out / "text_balance"
            names = (folder / "entries.txt").read_text().splitlines()
            offsets, entries = np.load(folder / "match_offsets.npy"), np.load(folder / "match_entries.npy")
            row_of_pair = np.repeat(np.arange(len(kept)), np.diff(offsets))
            before = np.bincount(entries, minlength=len(names))
            after = np.bincount(entries[np.isin(kept, final_rows)[row_of_pair]], minlength=len(names))
            top = np.argsort(-before, kind="stable")[:20]
            report["concepts"] = {"pool": distribution_summary(before), "curated": distribution_summary(after),
                                  "top": [{"entry": names[i], "pool": int(before[i]), "curated": int(after[i])} for i in top]}
        report["kept"]["curated"] = int(len(final))
        report["seconds"] = {name: st._read("done.json").get("seconds") for name, (st, _, _) in self.stages.items()
                             if st.done}
        write_report(self.out / "report", report, cfg.report.plots, cluster_counts=cluster_counts,
                     concept_names=names, concept_before=before, concept_after=after)
        return {"curated": int(len(final))}

    # ---------------------------------------------------------------- running
    def run(self, stage: Optional[str] = None, until: Optional[str] = None) -> Optional[Dict]:
        for name in (stage, until):
            if name is not None and name not in self.stages:
                raise ConfigError(f"unknown stage '{name}'; stages of this recipe: {', '.join(self.names)}")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        selected = [stage] if stage else self.names[:self.names.index(until) + 1] if until else self.names
        if stage:
            for need in self.stages[stage][2]:
                if not self.stages[need][0].done:
                    raise ConfigError(f"stage '{stage}' needs '{need}', which is not done; run "
                                      f"'dinotxt curate RECIPE --until {need}' first")
        start = time.time()
        try:
            for name in selected:
                st, work, _ = self.stages[name]
                run_stage(st, work)
        except _NotGlobalZero:
            return None  # a non-zero rank of a multi-GPU embed: rank 0 carries on alone
        if "report" in selected:
            self.print_summary(time.time() - start)
            return json.loads((self.out / "report" / "report.json").read_text())
        return {name: self.stages[name][0].stats for name in selected}

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
        print("-" * 60)
        print(f"uids: {self.out}/curated/uids.npy   manifest: {self.out}/curated/manifest.parquet")
        if self.cfg.combine.write_shards:
            print(f"shards: {self.out}/curated/shards/   (train: data.train={self.out}/curated/shards)")
        print(f"report: {self.out}/report/report.json + PNG plots   ({seconds:.0f} s this run)")
        print("=" * 60, flush=True)


class _NotGlobalZero(Exception):
    """Raised inside a non-zero rank after its share of a multi-GPU embedding is written."""


def run_curation(recipe: Optional[str], overrides: List[str] = (), stage: Optional[str] = None,
                 until: Optional[str] = None, trust_code: bool = False) -> Optional[Dict]:
    """Resolve the recipe and run its stages (all, one, or up to one). Returns the report (or stage statistics)."""
    cfg = load_curation_config(recipe, list(overrides))
    return Curation(cfg, trust_code).run(stage, until)
