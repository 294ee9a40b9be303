"""Curation (METHOD.md section 7): balanced hierarchical sampling, faiss k-means with resampling
against the pure-torch reference, near-duplicate removal, MetaCLIP text balancing, combine and
its outputs, resumability (interrupted / killed stages resume bit-identically, settings changes
recompute only downstream stages), clear one-line errors on bad input, and the ``dinotxt curate``
CLI end to end on a tiny pool (recipes/curation/debug.yaml, 1-block backbone)."""
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from curation.combine import combine_selections, uid_key
from curation.dedup import near_duplicates
from curation.kmeans import (KMeansLevel, KMeansOptions, assign, closest_per_cluster, cluster_sizes, grid_chunks,
                             hierarchical_kmeans,
                             kmeans, kmeans_level, kmeans_plusplus, lloyd, rank_within_clusters)
from curation.kmeans_reference import (torch_hierarchical_kmeans, torch_kmeans, torch_kmeans_plusplus,
                                       torch_lloyd)
from curation.sampling import allocate, balanced_sample, find_cap, leaf_budgets
from curation.store import ArrayView, EmbeddingStore, KeptRows, load_table, read_parts
from curation.text_balance import (EntryMatcher, balance, mine_metadata, read_metadata, substring_matches,
                                   uniform_hash)

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "curation" / "debug.yaml")
POOL_SIZE = 240
STAGES = ["embed", "embed_text", "dedup", "cluster_level1", "cluster_level2", "image_balance", "text_balance",
          "combine", "report"]
QUIET = lambda msg: None  # noqa: E731
FAST = ["combine.write_shards=false", "report.plots=false"]  # for reruns that test an earlier stage


# ====================================================================== helpers
def _level(assignment, dist2=None, k=None) -> KMeansLevel:
    assignment = np.asarray(assignment, dtype=np.int64)
    k = int(assignment.max()) + 1 if k is None else k
    dist2 = np.zeros(len(assignment), np.float32) if dist2 is None else np.asarray(dist2, np.float32)
    return KMeansLevel(np.zeros((k, 2), np.float32), assignment, dist2)


def _same_partition(a, b) -> bool:
    """True when the labelings a and b group the items identically (up to renaming the labels)."""
    a, b = np.asarray(a), np.asarray(b)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    nz = table > 0
    return bool((nz.sum(1) <= 1).all() and (nz.sum(0) <= 1).all())


def _subprocess_env():
    # one OpenMP thread: faiss's parallel regions on tiny inputs crawl on a busy 2-core machine
    # (the embeddings do not depend on the thread count; the tests compare them across processes)
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _curate(out_dir, *overrides, world, stage=None, until=None, capsys=None):
    """run_curation in-process on the tiny pool; returns (result, {stage: action}) when capsys is given."""
    from curation.pipeline import run_curation

    result = run_curation(RECIPE, [f"pool.data={world}", f"output_dir={out_dir}", *overrides], stage=stage,
                          until=until)
    if capsys is None:
        return result
    _curate.stdout = capsys.readouterr().out  # the log of the last captured run
    return result, _actions(_curate.stdout)


def _actions(stdout: str):
    """{stage: 'skipped' | 'running' | 'resuming'} from the '[curate] NAME: ...' log lines."""
    actions = {}
    for name, what in re.findall(r"^\[curate\] (\w+): (done earlier, skipped|running|resuming)$", stdout, re.M):
        actions[name] = {"done earlier, skipped": "skipped"}.get(what, what)
    return actions


def _cli(*args, capsys):
    """``dinotxt curate ...`` in-process (the CLI's own error handling); returns (rc, stdout, stderr)."""
    from dinotxt.cli import main

    rc = main(["curate", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_line_error(rc, err) -> str:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinotxt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _clone(ref_out: Path, dest: Path, keep=None) -> Path:
    """Copy the reference run (or only the ``keep`` stage folders of it) to a new output_dir."""
    target = dest / "debug"
    if keep is None:
        shutil.copytree(ref_out / "debug", target)
    else:
        for folder in keep:
            shutil.copytree(ref_out / "debug" / folder, target / folder)
    return dest


# Every file a finished run leaves (the per-stage markers and the resolved config aside).
OUTPUT_GLOBS = ["embed/image/*.npy", "embed/meta/*.parquet", "embed/meta/*.json", "embed/uids/*.npy", "embed/rows.npy",
                "embed_text/*.npy", "embed_text/df/*.npz", "dedup/removed.npy", "dedup/hits/*.npz", "dedup/edges/*.npy",
                "cluster/level*/centroids.npy", "cluster/level*/assignment/*.npy", "cluster/level*/dist2/*.npy",
                "cluster/level*/phase_*.npz", "image_balance/rows/*.npy", "text_balance/*.npy",
                "text_balance/entries.txt", "text_balance/matches/*.npz", "text_balance/rows/*.npy",
                "text_balance/mine/*.parquet", "curated/uids.npy", "curated/manifest.parquet", "curated/rows/*.npy",
                "curated/uids/*.npy", "curated/manifest/*.parquet", "curated/uid_buckets/*.npy",
                "curated/shards/*.tar", "report/*.png"]


def _kept(run: Path) -> np.ndarray:
    """The pool rows left after de-duplication."""
    removed = np.load(run / "dedup" / "removed.npy")
    return np.setdiff1d(np.arange(POOL_SIZE if "debug" in str(run) else len(_pool_table(run)["uid"])), removed)


def _parts(folder: Path) -> np.ndarray:
    """A per-chunk output (rows of a selection, a level's assignment) as one array in chunk order."""
    return read_parts(folder, len(list(folder.glob("*.npy"))))


def _assert_identical_runs(a: Path, b: Path):
    """Every output file of run a equals run b byte for byte; no duplicate or missing rows."""
    a, b = Path(a) / "debug", Path(b) / "debug"
    for pattern in OUTPUT_GLOBS:
        fa = sorted(p.relative_to(a) for p in a.glob(pattern))
        fb = sorted(p.relative_to(b) for p in b.glob(pattern))
        assert fa == fb and fa, pattern
        for rel in fa:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    ra, rb = (json.loads((x / "report" / "report.json").read_text()) for x in (a, b))
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb
    uids = np.load(b / "curated" / "uids.npy")
    assert len(np.unique(uids)) == len(uids) == ra["kept"]["curated"]
    metas = sorted((b / "embed" / "meta").glob("*.parquet"))
    pool_uids = np.concatenate([load_table(p, ["uid"])["uid"] for p in metas])
    assert len(np.unique(pool_uids)) == len(pool_uids) == POOL_SIZE
    assert sum(len(np.load(p, mmap_mode="r")) for p in (b / "embed" / "image").glob("*.npy")) == POOL_SIZE


# ====================================================================== fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One OpenMP thread in this module: the inputs are tiny, and faiss's parallel regions spin for
    milliseconds per search on a busy 2-core machine (torch shares the OpenMP runtime and resets its
    thread count, so both are set). No result depends on it: the tests compare outputs across processes."""
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    faiss.omp_set_num_threads(before[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pool: 240 demo-world pairs (48 px) in 4 webdataset shards (64, 64, 64, 48)."""
    from dinotxt.data.world import write_split

    root = tmp_path_factory.mktemp("pool") / "train"
    shards = write_split(root, POOL_SIZE, seed=0, size=48, samples_per_shard=64)
    assert len(shards) == 4
    return root


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted run of the debug recipe (shards written); never modified by the tests."""
    out = tmp_path_factory.mktemp("reference")
    report = _curate(out, world=world)
    return out, report


# ====================================================================== 1. balanced sampling
def test_find_cap_is_the_largest_cap_that_fits_the_target():
    # sizes [10, 5, 2, 1], T=12: c=4 gives 4+4+2+1 = 11 <= 12, c=5 gives 13 > 12
    assert find_cap(np.array([10, 5, 2, 1]), 12) == 4
    assert find_cap(np.array([10, 5, 2, 1]), 11) == 4
    assert find_cap(np.array([10, 5, 2, 1]), 10) == 3  # 3+3+2+1 = 9; 4 -> 11
    assert find_cap(np.array([6, 6, 6]), 17) == 5
    assert find_cap(np.array([6, 6, 6]), 0) == 0
    assert find_cap(np.array([6, 6, 6]), 18) == 6
    rng = np.random.default_rng(0)
    for _ in range(200):  # brute force: scan every cap
        sizes = rng.integers(0, 30, size=rng.integers(1, 9))
        target = int(rng.integers(0, sizes.sum() + 1))
        best = max(c for c in range(0, int(sizes.max()) + 1) if np.minimum(sizes, c).sum() <= target)
        assert find_cap(sizes, target) == best


def test_allocate_spreads_the_remainder_most_points_left_first_then_lower_index():
    # [10, 5, 2, 1], T=12: cap 4 -> [4, 4, 2, 1] = 11; the 1 left goes to cluster 0 (6 points left vs 1)
    assert allocate(np.array([10, 5, 2, 1]), 12).tolist() == [5, 4, 2, 1]
    # [10, 7, 7, 3, 1], T=20: cap 5 -> 19; cluster 0 has 5 left, clusters 1, 2 have 2
    assert allocate(np.array([10, 7, 7, 3, 1]), 20).tolist() == [6, 5, 5, 3, 1]
    # [8, 9, 9, 1], T=21: cap 6 -> 19; 2 left go to clusters 1 and 2 (3 left each) before cluster 0 (2 left)
    assert allocate(np.array([8, 9, 9, 1]), 21).tolist() == [6, 7, 7, 1]
    # ties: lower index first
    assert allocate(np.array([9, 9, 9, 1]), 20).tolist() == [7, 6, 6, 1]
    assert allocate(np.array([6, 6, 6]), 10).tolist() == [4, 3, 3]
    # small clusters are kept whole, a target >= the pool keeps everything, 0 keeps nothing
    assert allocate(np.array([50, 3, 1]), 10).tolist() == [6, 3, 1]
    assert allocate(np.array([4, 3]), 99).tolist() == [4, 3]
    assert allocate(np.array([4, 3]), 0).tolist() == [0, 0]
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = rng.integers(0, 40, size=rng.integers(1, 12))
        target = int(rng.integers(0, sizes.sum() + 1))
        b = allocate(sizes, target)
        assert b.sum() == target and (b <= sizes).all() and (b >= 0).all()
        cap = find_cap(sizes, target)
        assert ((b == np.minimum(sizes, cap)) | (b == cap + 1)).all()  # never more than one above the cap


def _reference_budgets(children_of, sizes_by_level, top_target):
    """Independent recursive version of the balanced allocation (linear cap scan, sorted remainder)."""
    def split(sizes, budget):
        sizes = list(sizes)
        if budget >= sum(sizes):
            return sizes
        cap = max(c for c in range(max(sizes) + 1) if sum(min(c, s) for s in sizes) <= budget)
        out = [min(c, cap) for c in sizes]
        rest = budget - sum(out)
        for i in sorted((i for i, s in enumerate(sizes) if s > cap), key=lambda i: (-(sizes[i] - cap), i))[:rest]:
            out[i] += 1
        return out

    top = len(sizes_by_level) - 1
    budgets = {top: split(sizes_by_level[top], top_target)}
    for lvl in range(top, 0, -1):
        child = [0] * len(sizes_by_level[lvl - 1])
        for parent, b in enumerate(budgets[lvl]):
            kids = children_of[lvl][parent]
            for kid, kb in zip(kids, split([sizes_by_level[lvl - 1][k] for k in kids], b) if kids else []):
                child[kid] = kb
        budgets[lvl - 1] = child
    return [budgets[i] for i in range(top + 1)]


def test_balanced_sampling_recurses_through_the_levels():
    # level 1: leaf clusters with 12, 2, 3, 3, 1 points; level 2: leaves {0, 1} -> top 0 (14), {2, 3, 4} -> top 1 (7)
    leaf_of_point = np.repeat(np.arange(5), [12, 2, 3, 3, 1])
    levels = [_level(leaf_of_point, k=5), _level([0, 0, 1, 1, 1], k=2)]
    assert [s.tolist() for s in cluster_sizes(levels)] == [[12, 2, 3, 3, 1], [14, 7]]
    budgets = leaf_budgets(levels, 12)
    # top: cap 6 -> [6, 6]; top 0 splits 6 over [12, 2] -> [4, 2]; top 1 splits 6 over [3, 3, 1]:
    # cap 2 -> 5, the 1 left goes to the first of the tied clusters -> [3, 2, 1]
    assert budgets[1].tolist() == [6, 6]
    assert budgets[0].tolist() == [4, 2, 3, 2, 1]
    # not what a flat allocation over the leaves gives: the hierarchy matters
    assert allocate(np.array([12, 2, 3, 3, 1]), 12).tolist() == [3, 2, 3, 3, 1]
    picked = balanced_sample(levels, 12)
    assert np.bincount(leaf_of_point[picked], minlength=5).tolist() == [4, 2, 3, 2, 1]

    rng = np.random.default_rng(2)
    for trial in range(30):  # random 3-level hierarchies against the independent recursive version
        k1, k2, k3 = int(rng.integers(6, 15)), int(rng.integers(3, 6)), int(rng.integers(1, 3))
        a1 = rng.integers(0, k1, size=int(rng.integers(40, 200)))
        a2, a3 = rng.integers(0, k2, size=k1), rng.integers(0, k3, size=k2)
        levels = [_level(a1, k=k1), _level(a2, k=k2), _level(a3, k=k3)]
        sizes = [s.tolist() for s in cluster_sizes(levels)]
        children = {1: [list(np.flatnonzero(a2 == p)) for p in range(k2)],
                    2: [list(np.flatnonzero(a3 == p)) for p in range(k3)]}
        target = int(rng.integers(0, len(a1) + 1))
        expected = _reference_budgets(children, sizes, target)
        assert [b.tolist() for b in leaf_budgets(levels, target)] == expected, trial
        picked = balanced_sample(levels, target, "random", seed=trial)
        assert len(picked) == target and len(np.unique(picked)) == target  # exactly the target, no repeats
        assert np.bincount(a1[picked], minlength=k1).tolist() == expected[0]


def test_leaves_give_their_closest_points_first_or_a_seeded_random_subset():
    rng = np.random.default_rng(3)
    assignment = rng.permutation(np.repeat(np.arange(3), [10, 6, 2]))
    dist2 = rng.permutation(np.arange(18)).astype(np.float32) * 0.5 + 0.25
    levels = [_level(assignment, dist2, k=3)]
    picked = balanced_sample(levels, 9, "closest")  # cap 3 -> [3, 3, 2] = 8, +1 to cluster 0 -> [4, 3, 2]
    assert len(picked) == 9 and np.all(np.diff(picked) > 0)  # sorted positions
    for cluster, budget in enumerate([4, 3, 2]):
        members = np.flatnonzero(assignment == cluster)
        closest = members[np.argsort(dist2[members])[:budget]]
        assert sorted(closest) == sorted(set(picked) & set(members)), cluster
    # random: the same per-leaf budgets, reproducible per seed, not the closest points, and uniform within a leaf
    draws = [balanced_sample(levels, 9, "random", seed=s) for s in range(400)]
    for d in draws[:20]:
        assert np.bincount(assignment[d], minlength=3).tolist() == [4, 3, 2]
    assert np.array_equal(balanced_sample(levels, 9, "random", seed=5), draws[5])
    assert any(not np.array_equal(d, picked) for d in draws)
    freq = np.bincount(np.concatenate(draws), minlength=18) / len(draws)
    leaf0 = np.flatnonzero(assignment == 0)
    assert np.abs(freq[leaf0] - 0.4).max() < 0.1  # every point of the 10-point leaf is taken ~4/10 of the time
    assert np.all(freq[assignment == 2] == 1.0)  # the 2-point leaf is kept whole
    # ranking inside clusters: ties go to the lower position
    assert rank_within_clusters(np.array([1, 0, 1, 1, 0]), np.array([2.0, 1.0, 2.0, 0.5, 1.0])).tolist() == \
        [1, 0, 2, 0, 1]


def test_sample_size_is_exactly_the_target_and_never_larger_than_the_pool():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    levels = hierarchical_kmeans(ArrayView(x), [20, 4], KMeansOptions(iters=10), [1, 1], [None, None], seed=0,
                                 log=QUIET)
    assert len(levels[1].assignment) == 20  # level 2 clusters the 20 centroids of level 1
    for target in (0, 1, 37, 150, 299, 300):
        for strategy in ("closest", "random"):
            picked = balanced_sample(levels, target, strategy)
            assert len(picked) == target and len(np.unique(picked)) == target
    with pytest.raises(ValueError, match="larger than the pool"):
        balanced_sample(levels, 301)
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        balanced_sample(levels, 10, "farthest")


# ====================================================================== 2. k-means vs the torch reference
def _assert_assignment_is_decisive(x, centroids, over=10.0):
    """Exact equality of two implementations' assignments is a fair claim only where no point sits
    on a tie: fp32 evaluates |x|^2 - 2 x.c + |c|^2 to a few ulps of |x|^2 + |c|^2, so the gap
    between each point's two nearest squared distances must exceed ``over`` times 8 such ulps."""
    d = ((x[:, None].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    near = np.sort(d, axis=1)
    scale = (x.astype(np.float64) ** 2).sum(1) + (centroids.astype(np.float64) ** 2).sum(1).max()
    assert ((near[:, 1] - near[:, 0]) > over * 8 * 2.0 ** -24 * scale).all()


def test_lloyd_matches_the_torch_reference_from_the_same_init():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(6, 8))
    x = (centers[rng.integers(6, size=500)] + rng.normal(0, 1.0, size=(500, 8))).astype(np.float32)
    init = np.concatenate([x[rng.choice(500, 7, replace=False)], np.full((1, 8), 100.0, np.float32)])
    for iters in (1, 3, 50):
        ours = lloyd(ArrayView(x), init, KMeansOptions(iters=iters, chunk_size=64))  # chunked float64 sums
        c, a, d = torch_lloyd(torch.from_numpy(x), torch.from_numpy(init), iters)
        _assert_assignment_is_decisive(x, ours.centroids[:7])
        assert np.array_equal(ours.assignment, a.numpy())
        np.testing.assert_allclose(ours.centroids, c.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(ours.dist2, d.numpy(), rtol=1e-4, atol=1e-3)
        # the far-away centroid never gets a point and keeps its place (no splitting)
        assert not (ours.assignment == 7).any() and np.all(ours.centroids[7] == 100.0)
        # dist2 is the squared distance to the assigned centroid
        np.testing.assert_allclose(ours.dist2, ((x - ours.centroids[ours.assignment]) ** 2).sum(1), rtol=1e-4,
                                   atol=1e-3)
    # converged: every centroid is the mean of its points (computed in float64)
    for j in range(7):
        np.testing.assert_allclose(ours.centroids[j], x[ours.assignment == j].astype(np.float64).mean(0), atol=1e-5)


def _blobs(rng, sizes, dim, spread, noise):
    centers = rng.normal(size=(len(sizes), dim))
    centers *= spread / np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return (centers[labels] + rng.normal(0, noise, (len(labels), dim))).astype(np.float32), labels, centers


def test_kmeans_plusplus_seeds_one_centre_per_separated_blob_in_both_implementations():
    rng = np.random.default_rng(5)
    x, labels, centers = _blobs(rng, [500, 20, 20, 20, 20], dim=4, spread=100.0, noise=0.1)
    for seed in range(5):
        ours = kmeans_plusplus(x, 5, np.random.default_rng(seed))
        ref = torch_kmeans_plusplus(torch.from_numpy(x), 5, torch.Generator().manual_seed(seed)).numpy()
        for seeds in (ours, ref):
            nearest_blob = np.argmin(((seeds[:, None] - centers[None]) ** 2).sum(-1), axis=1)
            assert sorted(nearest_blob) == [0, 1, 2, 3, 4]  # the 500-point blob gets ONE seed, like the others
            assert all(any(np.array_equal(s, p) for p in x) for s in seeds)  # seeds are data points


def test_faiss_kmeans_matches_the_reference_on_separated_data():
    """Same algorithm (k-means++ on a subset, Lloyd, R resampling steps per level, level 2 on the
    level-1 centroids): the two implementations find the same partitions and centroids."""
    rng = np.random.default_rng(1)
    sup = rng.normal(size=(4, 16))
    sup *= 200 / np.linalg.norm(sup, axis=1, keepdims=True)
    sub = (sup[:, None] + rng.normal(0, 5, (4, 3, 16))).reshape(12, 16)
    truth = np.repeat(np.arange(12), rng.integers(10, 60, 12))
    x = (sub[truth] + rng.normal(0, 0.1, (len(truth), 16))).astype(np.float32)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(sub, 2)) > 10
    for seed in range(3):
        ours = hierarchical_kmeans(ArrayView(x), [12, 4], KMeansOptions(iters=50, chunk_size=100), [1, 1],
                                   [None, None], seed=seed, log=QUIET)
        ref = torch_hierarchical_kmeans(torch.from_numpy(x), [12, 4], 50, [1, 1], [None, None], seed=seed)
        a1, r1 = ours[0].assignment, ref[0][1].numpy()
        assert _same_partition(a1, r1) and _same_partition(a1, truth)
        assert _same_partition(ours[1].assignment[a1], ref[1][1].numpy()[r1])
        assert _same_partition(ours[1].assignment[a1], truth // 3)  # level 2 recovers the super-clusters
        # centroid sets within tolerance, one to one. The refit centroids are means of the s points closest
        # to each phase-0 centroid; points ~200 from the origin at ~0.4 from their centroid rank slightly
        # differently under float32 |x|^2 - 2xc + |c|^2 in faiss and torch, so the subsets (and means) may
        # differ by a point: 0.2 is half the blob radius, and the blobs are > 10 apart.
        for mine, theirs in ((ours[0].centroids, ref[0][0].numpy()), (ours[1].centroids, ref[1][0].numpy())):
            gap = np.sqrt(((mine[:, None] - theirs[None]) ** 2).sum(-1))
            assert gap.min(1).max() < 0.2 and sorted(gap.argmin(1)) == list(range(len(theirs)))
    # plain k-means (no resampling), seeded by different RNGs: the same partition, so the same means
    ours = kmeans(ArrayView(x), 12, KMeansOptions(iters=50), np.random.default_rng(0))
    c, a, _ = torch_kmeans(torch.from_numpy(x), 12, 50, seed=0)
    gap = np.sqrt(((ours.centroids[:, None] - c.numpy()[None]) ** 2).sum(-1))
    assert _same_partition(ours.assignment, a.numpy()) and _same_partition(ours.assignment, truth)
    assert gap.min(1).max() < 1e-3 and sorted(gap.argmin(1)) == list(range(12))


def test_closest_per_cluster_takes_the_s_nearest_of_every_cluster():
    assignment = np.array([0, 0, 0, 1, 1, 2, 0, 1])
    dist2 = np.array([3.0, 1.0, 2.0, 5.0, 4.0, 9.0, 0.5, 4.0], np.float32)
    assert closest_per_cluster(assignment, dist2, 2).tolist() == [1, 4, 5, 6, 7]  # tie 4.0: lower position first
    assert closest_per_cluster(assignment, dist2, 1).tolist() == [4, 5, 6]
    assert closest_per_cluster(assignment, dist2, 10).tolist() == list(range(8))


def test_resampling_step_refits_on_the_closest_points_and_reassigns_all(tmp_path):
    """R=1: phase 1 is k-means fitted on the s points of each phase-0 cluster closest to its centroid,
    then EVERY point is assigned to the nearest refitted centroid."""
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.normal(0, 1, (600, 3)), rng.normal(6, 0.2, (60, 3))]).astype(np.float32)
    opts = KMeansOptions(iters=20, chunk_size=128)
    final = kmeans_level(ArrayView(x), 8, opts, 1, 5, seed=3, level=1, checkpoint=tmp_path, log=QUIET)
    with np.load(tmp_path / "phase_000.npz") as z:  # a phase's checkpoint: its centroids (and how many items)
        p0 = assign(ArrayView(x), z["centroids"], opts).level()
        assert int(z["items"][0]) == len(x)
    with np.load(tmp_path / "phase_001.npz") as z:
        p1 = assign(ArrayView(x), z["centroids"], opts).level()
    assert np.array_equal(final.centroids, p1.centroids) and np.array_equal(final.assignment, p1.assignment)
    rows = closest_per_cluster(p0.assignment, p0.dist2, 5)
    sizes0 = np.bincount(p0.assignment, minlength=8)
    assert np.bincount(p0.assignment[rows], minlength=8).tolist() == np.minimum(sizes0, 5).tolist()
    for j in range(8):  # the kept members are the closest of their cluster
        members = np.flatnonzero(p0.assignment == j)
        kept = np.intersect1d(members, rows)
        if len(kept) < len(members):
            assert p0.dist2[kept].max() <= np.setdiff1d(p0.dist2[members], p0.dist2[kept]).min()
    # the refit: k-means on the resampled items of every grid chunk (the grid's faiss calls, whatever the processes)
    chunks = grid_chunks(len(x), opts)
    refit_chunks = {j: rows[(rows >= lo) & (rows < hi)] for j, (lo, hi) in chunks.items()}
    refit = kmeans(ArrayView(x), 8, opts, np.random.default_rng([3, 1, 1]), chunks=refit_chunks, num_chunks=len(chunks))
    assert np.array_equal(p1.centroids, refit.centroids)
    assert len(p1.assignment) == len(x)  # all points, not just the resampled ones
    brute = ((x[:, None].astype(np.float64) - p1.centroids[None]) ** 2).sum(-1)
    _assert_assignment_is_decisive(x, p1.centroids)
    assert np.array_equal(p1.assignment, brute.argmin(1))
    np.testing.assert_allclose(p1.dist2, brute.min(1), rtol=1e-4, atol=1e-4)
    # phases are checkpoints: a rerun loads them instead of recomputing
    again = kmeans_level(ArrayView(x), 8, opts, 1, 5, seed=3, level=1, checkpoint=tmp_path,
                         log=lambda m: pytest.fail(f"recomputed: {m}"))
    assert np.array_equal(again.assignment, final.assignment)
    with pytest.raises(ValueError, match="asks for 700 clusters of only 660 items"):
        kmeans_level(ArrayView(x), 700, opts, 0, None, 0, 1, log=QUIET)


def test_resampling_moves_centroids_off_a_dense_blob():
    """300 points spread uniformly over a 10x10 square plus a dense blob of 2000 points at (2, 2):
    plain k-means piles centroids onto the blob; resampling spreads them over the support."""
    rng = np.random.default_rng(0)
    uniform = rng.uniform(0, 10, size=(300, 2))
    x = np.concatenate([uniform, rng.normal([2, 2], 0.3, size=(2000, 2))]).astype(np.float32)
    opts = KMeansOptions(iters=50)
    for seed in range(3):
        result = {}
        for steps in (0, 2):
            c = kmeans_level(ArrayView(x), 16, opts, steps, None, seed, 1, log=QUIET).centroids
            in_blob = int((np.linalg.norm(c - [2, 2], axis=1) < 1.0).sum())
            coverage = np.sqrt(((uniform[:, None] - c[None]) ** 2).sum(-1)).min(1).mean()
            result[steps] = (in_blob, coverage)
        assert result[0][0] >= 4 and result[2][0] <= 2, result  # 16 centroids: the blob is ~1 of 16 of the area
        assert result[2][1] < result[0][1], result  # the uniform part is covered more closely


def test_kmeans_level_resumes_from_its_last_finished_phase(tmp_path, monkeypatch):
    import curation.kmeans as km

    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    opts = KMeansOptions(iters=15)
    uninterrupted = kmeans_level(ArrayView(x), 10, opts, 3, None, 1, 2, checkpoint=tmp_path / "a", log=QUIET)

    class Interrupted(BaseException):
        pass

    save, calls = km._save_phase, []

    def save_then_die(path, *phase):
        save(path, *phase)
        if path.name == "phase_002.npz":
            raise Interrupted()
    monkeypatch.setattr(km, "_save_phase", save_then_die)
    with pytest.raises(Interrupted):
        kmeans_level(ArrayView(x), 10, opts, 3, None, 1, 2, checkpoint=tmp_path / "b", log=QUIET)
    monkeypatch.setattr(km, "_save_phase", save)
    real_kmeans = km.kmeans
    monkeypatch.setattr(km, "kmeans", lambda *a, **k: calls.append(1) or real_kmeans(*a, **k))
    resumed = kmeans_level(ArrayView(x), 10, opts, 3, None, 1, 2, checkpoint=tmp_path / "b", log=QUIET)
    assert len(calls) == 1  # only phase 3 ran again
    for name in ("centroids", "assignment", "dist2"):
        assert np.array_equal(getattr(resumed, name), getattr(uninterrupted, name))
    # a checkpoint of other data is refused, not silently reused
    with pytest.raises(ValueError, match="delete the cluster folder"):
        kmeans_level(ArrayView(x[:300]), 10, opts, 3, None, 1, 2, checkpoint=tmp_path / "b", log=QUIET)


# ====================================================================== 3. near-duplicate removal
def _unit(v):
    return v / np.linalg.norm(v)


def _at_cosine(base, cos, rng, avoid=()):
    """A unit vector at exactly cosine ``cos`` from the unit vector ``base`` (orthogonal to ``avoid`` otherwise)."""
    u = rng.normal(size=base.shape)
    for v in (base, *avoid):
        v = _unit(v - (v @ base) * base) if v is not base else v
        u = u - (u @ v) * v
    u = _unit(u)
    return cos * base + np.sqrt(1 - cos ** 2) * u


def _dedup_pool(tmp_path):
    """30 random directions in 64-d (pairwise cosine < 0.6) and planted near duplicates (rows 30-35),
    stored as two float16 shards like the embed stage writes them."""
    rng = np.random.default_rng(8)
    base = np.stack([_unit(v) for v in rng.normal(size=(30, 64))])
    mid = _at_cosine(base[3], 0.96, rng)
    rows = [*base,
            base[0].copy(),                    # 30: exact copy of 0
            _at_cosine(base[0], 0.99, rng),    # 31: near copy of 0
            _at_cosine(base[1], 0.97, rng),    # 32: just above 0.95
            _at_cosine(base[2], 0.93, rng),    # 33: below 0.95: distinct
            mid,                               # 34: 0.96 from 3
            _at_cosine(mid, 0.96, rng, avoid=(base[3],))]  # 35: 0.96 from 34, 0.9216 from 3: a chain
    x = np.stack(rows)
    sims = x @ x.T
    np.fill_diagonal(sims, 0)
    assert sims[:30, :30].max() < 0.6 and abs(sims[3, 35] - 0.9216) < 1e-6
    shards = [tmp_path / "000000.npy", tmp_path / "000001.npy"]
    np.save(shards[0], x[:20].astype(np.float16))
    np.save(shards[1], x[20:].astype(np.float16))
    return x, EmbeddingStore(shards)


def test_dedup_keeps_one_representative_per_planted_group(tmp_path):
    x, store = _dedup_pool(tmp_path)
    n = len(x)
    uids = np.random.default_rng(9).permutation(np.arange(1000, 1000 + n)).astype(np.int64)
    keep, stats = near_duplicates(store, uids, threshold=0.95, neighbors=4, index="flat")
    groups = [[0, 30, 31], [1, 32], [3, 34, 35]]  # row 33 (cosine 0.93 to row 2) is not a duplicate
    expected = np.ones(n, dtype=bool)
    for g in groups:
        expected[g] = False
        expected[g[int(np.argmin(uids[g]))]] = True  # the smallest sample id represents its group
    assert keep.tolist() == expected.tolist()
    assert stats["groups"] == 3 and stats["removed"] == 5 and stats["kept"] == n - 5
    assert stats["group_sizes"] == {2: 1, 3: 2}
    # the representative depends on the ids, not on the positions
    keep2, _ = near_duplicates(store, -uids, threshold=0.95, neighbors=4, index="flat")
    for g in groups:
        assert np.flatnonzero(keep2[g]).tolist() == [int(np.argmax(uids[g]))]


def test_dedup_threshold_is_respected(tmp_path):
    x, store = _dedup_pool(tmp_path)
    uids = np.arange(len(x), dtype=np.int64)
    # 0.98: only the exact and the 0.99 copy of row 0 are duplicates; the 0.97 / 0.96 pairs are not
    keep, stats = near_duplicates(store, uids, threshold=0.98, neighbors=4, index="flat")
    assert np.flatnonzero(~keep).tolist() == [30, 31] and stats["groups"] == 1
    # 0.92: the 0.93 pair joins; the chain's ends (0.9216) now link directly, the group stays the same
    keep, stats = near_duplicates(store, uids, threshold=0.92, neighbors=4, index="flat")
    assert np.flatnonzero(~keep).tolist() == [30, 31, 32, 33, 34, 35] and stats["groups"] == 4
    # 1.0: only exact copies
    keep, _ = near_duplicates(store, uids, threshold=1.0, neighbors=4, index="flat")
    assert np.flatnonzero(~keep).tolist() == [30]
    # the pairs straddling 0.95 as computed from the stored (float16) embeddings
    stored = store.take(np.arange(len(x))).astype(np.float64)
    assert stored[1] @ stored[32] >= 0.95 > stored[2] @ stored[33]


def test_dedup_finds_every_exact_copy_at_threshold_one(tmp_path):
    """Stored float16 rows are unit length only to ~1e-4: the raw inner product of a row with its exact
    copy is often 0.9999 < 1.0 (this missed about half of the exact copies before dedup used cosines)."""
    rng = np.random.default_rng(13)
    v = rng.normal(size=(200, 192))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    near = np.stack([_at_cosine(v[i], 0.999, rng) for i in range(100, 120)])
    x = np.concatenate([v, v[:100], near]).astype(np.float16)  # rows 200-299 copy 0-99; 300-319 are at 0.999
    assert ((x[:100].astype(np.float64) ** 2).sum(1) < 1).sum() > 20  # the case that used to fail
    np.save(tmp_path / "000000.npy", x)
    store = EmbeddingStore([tmp_path / "000000.npy"])
    keep, stats = near_duplicates(store, np.arange(len(x)), threshold=1.0, neighbors=4, index="flat")
    assert np.flatnonzero(~keep).tolist() == list(range(200, 300)) and stats["group_sizes"] == {2: 100}
    keep, _ = near_duplicates(store, np.arange(len(x)), threshold=0.998, neighbors=4, index="flat")
    assert np.flatnonzero(~keep).tolist() == list(range(200, 320))


def test_dedup_ivf_index_finds_the_same_groups(tmp_path):
    x, store = _dedup_pool(tmp_path)
    uids = np.arange(len(x), dtype=np.int64)
    flat, _ = near_duplicates(store, uids, threshold=0.95, neighbors=4, index="flat")
    ivf, stats = near_duplicates(store, uids, threshold=0.95, neighbors=4, index="ivf", nprobe=16)
    assert stats["index"] == "ivf" and ivf.tolist() == flat.tolist()
    auto, stats = near_duplicates(store, uids, threshold=0.95, neighbors=4, index="auto", flat_max=10)
    assert stats["index"] == "ivf" and auto.tolist() == flat.tolist()


# ====================================================================== 4. text balancing
ENTRIES = ["cat", "hot dog", "dog", "new york", "t shirt", "café", "red car"]


@pytest.mark.parametrize("caption,expected", [
    ("A cat sat.", ["cat"]),
    ("Category of concatenated cats", []),      # whole words only
    ("A Hot-Dog stand", ["hot dog", "dog"]),     # punctuation is a separator; a phrase and its word both match
    ("hot dogs and hotdogs", []),
    ("the dog's bowl", ["dog"]),
    ("New   York, NEW YORK!", ["new york"]),     # whitespace and case do not matter
    ("my T-shirt", ["t shirt"]),
    ("Café au lait", ["café"]),
    ("a red_car", ["red car"]),                  # "_" separates words
    ("red, car", ["red car"]),                   # punctuation between the words still matches (MetaCLIP)
    ("car red", []),                             # order matters
    ("", []),
])
def test_entry_matching_is_whole_word_and_phrase_matching(caption, expected):
    match = EntryMatcher(ENTRIES)
    assert [ENTRIES[i] for i in match(caption)] == sorted(expected, key=ENTRIES.index)
    assert match(caption) == substring_matches(caption, ENTRIES)  # the " e " substring definition


def test_entry_matcher_equals_the_substring_definition_on_random_captions():
    rng = np.random.default_rng(10)
    words = ["a", "red", "car", "on", "the", "road", "big", "dog", "hot", "cat", "new", "york"]
    entries = sorted({" ".join(rng.choice(words, size=int(rng.integers(1, 4)))) for _ in range(40)})
    match = EntryMatcher(entries)
    for _ in range(300):
        parts = rng.choice(words + [",", "!", "'s", "-", "  "], size=int(rng.integers(0, 12)))
        caption = "".join(p if p in ",!'s-  " else (" " + p.upper() if rng.random() < 0.2 else " " + p)
                          for p in parts)
        assert match(caption) == substring_matches(caption, entries), caption


def test_read_metadata_normalises_like_captions(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# a vocabulary\nHot-Dog\ncat   # pets\n\ncat\n  New York \n")
    assert read_metadata(str(path)) == ["hot dog", "cat", "new york"]
    with pytest.raises(FileNotFoundError, match="metadata file not found"):
        read_metadata(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no entries"):
        read_metadata(str(tmp_path / "empty.txt"))


def test_mine_metadata_counts_captions_drops_stopword_edges_and_ranks():
    captions = ["a red car on the road", "the red car", "Red cars and a red car red car!", "blue sky",
                "the blue sky of the city", "sky", "a car on fire"]
    # document frequency (a caption counts once): car 4; red, red car, sky 3; blue, blue sky 2;
    # stop-word edged: the, a 3; a red, on, car on 2 (starting or ENDING with a stop word); ties alphabetical
    assert mine_metadata(captions, 2, 2) == ["car", "red", "red car", "sky", "blue", "blue sky"]
    assert mine_metadata(captions, 2, 2, keep_stopwords=True) == \
        ["car", "a", "red", "red car", "sky", "the", "a red", "blue", "blue sky", "car on", "on"]
    assert mine_metadata(captions, 1, 2) == ["car", "red", "sky", "blue"]
    assert mine_metadata(captions, 2, 3) == ["car", "red", "red car", "sky"]
    assert mine_metadata(captions, 2, 2, max_entries=2) == ["car", "red"]
    assert mine_metadata(captions, 2, 8) == []


def test_balance_caps_frequent_entries_in_expectation_and_keeps_rare_ones_exactly():
    t = 1000
    matches = ([[0]] * 20000      # head entry: count 20100 > t
               + [[1]] * 300      # tail entry: count 400 <= t
               + [[2]] * 1000     # count exactly t: probability 1
               + [[0, 1]] * 100   # head AND tail: kept through the tail entry
               + [[]] * 50)       # match nothing
    n = len(matches)
    uids = np.random.default_rng(11).choice(2 ** 62, size=n, replace=False).astype(np.int64)
    keep, counts = balance(matches, uids, 3, t, seed=0)
    assert counts.tolist() == [20100, 400, 1000]
    head = keep[:20000]
    expected = 20000 * t / 20100
    assert abs(head.sum() - expected) < 5 * np.sqrt(expected * (1 - t / 20100))  # ~t pairs of the head
    assert keep[20000:21400].all()  # every pair of an entry at or under t, and every pair with a rare entry
    assert not keep[-50:].any()  # unmatched captions are dropped ...
    keep_all, _ = balance(matches, uids, 3, t, seed=0, keep_unmatched=True)
    assert keep_all[-50:].all() and np.array_equal(keep_all[:-50], keep[:-50])  # ... unless asked to keep them
    # the mean over seeds is t/count: the cap holds in expectation
    rates = [balance(matches[:20000], uids[:20000], 3, t, seed=s)[0].mean() for s in range(8)]
    assert abs(np.mean(rates) - t / 20000) < 0.005
    # draws do not depend on the order of the pairs, and differ between seeds
    perm = np.random.default_rng(12).permutation(n)
    keep_perm, _ = balance([matches[i] for i in perm], uids[perm], 3, t, seed=0)
    assert np.array_equal(keep_perm, keep[perm])
    assert not np.array_equal(balance(matches, uids, 3, t, seed=1)[0], keep)


def test_balance_keeps_a_pair_when_any_of_its_entries_passes():
    t = 1000
    matches = [[0, 1]] * 4000  # two entries of count 4000: each passes with p = 1/4, the pair with 1 - (3/4)^2
    uids = np.arange(4000, dtype=np.int64) * 7919 + 13
    keep, counts = balance(matches, uids, 2, t, seed=3)
    assert counts.tolist() == [4000, 4000]
    assert abs(keep.mean() - (1 - 0.75 ** 2)) < 0.035
    u = uniform_hash(np.repeat(uids, 2), np.tile([0, 1], 4000), 3).reshape(4000, 2)
    assert np.array_equal(keep, (u < 0.25).any(1))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02


# ====================================================================== 5. combine and outputs
def test_combine_selections_modes():
    image, text = np.array([1, 4, 5, 9]), np.array([0, 4, 9, 11])
    assert combine_selections(image, text, "intersection").tolist() == [4, 9]
    assert combine_selections(image, text, "union").tolist() == [0, 1, 4, 5, 9, 11]
    assert combine_selections(image, None, "image").tolist() == [1, 4, 5, 9]
    assert combine_selections(None, text, "text").tolist() == [0, 4, 9, 11]
    with pytest.raises(ValueError, match="unknown combine mode"):
        combine_selections(image, text, "xor")


def _pool_table(run: Path):
    metas = sorted((run / "embed" / "meta").glob("*.parquet"))
    tables = [load_table(p) for p in metas]
    return {k: (np.concatenate([t[k] for t in tables]) if k in ("uid", "unit") else sum((t[k] for t in tables), []))
            for k in tables[0]}


def test_reference_outputs_are_consistent(reference, world):
    out, report = reference
    run = out / "debug"
    pool = _pool_table(run)
    assert len(pool["uid"]) == POOL_SIZE and report["pool"]["samples"] == POOL_SIZE
    # embeddings: float16, [CLS] || mean(patches) of the 96-wide backbone, L2-normalised
    emb = np.concatenate([np.load(p) for p in sorted((run / "embed" / "image").glob("*.npy"))])
    assert emb.dtype == np.float16 and emb.shape == (POOL_SIZE, 192)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    text = np.concatenate([np.load(p) for p in sorted((run / "embed_text").glob("0*.npy"))])
    assert text.shape == (POOL_SIZE, 64)
    kept = _kept(run)
    image_rows, text_rows = _parts(run / "image_balance" / "rows"), _parts(run / "text_balance" / "rows")
    assert set(image_rows) <= set(kept) and set(text_rows) <= set(kept)
    assert len(image_rows) == round(0.5 * len(kept))  # target_size 0.5 of the de-duplicated pool, exactly
    uids = np.load(run / "curated" / "uids.npy")
    final_rows = np.intersect1d(image_rows, text_rows)  # combine.mode=intersection
    assert uids.tolist() == sorted(pool["uid"][final_rows].tolist())
    assert report["kept"] == {"pool": POOL_SIZE, "dedup": len(kept), "image_balance": len(image_rows),
                              "text_balance": len(text_rows), "curated": len(uids)}
    # manifest: one row per curated pair in pool order, with its key, caption and shard
    manifest = load_table(run / "curated" / "manifest.parquet")
    assert manifest["uid"].tolist() == pool["uid"][final_rows].tolist()
    assert manifest["caption"] == [pool["caption"][r] for r in final_rows]
    assert manifest["key"] == [pool["key"][r] for r in final_rows]
    for source, key, caption in zip(manifest["source"], manifest["key"], manifest["caption"]):
        assert Path(source).parent == Path(world)
        with tarfile.open(source) as tar:
            assert tar.extractfile(f"{key}.txt").read().decode() == caption
    # the text balancing only kept pairs matching a (mined) entry
    entries = (run / "text_balance" / "entries.txt").read_text().splitlines()
    match = EntryMatcher(entries)
    assert all(match(pool["caption"][r]) for r in text_rows)
    # image balancing took every leaf's points closest to its centroid first
    leaf = _parts(run / "cluster" / "level1" / "assignment")
    dist2 = _parts(run / "cluster" / "level1" / "dist2")
    picked = np.isin(kept, image_rows)
    for j in np.unique(leaf):
        inside = leaf == j
        if picked[inside].any() and (~picked[inside]).any():
            assert dist2[inside & picked].max() <= dist2[inside & ~picked].min()
    # the balancing made the top-level clusters more uniform
    clusters = report["clusters"]["level 2 (top)"]
    assert clusters["curated"]["normalized_entropy"] > clusters["pool"]["normalized_entropy"]


def test_curated_shards_are_read_back_by_the_training_stream(reference):
    from dinotxt.data import ImageTextStream, expand_shards

    run = reference[0] / "debug"
    uids = np.load(run / "curated" / "uids.npy")
    shards = expand_shards(str(run / "curated" / "shards"))
    assert len(shards) == -(-len(uids) // 32)  # samples_per_shard=32
    with tarfile.open(shards[0]) as tar:
        assert len({n.split(".")[0] for n in tar.getnames()}) == 32
    stream = iter(ImageTextStream(shards=shards, shuffle_buffer=0, rank=0, world_size=1))
    first_epoch = list(itertools.islice(stream, len(uids)))
    assert sorted(s["key"] for s in first_epoch) == sorted(uid_key(u) for u in uids)  # every pair once
    assert all(s["image"].size == (48, 48) and s["caption"] for s in first_epoch)
    assert next(stream)["key"] in {s["key"] for s in first_epoch}  # then the next epoch starts
    manifest = load_table(run / "curated" / "manifest.parquet")
    caption_of = {uid_key(u): c for u, c in zip(manifest["uid"], manifest["caption"])}
    assert all(s["caption"] == caption_of[s["key"]] for s in first_epoch)


@pytest.mark.parametrize("mode", ["union", "image", "text"])
def test_pipeline_combine_modes(reference, world, tmp_path, capsys, mode):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    report, actions = _curate(out, f"combine.mode={mode}", "combine.write_shards=false", "report.plots=false",
                              world=world, capsys=capsys)
    assert [s for s in STAGES if actions[s] == "running"] == ["combine", "report"]
    image_rows, text_rows = _parts(run / "image_balance" / "rows"), _parts(run / "text_balance" / "rows")
    rows = {"union": np.union1d(image_rows, text_rows), "image": image_rows, "text": text_rows}[mode]
    pool = _pool_table(run)
    uids = np.load(run / "curated" / "uids.npy")
    assert uids.tolist() == sorted(pool["uid"][rows].tolist()) and report["kept"]["curated"] == len(rows)
    assert load_table(run / "curated" / "manifest.parquet")["uid"].tolist() == pool["uid"][rows].tolist()
    assert not (run / "curated" / "shards").exists()


def test_pipeline_random_strategy_keeps_the_leaf_budgets(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    kept = _kept(run)
    leaf = _parts(run / "cluster" / "level1" / "assignment")
    closest = _parts(run / "image_balance" / "rows")
    _, actions = _curate(out, "image_balance.strategy=random", *FAST, world=world, capsys=capsys)
    assert [s for s in STAGES if actions[s] == "running"] == ["image_balance", "combine", "report"]
    random_rows = _parts(run / "image_balance" / "rows")
    assert len(random_rows) == len(closest) and not np.array_equal(random_rows, closest)
    per_leaf = [np.bincount(leaf[np.isin(kept, r)], minlength=leaf.max() + 1) for r in (closest, random_rows)]
    assert np.array_equal(*per_leaf)  # the budgets depend on the cluster sizes only
    _curate(out, "image_balance.strategy=random", "image_balance.target_size=20", *FAST, world=world)
    assert len(_parts(run / "image_balance" / "rows")) == 20  # an int target is a sample count


def test_pipeline_text_balance_with_a_vocabulary_file(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("Red\nblue square\n# a comment\nzebra\n")
    kept = _kept(run)
    captions = _pool_table(run)["caption"]
    entries = ["red", "blue square", "zebra"]
    matching = [r for r in kept if substring_matches(captions[r], entries)]
    assert 0 < len(matching) < len(kept)
    report, actions = _curate(out, f"text_balance.metadata={vocab}", "text_balance.t=100000", *FAST, world=world,
                              capsys=capsys)
    assert actions["text_balance"] == "running" and actions["image_balance"] == "skipped"
    assert (run / "text_balance" / "entries.txt").read_text().splitlines() == entries
    assert _parts(run / "text_balance" / "rows").tolist() == matching  # t above every count: all matches
    counts = np.load(run / "text_balance" / "counts.npy")
    assert counts.tolist() == [sum(bool(e in substring_matches(captions[r], entries)) for r in kept)
                               for e in range(3)] and counts[2] == 0
    _, actions = _curate(out, f"text_balance.metadata={vocab}", "text_balance.t=100000", *FAST,
                         "text_balance.keep_unmatched=true", world=world, capsys=capsys)
    assert _parts(run / "text_balance" / "rows").tolist() == kept.tolist()
    vocab.write_text("red\n")  # an edited vocabulary file is a changed setting
    _, actions = _curate(out, f"text_balance.metadata={vocab}", "text_balance.t=100000", *FAST,
                         "text_balance.keep_unmatched=true", world=world, capsys=capsys)
    assert actions["text_balance"] == "running"
    assert (run / "text_balance" / "entries.txt").read_text().splitlines() == ["red"]


def test_manifest_pool_curates_into_a_manifest_training_reads(tmp_path, capsys):
    """A CSV pool (relative and absolute image paths, an identical repeated row) in units of 15 rows:
    the curated manifest carries absolute image paths, the shards the image files and captions."""
    import csv

    from dinotxt.data import read_manifest
    from dinotxt.data.world import render_sample

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(40):
        sample = render_sample(i, 40)
        sample.image.save(tmp_path / "img" / f"{i:03d}.jpg")
        rows.append((f"img/{i:03d}.jpg" if i % 2 else str(tmp_path / "img" / f"{i:03d}.jpg"), sample.caption))
    rows.append(rows[3])
    with open(tmp_path / "pool.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "caption"])
        writer.writerows(rows)
    report = _curate(tmp_path / "out", "pool.manifest_rows_per_unit=15", "cluster.levels=[4,2]",
                     "text_balance.mine_min_count=2", "dedup.threshold=0.999", world=tmp_path / "pool.csv")
    assert report["pool"]["units"] == 3 and report["pool"]["samples"] == 41  # the repeat is its own sample
    run = tmp_path / "out" / "debug"
    manifest = load_table(run / "curated" / "manifest.parquet")
    assert len(manifest["uid"]) == report["kept"]["curated"] > 0
    pairs = read_manifest(str(run / "curated" / "manifest.parquet"))
    assert [p for p, _ in pairs] == manifest["image_path"] and all(Path(p).is_absolute() and Path(p).is_file()
                                                                   for p, _ in pairs)
    caption_of = {str((tmp_path / p).resolve()): c for p, c in rows}
    assert all(caption_of[p] == c for p, c in pairs)
    members = []
    for shard in sorted((run / "curated" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getnames()
    assert sorted(n for n in members if n.endswith(".jpg")) == sorted(f"{uid_key(u)}.jpg" for u in manifest["uid"])
    assert len(members) == 2 * len(manifest["uid"])


# ====================================================================== 6. resumability
def test_rerun_of_a_finished_run_skips_every_stage(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (out / "debug").rglob("*") if p.is_file() and p.name != "config.yaml"}
    report, actions = _curate(out, world=world, capsys=capsys)
    assert actions == {s: "skipped" for s in STAGES}
    after = {p: p.stat().st_mtime_ns for p in (out / "debug").rglob("*") if p.is_file() and p.name != "config.yaml"}
    assert before == after  # nothing rewritten
    assert report["kept"] == reference[1]["kept"]


def test_until_then_rest_equals_an_uninterrupted_run(reference, world, tmp_path, capsys):
    stats, actions = _curate(tmp_path, world=world, until="cluster_level1", capsys=capsys)
    assert list(stats) == STAGES[:4] and list(actions) == STAGES[:4]
    assert not (tmp_path / "debug" / "cluster" / "level2").exists()
    report, actions = _curate(tmp_path, world=world, capsys=capsys)
    assert actions == {**{s: "skipped" for s in STAGES[:4]}, **{s: "running" for s in STAGES[4:]}}
    _assert_identical_runs(reference[0], tmp_path)


@pytest.mark.slow
def test_sigkill_during_embedding_then_resume_is_bit_identical(reference, world, tmp_path, capsys):
    """``dinotxt curate`` killed with SIGKILL while embedding unit 2, after its embeddings were written and
    before its metadata table (the unit's done marker): the rerun embeds units 2 and 3 only."""
    code = (
        "import os, signal, sys\n"
        "import curation.embed_pool as E\n"
        "write = E.write_unit\n"
        "def write_unit(out_dir, unit, emb, rows, skipped):\n"
        "    if unit == 2:\n"
        "        E.save_npy(out_dir / 'image' / '000002.npy', emb.astype('float16'))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    write(out_dir, unit, emb, rows, skipped)\n"
        "E.write_unit = write_unit\n"
        "from dinotxt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "curate", RECIPE, f"pool.data={world}",
                           f"output_dir={tmp_path}"], cwd=tmp_path, env=_subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    embed = tmp_path / "debug" / "embed"
    assert sorted(p.name for p in (embed / "meta").glob("*.parquet")) == ["000000.parquet", "000001.parquet"]
    assert (embed / "image" / "000002.npy").is_file() and not (embed / "done.json").exists()
    (embed / "image" / ".000003.npy.tmp999999").write_bytes(b"half a file")  # a write cut short
    report, actions = _curate(tmp_path, world=world, capsys=capsys)
    assert actions["embed"] == "resuming" and all(actions[s] == "running" for s in STAGES[1:])
    assert "[curate] embed: 2 of 4 units to embed" in _curate.stdout
    _assert_identical_runs(reference[0], tmp_path)


def test_interrupted_stages_resume_to_identical_outputs(reference, world, tmp_path, monkeypatch, capsys):
    """Interrupt embed_text after its 2nd shard, cluster_level1 after its k-means phase, combine after its
    first curated shard (and leave stale temporary files): every rerun continues, the end result is the
    uninterrupted run's, byte for byte."""
    import curation.combine as cb
    import curation.embed_pool as em
    import curation.kmeans as km

    class Interrupted(BaseException):
        pass

    def interrupt_after(module, name, when):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            if when(*args):
                raise Interrupted(name)
            return result
        monkeypatch.setattr(module, name, wrapped)
        return original

    out = _clone(reference[0], tmp_path, keep=["embed"])  # embedded, nothing else
    run = out / "debug"
    save = interrupt_after(em, "save_npy", lambda path, array: Path(path).name == "000001.npy")
    with pytest.raises(Interrupted):
        _curate(out, world=world)
    monkeypatch.setattr(em, "save_npy", save)
    assert sorted(p.name for p in (run / "embed_text").glob("0*.npy")) == ["000000.npy", "000001.npy"]

    phase = interrupt_after(km, "_save_phase", lambda path, *rest: path.name == "phase_000.npz")
    with pytest.raises(Interrupted):
        _curate(out, world=world, capsys=capsys)
    monkeypatch.setattr(km, "_save_phase", phase)
    assert _actions(capsys.readouterr().out)["embed_text"] == "resuming"
    assert (run / "cluster" / "level1" / "phase_000.npz").is_file()
    assert not (run / "cluster" / "level1" / "done.json").exists()

    calls = []
    real_kmeans = km.kmeans
    monkeypatch.setattr(km, "kmeans", lambda *a, **k: calls.append(len(a[0])) or real_kmeans(*a, **k))
    shard = interrupt_after(cb, "_write_shard", lambda path, *rest: path.name == "000000.tar")
    with pytest.raises(Interrupted):
        _curate(out, world=world, capsys=capsys)
    monkeypatch.setattr(cb, "_write_shard", shard)
    actions = _actions(capsys.readouterr().out)
    assert actions["cluster_level1"] == "resuming" and actions["combine"] == "running"
    assert len(calls) == 3  # level 1: only its resampling refit; level 2: k-means + refit
    first_shard = run / "curated" / "shards" / "000000.tar"
    written = first_shard.stat().st_mtime_ns
    (run / "curated" / "shards" / ".000001.tar.tmp999999").write_bytes(b"\0" * 100)
    (run / "embed_text" / ".000002.npy.tmp999999").write_bytes(b"junk")

    _, actions = _curate(out, world=world, capsys=capsys)
    assert actions["combine"] == "resuming" and actions["cluster_level1"] == "skipped"
    assert first_shard.stat().st_mtime_ns == written  # finished shards are not rewritten
    _assert_identical_runs(reference[0], out)


def test_a_changed_setting_recomputes_only_the_stages_downstream(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    image_rows = [p.read_bytes() for p in sorted((run / "image_balance" / "rows").glob("*.npy"))]
    report, actions = _curate(out, "text_balance.t=5", world=world, capsys=capsys)
    assert actions == {**{s: "skipped" for s in STAGES[:6]}, "text_balance": "running", "combine": "running",
                       "report": "running"}
    assert [p.read_bytes() for p in sorted((run / "image_balance" / "rows").glob("*.npy"))] == image_rows
    assert report["kept"]["text_balance"] < reference[1]["kept"]["text_balance"]  # a smaller cap keeps fewer
    assert json.loads((run / "text_balance" / "done.json").read_text())["stats"]["capped_entries"] > 0

    report, actions = _curate(out, "text_balance.t=5", "cluster.levels=[10,3]", world=world, capsys=capsys)
    assert [s for s in STAGES if actions[s] == "running"] == ["cluster_level1", "cluster_level2", "image_balance",
                                                              "combine", "report"]
    assert len(np.load(run / "cluster" / "level1" / "centroids.npy")) == 10

    # back to the recipe's settings: the result is the reference's again
    _, actions = _curate(out, world=world, capsys=capsys)
    assert actions["embed"] == actions["dedup"] == "skipped"
    _assert_identical_runs(reference[0], out)


def test_stage_option_runs_one_stage_whose_inputs_are_done(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path, keep=["embed", "embed_text", "dedup"])
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "--stage", "cluster_level2", capsys=capsys)
    assert "stage 'cluster_level2' needs 'cluster_level1', which is not done" in _one_line_error(rc, err)
    stats = _curate(out, world=world, stage="cluster_level1")
    assert list(stats) == ["cluster_level1"] and stats["cluster_level1"]["items"] == reference[1]["kept"]["dedup"]
    assert not (out / "debug" / "cluster" / "level2").exists()
    # clustering the caption embeddings instead
    stats = _curate(out, "cluster.embeddings=text", world=world, stage="cluster_level1")
    assert stats["cluster_level1"]["dim"] == 64


def test_changed_embedding_settings_do_not_silently_discard_the_embeddings(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path, keep=["embed"])
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "embed.backbone.init_seed=1",
                      capsys=capsys)
    assert "holds 'embed' outputs made with different settings" in _one_line_error(rc, err)
    assert len(list((out / "debug" / "embed" / "image").glob("*.npy"))) == 4  # untouched


# ====================================================================== 7. bad input
def _damaged_pool(root: Path) -> Path:
    """3 shards of 20: shard 1 with a corrupt JPEG, an empty caption and a sample without image;
    shard 2 truncated inside its 11th sample."""
    from dinotxt.data.world import write_split

    shards = write_split(root, 60, seed=3, size=40, samples_per_shard=20)
    with tarfile.open(shards[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    with tarfile.open(shards[1], "w") as tar:
        for m, data in members:
            if m.name == f"{keys[3]}.jpg":
                data = data[:len(data) // 3]  # a truncated JPEG
            elif m.name == f"{keys[5]}.txt":
                data = b"   \n"  # an empty caption
            elif m.name == f"{keys[7]}.jpg":
                continue  # no image at all
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shards[2]) as tar:
        cut = [m for m in tar.getmembers() if m.name.endswith(".seg.png")][10]
    data = Path(shards[2]).read_bytes()
    Path(shards[2]).write_bytes(data[:cut.offset_data + 50])  # inside the 11th sample's last member
    return root


def test_damaged_pool_skips_and_counts_bad_samples(tmp_path, capsys):
    pool = _damaged_pool(tmp_path / "pool")
    stats = _curate(tmp_path / "out", world=pool, until="embed")["embed"]
    out = capsys.readouterr().out
    assert "000002.tar is corrupt or truncated" in out  # reported, and the run went on
    assert stats["skipped"] == {"no_caption": 1, "no_image": 1, "bad_image": 1, "corrupt_shard": 1}
    assert stats["samples"] == 20 + 17 + 10  # the samples before the damage are kept
    table = _pool_table(tmp_path / "out" / "debug")
    keys = table["key"]
    assert len(set(keys)) == 47 and all(c.strip() for c in table["caption"])
    shard2 = sorted(k for k, u in zip(keys, table["unit"]) if u == 2)
    assert shard2 == [f"000002{i:07d}" for i in range(40, 50)]


def test_text_encoder_of_inconsistent_width_is_a_clear_error(reference, world, tmp_path, monkeypatch, capsys):
    (tmp_path / "flaky_encoder.py").write_text(
        "import numpy as np\n"
        "class Encoder:\n"
        "    calls = 0\n"
        "    def encode(self, captions):\n"
        "        Encoder.calls += 1\n"
        "        return np.ones((len(captions), 8 if Encoder.calls == 1 else 16), np.float32)\n"
        "def make():\n"
        "    return Encoder()\n"
        "def nan():\n"
        "    class E:\n"
        "        def encode(self, captions):\n"
        "            return np.full((len(captions), 4), np.nan)\n"
        "    return E()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = _clone(reference[0], tmp_path / "runs", keep=["embed"])
    common = [RECIPE, f"pool.data={world}", f"output_dir={out}", "--until", "embed_text", "--trust-code"]
    rc, _, err = _cli(*common[:-1], "embed.text_encoder=flaky_encoder:make", capsys=capsys)  # no opt-in: refused
    assert "--trust-code" in _one_line_error(rc, err) and "Encoder.calls" not in err
    rc, _, err = _cli(*common, "embed.text_encoder=flaky_encoder:make", capsys=capsys)
    assert "returned embeddings of width 16, but 8 was expected" in _one_line_error(rc, err)
    rc, _, err = _cli(*common, "embed.text_encoder=flaky_encoder:nan", capsys=capsys)
    assert "returned NaN or infinite values" in _one_line_error(rc, err)
    rc, _, err = _cli(*common, "embed.text_encoder=flaky_encoder:missing", capsys=capsys)
    assert "has no attribute 'missing'" in _one_line_error(rc, err)


@pytest.mark.parametrize("bad", ["000001.npy", "000000.npy"])  # shard 0 too: the width recorded by embed is expected
def test_stored_embeddings_of_the_wrong_width_are_a_clear_error(reference, world, tmp_path, capsys, bad):
    out = _clone(reference[0], tmp_path, keep=["embed"])
    shard = out / "debug" / "embed" / "image" / bad
    np.save(shard, np.zeros((len(np.load(shard)), 10), np.float16))
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "--until", "dedup", capsys=capsys)
    line = _one_line_error(rc, err)
    assert f"{bad} has width 10 but 192 was expected" in line


def test_target_size_larger_than_the_pool_is_a_clear_error(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    kept = reference[1]["kept"]["dedup"]
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "image_balance.target_size=5000",
                      capsys=capsys)
    line = _one_line_error(rc, err)
    assert f"asks for 5,000 samples, but the pool has {kept:,} after de-duplication" in line
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "cluster.levels=[500,3]", capsys=capsys)
    assert f"level 1 asks for 500 clusters of only {kept} items" in _one_line_error(rc, err)
    # a fraction must lie in (0, 1]; 2.5 is neither a fraction nor a sample count
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "image_balance.target_size=2.5",
                      capsys=capsys)
    assert "image_balance.target_size" in _one_line_error(rc, err)


def test_unknown_recipe_key_names_the_closest_valid_key(world, tmp_path, capsys):
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={tmp_path}", "text_balance.tt=5", capsys=capsys)
    assert "unknown config key 'text_balance.tt' in command line; did you mean 'text_balance.t'?" in \
        _one_line_error(rc, err)
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"pool:\n  data: {world}\ncluster:\n  level: [4, 2]\n")
    rc, _, err = _cli(recipe, f"output_dir={tmp_path}", capsys=capsys)
    assert "unknown config key 'cluster.level'" in _one_line_error(rc, err) and "'cluster.levels'" in err
    rc, _, err = _cli(RECIPE, f"pool.data={world}", "combine.mode=xor", capsys=capsys)
    assert "combine.mode='xor' is not one of intersection, union, image, text" in _one_line_error(rc, err)
    rc, _, err = _cli(RECIPE, f"pool.data={world}", "cluster.levels=[3,12]", capsys=capsys)
    assert "must not grow" in _one_line_error(rc, err)
    assert not (tmp_path / "debug").exists() and not (tmp_path / "typo").exists()


def test_unknown_stage_name_is_a_clear_error(world, tmp_path, capsys):
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={tmp_path}", "--stage", "cluster", capsys=capsys)
    line = _one_line_error(rc, err)
    assert "unknown stage 'cluster'" in line and "cluster_level1" in line
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={tmp_path}", "--until", "dedupe", capsys=capsys)
    assert "unknown stage 'dedupe'" in _one_line_error(rc, err)
    assert not (tmp_path / "debug" / "embed").exists()


# ====================================================================== 8. the CLI end to end
@pytest.mark.slow
def test_cli_curate_end_to_end(reference, world, tmp_path):
    exe = Path(sys.executable).with_name("dinotxt")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "dinotxt.cli"]
    proc = subprocess.run([*cmd, "curate", RECIPE, f"pool.data={world}", f"output_dir={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "debug"
    report = json.loads((run / "report" / "report.json").read_text())
    summary = proc.stdout[proc.stdout.index("curation 'debug' (intersection)"):]
    for name, count in report["kept"].items():
        assert re.search(rf"^{name}\s+{count:,}\s", summary, re.M), name
    assert "cluster entropy" in summary and "metadata entry entropy" in summary
    assert f"{run}/curated/uids.npy" in summary and "report.json" in summary
    assert report["plots"] == ["stages.png", "cluster_sizes.png", "concepts.png", "duplicates.png"]
    for name in report["plots"]:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file() and "text_balance" in (run / "config.yaml").read_text()
    # a separate process gives the same curated subset as the in-process reference run
    reference_uids = np.load(reference[0] / "debug" / "curated" / "uids.npy")
    assert np.array_equal(np.load(run / "curated" / "uids.npy"), reference_uids)
    assert report["kept"] == reference[1]["kept"]


def test_a_missing_pool_names_the_pool_key(tmp_path, capsys):
    from dinotxt.cli import main

    assert main(["curate", RECIPE, f"pool.data={tmp_path / 'nowhere' / '{0..3}.tar'}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinotxt: error: shard not found") and err.endswith("check pool.data") and "\n" not in err


def test_embed_stage_reads_a_pooled_feature_cache_instead_of_a_second_backbone_pass(reference, world, tmp_path):
    """One feature-extraction stage: a pooled cache (one eval crop, [CLS, mean(patches)]) of the same backbone and
    shards gives the embed stage's outputs without running the backbone again: the same ids, keys and captions,
    and embeddings equal to the fp16 rounding of the tokens (2**-11 relative, twice: tokens, then embeddings)."""
    from dinotxt.config import load_train_config
    from dinotxt.features.build_cache import build_cache

    train = load_train_config("debug", [f"data.train={world}", f"cache.path={tmp_path / 'cache'}", "data.world.generate=false",
                                        "data.num_workers=0", "cache.tokens=pooled", "cache.augment=false",
                                        "model.vision_head.num_blocks=0", "model.vision_head.final_norm=false",
                                        "model.backbone.img_size=56", "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}"])
    build_cache(train, log=QUIET)
    _curate(tmp_path / "runs", f"embed.from_cache={tmp_path / 'cache'}", *FAST, world=world, until="embed")
    ours, ref = tmp_path / "runs" / "debug" / "embed", reference[0] / "debug" / "embed"
    a, b = _pool_table(tmp_path / "runs" / "debug"), _pool_table(reference[0] / "debug")
    assert a["uid"].tolist() == b["uid"].tolist() and a["key"] == b["key"] and a["caption"] == b["caption"]
    for unit in ("000000", "000003"):
        cached, online = np.load(ours / "image" / f"{unit}.npy"), np.load(ref / "image" / f"{unit}.npy")
        assert cached.shape == online.shape and np.abs(cached.astype(np.float32) - online).max() < 4 * 2.0 ** -11
    # a cache of another kind is refused with the reason
    other = load_train_config("debug", [f"data.train={world}", f"cache.path={tmp_path / 'all'}", "data.world.generate=false",
                                        "data.num_workers=0", "model.backbone.img_size=56",
                                        "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}"])
    build_cache(other, log=QUIET)
    from dinotxt.config import ConfigError

    with pytest.raises(ConfigError, match="tokens='all'"):
        _curate(tmp_path / "runs2", f"embed.from_cache={tmp_path / 'all'}", *FAST, world=world, until="embed")
