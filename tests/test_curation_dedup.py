"""Curation, near-duplicate removal (METHOD.md section 7): one representative per planted group, the
threshold, exact copies in float16, and the IVF index finding the flat index's groups."""
import numpy as np

from curation.dedup import near_duplicates
from curation.store import EmbeddingStore
from curation_helpers import _one_thread  # noqa: F401 (a fixture of this module)


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
