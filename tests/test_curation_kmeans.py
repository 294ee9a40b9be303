"""Curation, clustering (METHOD.md section 7): faiss k-means against the pure-torch reference (Lloyd,
k-means++, hierarchical k-means), the resampling steps, and a k-means level resuming from its last phase."""
import itertools

import numpy as np
import pytest
import torch

from curation.kmeans import (KMeansOptions, assign, closest_per_cluster, grid_chunks, hierarchical_kmeans, kmeans,
                             kmeans_level, kmeans_plusplus, lloyd)
from curation.kmeans_reference import (torch_hierarchical_kmeans, torch_kmeans, torch_kmeans_plusplus,
                                       torch_lloyd)
from curation.store import ArrayView
from curation_helpers import QUIET, _same_partition
from curation_helpers import _one_thread  # noqa: F401 (a fixture of this module)


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
