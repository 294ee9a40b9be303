"""Curation on several processes (torch.distributed over gloo, 2 CPU processes against 1): every stage
function gives the SAME BITS for 1 and 2 processes (np.array_equal, never a tolerance), with grid
chunks, index shards and embedding shards whose boundaries do not line up with each other or with the
ranks' shares, and with 2 faiss threads in the one process against 1 in each of the two; the whole ``dinotxt curate`` under ``torchrun --nproc_per_node=2`` writes every output
file byte-identical to the one-process run and records how the work was shared; a rank killed in the
middle of Lloyd resumes, on 1 process, to the same outputs; a dead peer is one clear line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from multiproc import init_gloo, run_ranks

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "curation" / "debug.yaml")
N, DIM, SHARD = 1000, 16, 350  # embedding shards of 350 rows: 350, 350, 300
CHUNK = 77  # the grid: 13 chunks, the last of 76 rows


# ====================================================================== data
def _normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def write_pool(folder: Path) -> None:
    """1,000 fp16 unit vectors in 10 blobs of skewed sizes (so k-means has work and resampling moves centroids),
    with planted duplicates: rows 900-939 copy rows 0-39 (exact), 940-959 are near copies of 100-119."""
    from curation.store import save_npy, shard_paths

    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(10, DIM))
    x = rng.normal(size=(N, DIM)) + centers[np.minimum(rng.geometric(0.3, size=N) - 1, 9)]
    x[900:940] = x[0:40]
    x[940:960] = x[100:120] + rng.normal(0, 1e-3, size=(20, DIM))
    x = _normalised(x)
    for i, path in enumerate(shard_paths(folder, 3)):
        save_npy(path, x[i * SHARD:(i + 1) * SHARD])


def captions(n: int = N):
    rng = np.random.default_rng(1)
    words = ["red", "blue", "green", "cat", "dog", "car", "tree", "the", "a", "small", "big", "photo"]
    weights = np.array([8, 4, 2, 6, 3, 1, 1, 9, 9, 2, 2, 5], float)
    return [" ".join(rng.choice(words, size=rng.integers(2, 7), p=weights / weights.sum())) for _ in range(n)]


class Table:
    """A stand-in for ``embed.PoolIndex.columns``: uid and caption of pool rows."""

    def __init__(self):
        self.caption = captions()
        self.uid = np.random.default_rng(2).permutation(np.arange(10_000, 10_000 + N)).astype(np.int64) * 7919

    def columns(self, rows, names):
        rows = np.asarray(rows, dtype=np.int64)
        return {name: (self.uid[rows] if name == "uid" else [self.caption[r] for r in rows]) for name in names}


# ====================================================================== the stage functions on 1 and 2 processes
def stage_worker(rank, world, port, q, folder, out):
    """Every distributed stage function on this rank's share; returns this rank's outputs. One process searches
    with 2 faiss threads, two with 1 each: the searches' bits depend on neither (``kmeans.fixed_search``)."""
    import faiss
    from omegaconf import OmegaConf

    faiss.omp_set_num_threads(2 if world == 1 else 1)
    if world > 1:
        init_gloo(rank, world, port)
    from curation.config import TextBalanceConfig
    from curation.dedup import DedupSettings, dedup_stage
    from curation.kmeans import KMeansOptions, kmeans_level, lloyd
    from curation.ranks import Ranks
    from curation.sampling import balanced_selection
    from curation.selection import distance_keys, smallest_per_cluster
    from curation.store import EmbeddingStore, Grid, shard_paths
    from curation.text_balance import text_balance_stage

    ranks = Ranks(rank, world)
    out = Path(out)
    store = EmbeddingStore(shard_paths(folder, 3))
    opts = KMeansOptions(iters=20, chunk_size=CHUNK)
    res = {}
    # Lloyd from a fixed init, float16 data: int64 fixed-point sums all-reduced
    init = store.take(np.arange(0, 120, 10))
    ll = lloyd(store, init, opts, ranks=ranks)
    res["lloyd"] = (ll.centroids, ll.assigned)
    # a k-means level with 2 resampling steps (k-means++ on rank 0, the distributed "s closest")
    level = kmeans_level(store, 12, opts, 2, None, seed=3, level=1, checkpoint=out / "kmeans", log=lambda m: None,
                         ranks=ranks)
    res["level"] = (level.centroids, level.assigned)
    # balanced sampling over that level, with a 2nd level assigning its 12 clusters to 3, both strategies
    from curation.kmeans import KMeansLevel

    upper = [KMeansLevel(np.zeros((3, DIM), np.float32), np.arange(12) % 3, np.zeros(12, np.float32))]
    grid = Grid(N, CHUNK)
    leaves = {j: (a, d, grid.bounds(j)[0]) for j, (a, d) in level.assigned.items()}
    for strategy in ("closest", "random"):
        res[f"sample_{strategy}"] = balanced_selection(ranks, leaves, upper, 12, 431, strategy, seed=5)
    # the selection itself, on keys with many ties (coarse distances), against the lexsort definition
    coarse = {j: (a, distance_keys(np.round(d * 4) / 4), np.arange(*grid.bounds(j))) for j, (a, d) in
              level.assigned.items()}
    quota = np.array([0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 1000])
    res["select"] = (smallest_per_cluster(ranks, coarse, quota), {j: c[1] for j, c in coarse.items()})
    # de-duplication in 4 index shards of 300 rows (x 4 query shards), IVF and flat
    table = Table()
    for kind in ("flat", "ivf"):
        settings = DedupSettings(N, threshold=0.99, neighbors=4, index=kind, nlist=8, nprobe=8, chunk_size=64,
                                 shard_rows=300, seed=0)
        res[f"dedup_{kind}"] = dedup_stage(ranks, store, out / f"dedup_{kind}", settings, table.uid.__getitem__,
                                           log=lambda m: None)
    # text balancing, mined entries through 7 hash buckets, over the same grid
    t = OmegaConf.merge(OmegaConf.structured(TextBalanceConfig), {"t": 60, "mine_min_count": 20, "mine_buckets": 7})
    res["text"] = text_balance_stage(ranks, out / "text", len(grid), lambda j: np.arange(*grid.bounds(j)),
                                     table.columns, t, seed=4, log=lambda m: None)
    res["items"] = ranks.items
    q.put((rank, res))


def _merge(results, key):
    """One process's view of a per-chunk result: the ranks' chunk dicts joined (each chunk from one rank)."""
    merged = {}
    for r in results.values():
        value = r[key]
        chunks = value[1] if isinstance(value, tuple) else value
        assert not set(chunks) & set(merged)  # every chunk ran on exactly one rank
        merged.update(chunks)
    return merged


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool")
    write_pool(folder)
    out = {w: tmp_path_factory.mktemp(f"world{w}") for w in (1, 2)}
    out["pool"] = folder
    return {w: run_ranks(stage_worker, w, str(folder), str(out[w]), timeout=600) for w in (1, 2)}, out


def test_every_rank_runs_a_share_of_the_chunks(stages):
    results, _ = stages
    assert results[2][0]["items"] > 0 and results[2][1]["items"] > 0
    assert sorted(_merge(results[2], "lloyd")) == list(range(13))  # 13 chunks of 77, split 6 / 7


def test_lloyd_on_two_processes_equals_one(stages):
    results, _ = stages
    one, two = results[1][0]["lloyd"], results[2]
    assert np.array_equal(one[0], two[0]["lloyd"][0]) and np.array_equal(one[0], two[1]["lloyd"][0])
    merged = _merge(two, "lloyd")
    for j, (a, d) in one[1].items():
        assert np.array_equal(a, merged[j][0]) and np.array_equal(d, merged[j][1])


def test_kmeans_level_with_resampling_on_two_processes_equals_one(stages):
    results, out = stages
    one, merged = results[1][0]["level"], _merge(results[2], "level")
    assert np.array_equal(one[0], results[2][0]["level"][0])
    assert all(np.array_equal(one[1][j][0], merged[j][0]) and np.array_equal(one[1][j][1], merged[j][1])
               for j in one[1])
    for phase in ("phase_000.npz", "phase_001.npz", "phase_002.npz"):  # the checkpoints, byte for byte
        assert (out[1] / "kmeans" / phase).read_bytes() == (out[2] / "kmeans" / phase).read_bytes()


def test_balanced_sampling_on_two_processes_equals_one_and_the_sort(stages):
    from curation.kmeans import KMeansLevel, rank_within_clusters
    from curation.sampling import leaf_budgets

    results, _ = stages
    level = results[1][0]["level"]
    assignment = np.concatenate([level[1][j][0] for j in range(13)])
    dist2 = np.concatenate([level[1][j][1] for j in range(13)])
    upper = [KMeansLevel(np.zeros((3, DIM), np.float32), np.arange(12) % 3, np.zeros(12, np.float32))]
    budget = leaf_budgets([KMeansLevel(level[0], assignment, dist2), *upper], 431)[0]
    for strategy, key in (("closest", dist2.astype(np.float64)), ("random", np.random.default_rng([5, 7]).random(N))):
        one, two = results[1][0][f"sample_{strategy}"], _merge(results[2], f"sample_{strategy}")
        picked = np.concatenate([one[j] for j in range(13)])
        assert np.array_equal(picked, np.concatenate([two[j] for j in range(13)]))
        # the definition: in every leaf, its budget of points in (key, position) order
        assert np.array_equal(picked, rank_within_clusters(assignment, key) < budget[assignment])
        assert picked.sum() == 431


def test_selection_with_ties_splits_them_by_position_on_any_number_of_processes(stages):
    from curation.kmeans import rank_within_clusters

    results, _ = stages
    quota = np.array([0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 1000])
    level = results[1][0]["level"]
    assignment = np.concatenate([level[1][j][0] for j in range(13)])
    chosen1, keys = results[1][0]["select"]
    key = np.concatenate([keys[j] for j in range(13)])
    assert len(np.unique(key)) < N / 10  # many ties: the position bisection is exercised
    expected = rank_within_clusters(assignment, key) < quota[assignment]
    chosen2 = {}
    for r in results[2].values():
        chosen2.update(r["select"][0])
    for chosen in (chosen1, chosen2):
        assert np.array_equal(np.concatenate([chosen[j] for j in range(13)]), expected)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_dedup_in_shards_on_two_processes_equals_one_and_finds_the_planted_copies(stages, kind):
    from curation.dedup import near_duplicates
    from curation.store import EmbeddingStore, shard_paths

    results, out = stages
    removed1, stats1 = results[1][0][f"dedup_{kind}"]
    for r in results[2].values():
        removed2, stats2 = r[f"dedup_{kind}"]
        assert np.array_equal(removed1, removed2) and stats1 == stats2
    assert stats1["shards"] == 4 and stats1["groups"] >= 60  # 40 exact + 20 near copies planted
    for name in ["removed.npy"] + [f"edges/{t:06d}.npy" for t in range(4)] + \
            [f"hits/{i:06d}_{t:06d}.npz" for i in range(4) for t in range(4)]:
        assert (out[1] / f"dedup_{kind}" / name).read_bytes() == (out[2] / f"dedup_{kind}" / name).read_bytes(), name
    # the shards change nothing: one index over the whole pool, in memory, finds the same duplicates
    store = EmbeddingStore(shard_paths(out["pool"], 3))
    uid = Table().uid
    keep, _ = near_duplicates(store, uid, threshold=0.99, neighbors=4, index=kind, nlist=8, nprobe=8, chunk_size=64)
    assert np.flatnonzero(~keep).tolist() == removed1.tolist()


def test_text_balancing_on_two_processes_equals_one(stages):
    results, out = stages
    assert results[1][0]["text"] == results[2][0]["text"] == results[2][1]["text"]
    text = out[1] / "text"
    files = sorted(p.relative_to(text) for p in text.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out[2] / "text") for p in (out[2] / "text").rglob("*") if p.is_file())
    assert len([f for f in files if f.parts[0] == "rows"]) == 13 and (text / "entries.txt").is_file()
    for rel in files:
        assert (text / rel).read_bytes() == (out[2] / "text" / rel).read_bytes(), rel
    # mined through buckets, the entries are what one pass over all captions mines
    from curation.text_balance import mine_metadata

    mined = mine_metadata(captions(), 2, 20)
    assert (text / "entries.txt").read_text().splitlines() == mined


# ====================================================================== exact reductions
def test_fixed_point_sums_are_order_free_where_float32_sums_are_not():
    """The guard behind byte-identical k-means: float16 rows carried as int64 multiples of 2**-24 sum to the
    same bits in any order (any split into chunks and processes); float32 sums of the same rows do not, so a
    float reduction in rank order would make 2 processes differ from 1 (and the tests above go red)."""
    import torch

    from curation.kmeans import _accumulate

    rng = np.random.default_rng(3)
    x = _normalised(rng.normal(size=(4000, 8)) * rng.uniform(0.01, 10, size=(4000, 1))).astype(np.float32)
    a = np.zeros(4000, dtype=np.int64)
    order = rng.permutation(4000)

    def fixed(rows):
        sums = torch.zeros(1, 8, dtype=torch.int64)
        for part in np.array_split(rows, 7):
            _accumulate(sums, a[part], x[part], fixed=True)
        return sums.numpy()
    assert np.array_equal(fixed(np.arange(4000)), fixed(order))
    exact = sum(int(v) for v in (x[:, 0].astype(np.float64) * 2 ** 24).astype(np.int64))
    assert fixed(np.arange(4000))[0, 0] == exact
    f32 = [np.add.reduce(x[rows], axis=0, dtype=np.float32) for rows in (np.arange(4000), order)]
    halves = [np.sum(x[:2000], 0, dtype=np.float32) + np.sum(x[2000:], 0, dtype=np.float32)]
    assert not all(np.array_equal(f32[0], f) for f in f32[1:] + halves)


def test_faiss_searches_give_the_same_bits_for_any_thread_count():
    """faiss's BLAS distances change in their last bits with its thread count (at this size, on the CPUs we
    tried: a plain ``index.search`` with 1 and 2 threads differs in a few hundred of 8,192 rows); the searches of
    the curation do not, so 1 process with T threads equals N processes with T / N."""
    import faiss

    from curation.kmeans import NearestCentroid, fixed_search

    rng = np.random.default_rng(4)
    x = rng.normal(size=(8192, 128)).astype(np.float16).astype(np.float32)
    centroids = rng.normal(size=(64, 128)).astype(np.float32)
    before = faiss.omp_get_max_threads()
    found = []
    try:
        for threads in (1, 2, 3):
            faiss.omp_set_num_threads(threads)
            found.append(NearestCentroid(centroids).search(x))
    finally:
        faiss.omp_set_num_threads(before)
    for d, a in found[1:]:
        assert np.array_equal(d, found[0][0]) and np.array_equal(a, found[0][1])
    index = faiss.IndexFlatIP(128)
    index.add(x[:1000])
    sims = [fixed_search(index, x, 5) for _ in range(2)]
    assert np.array_equal(sims[0][0], sims[1][0]) and sims[0][1].shape == (8192, 5)


def test_integer_reductions_only():
    from curation.ranks import Ranks

    with pytest.raises(TypeError, match="int64"):
        Ranks().all_reduce(np.zeros(3, np.float64))


def test_launcher_environment_is_read_from_torchrun_then_slurm():
    from curation.ranks import launcher_ranks

    assert launcher_ranks({}) == {"rank": 0, "world": 1, "local_rank": 0, "local_world": 1}
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert launcher_ranks(torchrun) == {"rank": 5, "world": 8, "local_rank": 1, "local_world": 4}
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "8(x2)"}
    assert launcher_ranks(slurm) == {"rank": 9, "world": 16, "local_rank": 1, "local_world": 8}
    assert launcher_ranks({**slurm, **torchrun})["world"] == 8  # torchrun inside an allocation wins


def _dead_peer_worker(rank, world, port, q):
    init_gloo(rank, world, port)
    from curation.ranks import ProcessGroupError, Ranks

    ranks = Ranks(rank, world, timeout_s=60)
    ranks.barrier()
    if rank == 1:
        os._exit(3)  # dies before the next collective
    try:
        ranks.all_reduce(np.ones(4, np.int64))
        q.put((rank, "no error"))
    except ProcessGroupError as e:
        q.put((rank, str(e)))


def test_a_dead_rank_stops_the_others_with_one_line():
    import time

    import torch.multiprocessing as mp

    from multiproc import free_port

    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_dead_peer_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    start = time.monotonic()
    rank, message = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert rank == 0 and time.monotonic() - start < 60  # well within the process group's timeout
    assert message.startswith("rank 0 of 2: another process stopped or did not answer within 60 s") and \
        "rerun the same command, with any number of processes, to resume" in message and "\n" not in message


# ====================================================================== the whole pipeline under torchrun
def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _torchrun(nproc: int, *args, script=None):
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = [script] if script else ["-m", "dinotxt.cli"]
    return subprocess.run([*runner, *target, "curate", RECIPE, *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=600)


def _outputs(run: Path):
    """Every file of a finished run but the stage markers, the resolved config and the report (it holds seconds)."""
    skip = {"done.json", "started.json", "config.yaml", "report.json"}
    return sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name not in skip)


def _assert_same_outputs(a: Path, b: Path):
    files = _outputs(a)
    assert files == _outputs(b) and len(files) > 80
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    ra, rb = (json.loads((x / "report" / "report.json").read_text()) for x in (a, b))
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb


@pytest.fixture(scope="module")
def pool(curation_pool):
    """The tiny pool of tests/test_curation_*.py (conftest.py): 240 pairs in 4 shards of 64, 64, 64, 48."""
    return curation_pool


@pytest.fixture(scope="module")
def one_process(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    proc = subprocess.run([sys.executable, "-m", "dinotxt.cli", "curate", RECIPE, f"pool.data={pool}",
                           f"output_dir={out}"], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "debug"


@pytest.mark.slow
def test_curate_under_torchrun_on_two_processes_is_byte_identical_to_one(pool, one_process, tmp_path):
    proc = _torchrun(2, f"pool.data={pool}", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "debug"
    _assert_same_outputs(one_process, run)
    shared = {}
    for done in run.rglob("done.json"):
        record = json.loads(done.read_text())
        assert record["ranks"] == 2 and len(record["items_per_rank"]) == 2
        shared[record["stage"]] = record["items_per_rank"]
    for stage in ("embed", "embed_text", "dedup", "cluster_level1", "image_balance", "text_balance", "combine"):
        assert min(shared[stage]) > 0, (stage, shared[stage])  # both ranks ran work items
    for stage in ("cluster_level2", "report"):  # rank 0's alone by design
        assert shared[stage][0] > 0 and shared[stage][1] == 0
    assert shared["embed"] == [2, 2] and shared["dedup"] == [4, 5]  # 4 shards; 9 (index, query) shard pairs
    one = json.loads((one_process / "embed" / "done.json").read_text())
    assert one["ranks"] == 1 and one["items_per_rank"] == [4]
    assert proc.stdout.count("curation 'debug' (intersection)") == 1  # the summary, printed by rank 0 only


KILL_IN_LLOYD = """
import os, signal, sys
from pathlib import Path
import curation.kmeans as K
real = K._accumulate
def accumulate(*args, **kwargs):
    # rank 1 dies inside the resampling refit's Lloyd of level 1, after the phase-0 checkpoint
    if os.environ.get("RANK") == "1" and list(Path(sys.argv[-1].split("=", 1)[1]).glob("debug/cluster/level1/phase_000.npz")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
K._accumulate = accumulate
from dinotxt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_killed_in_lloyd_resumes_on_one_process_to_identical_outputs(pool, one_process, tmp_path):
    script = tmp_path / "kill_in_lloyd.py"
    script.write_text(KILL_IN_LLOYD)
    out = tmp_path / "runs"
    proc = _torchrun(2, f"pool.data={pool}", f"output_dir={out}", script=script)
    assert proc.returncode != 0
    level1 = out / "debug" / "cluster" / "level1"
    assert (level1 / "phase_000.npz").is_file() and not (level1 / "done.json").exists()
    assert json.loads((out / "debug" / "dedup" / "done.json").read_text())["ranks"] == 2
    resumed = subprocess.run([sys.executable, "-m", "dinotxt.cli", "curate", RECIPE, f"pool.data={pool}",
                              f"output_dir={out}"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "cluster_level1: resuming" in resumed.stdout and "dedup: done earlier, skipped" in resumed.stdout
    _assert_same_outputs(one_process, out / "debug")
    record = json.loads((level1 / "done.json").read_text())
    assert record["ranks"] == 1 and record["items_per_rank"] == [3]


def test_a_store_of_many_shards_keeps_few_maps_open(tmp_path, monkeypatch):
    """A pool of 10^9 pairs is ~10^5 shards; Linux allows 65,530 memory maps per process, so the store maps a
    shard when it is read and keeps only the last few mapped."""
    import curation.store as st

    monkeypatch.setattr(st, "_OPEN_MAPS", 3)
    x = _normalised(np.random.default_rng(6).normal(size=(50, 4)))
    paths = st.shard_paths(tmp_path, 10)
    for i, path in enumerate(paths):
        st.save_npy(path, x[i * 5:(i + 1) * 5])
    store = st.EmbeddingStore(paths)
    assert not store._maps and store.fixed_point  # nothing mapped until read
    assert np.array_equal(np.concatenate([c for _, c in store.chunks(7)]), x.astype(np.float32))
    assert len(store._maps) <= 3
    rows = np.array([49, 0, 23, 24, 5])
    assert np.array_equal(store.take(rows), x[rows].astype(np.float32)) and len(store._maps) <= 3
