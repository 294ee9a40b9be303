"""Curation, image balancing (METHOD.md section 7): balanced hierarchical sampling (the cap, the remainder,
the recursion through the levels, closest-first or seeded random leaves, exactly the target), and the
image_balance stage's random strategy in the pipeline."""
import numpy as np
import pytest

from curation.kmeans import KMeansOptions, cluster_sizes, hierarchical_kmeans, rank_within_clusters
from curation.sampling import allocate, balanced_sample, find_cap, leaf_budgets
from curation.store import ArrayView
from curation_helpers import FAST, QUIET, STAGES, _clone, _curate, _kept, _level, _parts
from curation_helpers import _one_thread, reference, world  # noqa: F401 (fixtures of this module)


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
