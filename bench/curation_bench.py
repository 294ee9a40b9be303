"""Scale benchmark of the curation stage: hierarchical k-means with resampling + balanced
sampling on synthetic embeddings, the real code path (faiss, memory-mapped fp16 shards)
against the plain pure-torch reference of the same algorithm, measured in the same run.

Data: synthetic, clustered and SKEWED image embeddings: a two-level mixture of Gaussians
(64 "topics" x 32 sub-components, Zipf weights with exponent 1 at both levels, so the
largest topic holds ~21% of the pool and the smallest ~0.3%), L2-normalised, float16,
with 2% planted near duplicates. They are written chunk by chunk as ``.npy`` shards
(``curation.store.save_npy`` / ``shard_paths``, the layout of the embed stage), so
generation holds one shard at a time, never the pool.

Rows, per dataset (each implementation runs in a FRESH subprocess, so peak memory is its own):
  faiss + mmap   the pipeline's code: ``EmbeddingStore`` over the shards (memory-mapped,
                 read in float32 chunks), optional ``dedup.near_duplicates``, then
                 ``kmeans.kmeans_level`` per level (faiss nearest-centroid search),
                 ``sampling.balanced_sample`` to the target (half the pool by default).
  torch ref      ``kmeans_reference.torch_hierarchical_kmeans`` on the pool loaded into RAM
                 as one float32 tensor (its design), then the same ``balanced_sample``.
                 With --dedup it clusters the rows the faiss row kept (no torch dedup).
The stage times of a level are split into the initial k-means and the resampling steps
(with the k-means++ seeding time shown separately); "total" is the sum of the stages.
The process CPU time (user + sys, all threads) of the stages and the machine's 1-minute
load average at the start and end of each worker are printed too: on a shared machine
wall times move with the load, CPU time much less.

Memory: peak RSS is the kernel's high-water mark (VmHWM) of the worker. It counts the
pages of the memory-mapped shards the process touched (file-backed, reclaimable page
cache: at most the fp16 pool, once), so the anonymous part (RssAnon, sampled every 10 ms,
above what the imports use) is shown too: that is what the process allocated itself, in
MiB and in units of the fp16 pool, with its peak inside the level-1 k-means and the
level-1 resampling step. The faiss path never copies the pool: its anonymous memory is a
working set (one float32 chunk and its float64 copy inside Lloyd, chunk_size x D x 12
bytes; the k-means++ subset; in a resampling step the resampled subset, <= N/2 rows in
float32, i.e. up to the size of the fp16 pool). The torch reference holds the fp32 pool
plus, in every Lloyd step, a float64 copy of it.

Balance: normalized entropy (1 = uniform) of the top-level cluster distribution over the
pool vs over the selection, the same for the level-1 clusters, and for the 64 generating
topics (a ground truth that does not depend on the clustering). Agreement between the two
implementations: mean squared distance of the items to their centroid at every level (the
two runs draw different random numbers, so equal quality, not equal clusters, is expected).

Defaults and why: datasets 1M x 384 and 200k x 1024; levels sqrt(N) and sqrt(N)/10 per
dataset ([1000, 100] for 1M, the pipeline's default ``cluster.levels``; [447, 45] for
200k); 1 resampling step per level; target = half the pool; 2 threads; the pipeline's
k-means++ subset of 64 points per centroid. Lloyd iterations default to 10, not the
method's ~50: one assignment pass of 1M x 384 against 1000 centroids is ~0.8 TFLOP (~10 s
for faiss on 2 cores), and the torch reference's k-means++ seeding alone (1000 sequential
steps over a 64,000 x 384 float32 subset, twice per level) takes minutes, so 50 iterations
would take over an hour. Both rows run the same iterations, so the ratios hold; the
"without seeding" total isolates the Lloyd/assignment engine. De-duplication is off by
default: at 1M rows it is an IVF index (4000 lists) whose training and search alone take
several minutes on 2 cores; ``--dedup`` turns it on (``--quick`` runs it, exact index).
The full default run takes about 8 min on 2 quiet cores (most of it the torch reference on
1M x 384) and twice that when other jobs share the cores; read ratios, not seconds.

Processes (``--processes 2``, the default): the pipeline's code again under ``torchrun`` on 2
processes (``--threads`` split between them: 1 thread each on 2 cores), every rank timing its own
stages and peak memory; the table says whether the centroid bits and sampled rows equal the
1-process run's. ``--baseline CHECKOUT`` adds the 1-process row of another checkout (a ``git
worktree`` of an earlier commit), timed in the same run, so a change is measured against the code
before it on the same machine and load.

    python bench/curation_bench.py --quick               # tiny sizes, seconds
    python bench/curation_bench.py                       # the table (~8 min on 2 quiet cores)
    python bench/curation_bench.py --datasets 1000000x384 --iters 20 --dedup --json out.json
    git worktree add /tmp/before HEAD~3 && python bench/curation_bench.py --datasets 1000000x384 --no-torch \
        --baseline /tmp/before                        # 1 process against 2, and against an earlier commit
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 ** 2

TOPICS, SUBS, ZIPF = 64, 32, 1.0
SUB_SPREAD, NOISE, DUP_FRACTION, DUP_NOISE = 0.6, 0.5, 0.02, 0.02


# ---------------------------------------------------------------------------- memory
def _status_kib() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:", "RssAnon:", "RssFile:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def mapped_rss(folder: Path) -> int:
    """Resident bytes of this process's memory maps of files under ``folder`` (the shards), from /proc/self/smaps."""
    total, inside = 0, False
    prefix = str(Path(folder).resolve())
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                inside = len(parts) == 6 and parts[5].strip().startswith(prefix)
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


class MemorySampler:
    """Samples /proc/self/status and the process CPU time every ``interval`` s in a daemon thread:
    (time, VmRSS, RssAnon, RssFile in bytes, CPU seconds of all threads)."""

    def __init__(self, interval: float = 0.01):
        self.samples: List[Tuple[float, int, int, int, float]] = []
        self.load = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self.interval = interval
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        s = _status_kib()
        self.samples.append((time.perf_counter(), s["VmRSS"] * 1024, s["RssAnon"] * 1024, s["RssFile"] * 1024,
                             time.process_time()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self, base: Dict[str, int], folder: Optional[Path] = None) -> Dict[str, int]:
        """Peaks; ``base`` is ``_status_kib()`` after the imports; ``folder``: also the shard pages still mapped."""
        self._stop.set()
        self._thread.join()
        self.sample()
        out = {"hwm": _status_kib()["VmHWM"] * 1024, "peak_anon": max(s[2] for s in self.samples),
               "peak_file": max(s[3] for s in self.samples), "base_anon": base["RssAnon"] * 1024,
               "base_file": base["RssFile"] * 1024, "base_rss": base["VmRSS"] * 1024,
               "loadavg": self.load + [os.getloadavg()[0]]}
        if folder is not None:
            out["shards_resident"] = mapped_rss(folder)
        return out

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds (user + sys, all threads) between two perf_counter times, to the sampling interval."""
        import bisect

        times = [s[0] for s in self.samples]
        i0 = min(bisect.bisect_left(times, t0), len(times) - 1)
        i1 = max(bisect.bisect_right(times, t1) - 1, 0)
        return max(0.0, self.samples[i1][4] - self.samples[i0][4])

    def peak_anon_between(self, t0: float, t1: float) -> int:
        inside = [s[2] for s in self.samples if t0 <= s[0] <= t1]
        return max(inside) if inside else 0


# ---------------------------------------------------------------------------- timing helpers
class Intervals:
    """Wraps a module-level function to record the (start, end) of every call (e.g. the k-means++ seeding)."""

    def __init__(self, module, name: str):
        self.calls: List[Tuple[float, float]] = []
        original = getattr(module, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.calls.append((t0, time.perf_counter()))

        setattr(module, name, timed)

    def within(self, t0: float, t1: float) -> float:
        return sum(e - s for s, e in self.calls if s >= t0 and e <= t1)


def setup_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


# ---------------------------------------------------------------------------- data
def generate(folder: Path, n: int, dim: int, shard_rows: int, seed: int, block_rows: int = 8192) -> Dict:
    """Write the synthetic pool as fp16 shards + the generating topic of every row; one shard in RAM at a time."""
    import numpy as np

    from curation.store import save_npy, shard_paths

    sampler = MemorySampler()
    base = _status_kib()
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, n, dim])

    def unit(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    topic_centers = unit(rng.standard_normal((TOPICS, dim), dtype=np.float32))
    sub_centers = unit(np.repeat(topic_centers, SUBS, axis=0)
                       + SUB_SPREAD * unit(rng.standard_normal((TOPICS * SUBS, dim), dtype=np.float32)))
    zipf_t = 1.0 / np.arange(1, TOPICS + 1) ** ZIPF
    zipf_s = 1.0 / np.arange(1, SUBS + 1) ** ZIPF
    weights = (zipf_t[:, None] / zipf_t.sum() * zipf_s[None, :] / zipf_s.sum()).ravel()
    shards = -(-n // shard_rows)
    paths = shard_paths(folder, shards)
    topics = np.empty(n, dtype=np.int16)
    planted = 0
    for s, path in enumerate(paths):
        lo, hi = s * shard_rows, min(n, (s + 1) * shard_rows)
        m = hi - lo
        comp = rng.choice(len(weights), size=m, p=weights)
        dup = rng.random(m) < DUP_FRACTION  # planted near duplicates: a copy of another row of the shard + tiny noise
        src = rng.integers(m, size=int(dup.sum()))
        comp[dup] = comp[src]
        planted += int(dup.sum())
        shard = np.empty((m, dim), dtype=np.float16)
        for b in range(0, m, block_rows):  # float32 work in small blocks: the shard is the only big array
            e = min(m, b + block_rows)
            x = sub_centers[comp[b:e]]
            x += (NOISE / np.sqrt(dim)) * rng.standard_normal((e - b, dim), dtype=np.float32)
            shard[b:e] = unit(x)
        jitter = (DUP_NOISE / np.sqrt(dim)) * rng.standard_normal((len(src), dim), dtype=np.float32)
        shard[dup] = unit(shard[src].astype(np.float32) + jitter)
        save_npy(path, shard)
        topics[lo:hi] = comp // SUBS
        del shard, x, jitter
    np.save(folder / "topics.npy", topics)
    mem = sampler.stop(base)
    return {"seconds": time.perf_counter() - t0, "shards": shards, "planted_duplicates": planted, **mem}


# ---------------------------------------------------------------------------- metrics
def balance_metrics(levels, picked, topics) -> Dict:
    import numpy as np

    from curation.kmeans import cluster_sizes
    from curation.sampling import normalized_entropy

    sizes = cluster_sizes(levels)
    mask = np.zeros(len(levels[0].assignment), dtype=bool)
    mask[picked] = True
    leaf_after = np.bincount(levels[0].assignment[mask], minlength=len(levels[0].centroids))
    top_after = leaf_after
    for lvl in levels[1:]:
        top_after = np.bincount(lvl.assignment, weights=top_after, minlength=len(lvl.centroids)).astype(np.int64)
    return {
        "selected": int(mask.sum()),
        "entropy_top": [normalized_entropy(sizes[-1]), normalized_entropy(top_after)],
        "entropy_leaf": [normalized_entropy(sizes[0]), normalized_entropy(leaf_after)],
        "entropy_topics": [normalized_entropy(np.bincount(topics, minlength=TOPICS)),
                           normalized_entropy(np.bincount(topics[mask], minlength=TOPICS))],
        "top_size_max_min": [[int(sizes[-1].max()), int(sizes[-1].min())], [int(top_after.max()), int(top_after.min())]],
        "empty_leaf": int((sizes[0] == 0).sum()),
        "mean_dist2": [float(np.mean(lvl.dist2, dtype=np.float64)) for lvl in levels],
    }


def stage_rows(bounds: List[Tuple[str, float, float]], seeding: Intervals, sampler: MemorySampler) -> Dict:
    return {name: {"seconds": t1 - t0, "seeding": seeding.within(t0, t1) if seeding else 0.0,
                   "peak_anon": sampler.peak_anon_between(t0, t1), "cpu": sampler.cpu_between(t0, t1)}
            for name, t0, t1 in bounds}


# ---------------------------------------------------------------------------- workers
def worker_faiss(spec: Dict) -> Dict:
    import numpy as np

    setup_threads(spec["threads"])
    import curation.kmeans as km
    from curation.sampling import balanced_sample
    from curation.store import ArrayView, EmbeddingStore, shard_paths

    sampler = MemorySampler()
    base = _status_kib()
    folder = Path(spec["folder"])
    seeding = Intervals(km, "kmeans_plusplus")
    store = EmbeddingStore(shard_paths(folder, spec["shards"]), expect_dim=spec["dim"])
    topics = np.load(folder / "topics.npy")
    bounds: List[Tuple[str, float, float]] = []
    out: Dict = {}
    rows = np.arange(len(store))
    data = store
    if spec["dedup"]:
        from curation.dedup import near_duplicates

        t0 = time.perf_counter()
        keep, stats = near_duplicates(store, rows, spec["dedup_threshold"], 16, spec["dedup_index"], 200_000,
                                      spec["dedup_nlist"], spec["dedup_nprobe"], 16384, spec["seed"])
        bounds.append(("dedup", t0, time.perf_counter()))
        # the freed faiss index stays partly in the glibc heap (not given back without malloc_trim), so with
        # --dedup the anonymous peaks of the later stages include it, as they would in a one-process pipeline run
        rows = np.flatnonzero(keep)
        np.save(folder / "kept.npy", rows)
        data = store.subset(rows)
        out["dedup"] = {k: stats[k] for k in ("index", "groups", "removed", "kept")}
    opts = km.KMeansOptions(iters=spec["iters"], chunk_size=spec["chunk_size"])
    levels = []
    for i, k in enumerate(spec["levels"]):
        items = data if i == 0 else ArrayView(levels[-1].centroids)
        marks: List[float] = []
        t0 = time.perf_counter()
        lvl = km.kmeans_level(items, k, opts, spec["resampling_steps"], None, spec["seed"], i + 1, None,
                              log=lambda msg: (marks.append(time.perf_counter()), _log(f"  faiss {msg}")))
        t1 = time.perf_counter()
        marks = [t0] + marks[1:] + [t1]  # phase starts: k-means, resampling 1..R
        bounds.append((f"level{i + 1}_kmeans", marks[0], marks[1]))
        if len(marks) > 2:
            bounds.append((f"level{i + 1}_resample", marks[1], marks[-1]))
        levels.append(lvl)
    target = int(round(spec["target"] * len(rows)))
    t0 = time.perf_counter()
    picked = balanced_sample(levels, target, "closest", spec["seed"])
    bounds.append(("sampling", t0, time.perf_counter()))
    mem = sampler.stop(base, folder)
    out.update(stages=stage_rows(bounds, seeding, sampler), memory=mem,
               balance=balance_metrics(levels, picked, topics[rows]), target=target,
               result=result_digest(levels[0].centroids, rows[picked]))
    return out


def result_digest(centroids, picked_rows) -> str:
    """A short hash of the level-1 centroids' bits and the pool rows sampled: equal digests, equal results."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(np.ascontiguousarray(centroids, dtype=np.float32).tobytes())
    h.update(np.asarray(picked_rows, dtype=np.int64).tobytes())
    return h.hexdigest()[:12]


def worker_processes(spec: Dict) -> Dict:
    """The same work on the processes ``torchrun`` started (``curation.ranks``): dedup by shard pairs, level 1
    by grid chunks (each rank its share), levels >= 2 on rank 0, balanced sampling by distributed selection.
    Every rank measures its own time and memory."""
    import numpy as np

    setup_threads(spec["threads"])
    import curation.kmeans as km
    from curation.ranks import Ranks
    from curation.sampling import balanced_selection
    from curation.store import ArrayView, EmbeddingStore, Grid, KeptRows, shard_paths

    ranks = Ranks.from_env()
    sampler = MemorySampler()
    base = _status_kib()
    folder = Path(spec["folder"])
    seeding = Intervals(km, "kmeans_plusplus")
    store = EmbeddingStore(shard_paths(folder, spec["shards"]), expect_dim=spec["dim"])
    bounds: List[Tuple[str, float, float]] = []
    out: Dict = {"rank": ranks.rank, "world": ranks.world}
    data, n = store, len(store)
    kept = KeptRows(n, np.zeros(0, np.int64))
    if spec["dedup"]:
        from curation.dedup import DedupSettings, dedup_stage

        ranks.barrier()
        t0 = time.perf_counter()
        settings = DedupSettings(n, spec["dedup_threshold"], 16, spec["dedup_index"], 200_000, spec["dedup_nlist"],
                                 spec["dedup_nprobe"], 16384, spec["dedup_shard_rows"], spec["seed"])
        removed, stats = dedup_stage(ranks, store, Path(spec["work"]) / "dedup", settings, lambda r: r, log=_log)
        bounds.append(("dedup", t0, time.perf_counter()))
        kept = KeptRows(n, removed)
        data = store.subset(kept)
        out["dedup"] = {k: stats[k] for k in ("index", "groups", "removed", "kept")}
    opts = km.KMeansOptions(iters=spec["iters"], chunk_size=spec["chunk_size"])
    ranks.barrier()
    marks: List[float] = []
    t0 = time.perf_counter()
    level1 = km.kmeans_level(data, spec["levels"][0], opts, spec["resampling_steps"], None, spec["seed"], 1,
                             log=lambda msg: marks.append(time.perf_counter()), ranks=ranks)
    t1 = time.perf_counter()
    marks = [t0] + marks[1:] + [t1]
    bounds.append(("level1_kmeans", marks[0], marks[1]))
    if len(marks) > 2:
        bounds.append(("level1_resample", marks[1], marks[-1]))

    def upper_levels():
        levels, items = [], level1.centroids
        for i, k in enumerate(spec["levels"][1:]):
            lvl = km.kmeans_level(ArrayView(items), k, opts, spec["resampling_steps"], None, spec["seed"], i + 2,
                                  log=lambda msg: None).level()
            levels.append(lvl)
            items = lvl.centroids
        return levels
    t0 = time.perf_counter()
    upper = ranks.on_zero(upper_levels)
    grid = Grid(len(data), spec["chunk_size"])
    leaves = {j: (a, d, grid.bounds(j)[0]) for j, (a, d) in level1.assigned.items()}
    target = int(round(spec["target"] * len(data)))
    picked = balanced_selection(ranks, leaves, upper, spec["levels"][0], target, "closest", spec["seed"])
    mine = np.concatenate([kept[np.arange(*grid.bounds(j))[m]] for j, m in sorted(picked.items())] or [np.zeros(0, np.int64)])
    bounds.append(("sampling", t0, time.perf_counter()))
    everyone = ranks.all_gather(mine)
    mem = sampler.stop(base, folder)
    out.update(stages=stage_rows(bounds, seeding, sampler), memory=mem, target=target, chunks=len(level1.assigned),
               result=result_digest(level1.centroids, np.sort(np.concatenate(everyone))))
    return out


def worker_torch(spec: Dict) -> Dict:
    import numpy as np
    import torch

    setup_threads(spec["threads"])
    import curation.kmeans_reference as ref
    from curation.kmeans import KMeansLevel
    from curation.sampling import balanced_sample
    from curation.store import shard_paths

    sampler = MemorySampler()
    base = _status_kib()
    folder = Path(spec["folder"])
    seeding = Intervals(ref, "torch_kmeans_plusplus")
    runs = Intervals(ref, "torch_kmeans")  # call j of level l starts its k-means (j = 0) or resampling step j
    topics = np.load(folder / "topics.npy")
    rows = np.load(folder / "kept.npy") if spec["dedup"] else np.arange(spec["n"])
    bounds: List[Tuple[str, float, float]] = []

    t0 = time.perf_counter()
    x = torch.empty(len(rows), spec["dim"], dtype=torch.float32)  # the pool in RAM, fp32: the reference's design
    offset, filled = 0, 0
    for path in shard_paths(folder, spec["shards"]):
        shard = np.load(path)  # a plain read (no memory map), one shard at a time
        sel = rows[(rows >= offset) & (rows < offset + len(shard))] - offset
        x[filled:filled + len(sel)] = torch.from_numpy(shard[sel].astype(np.float32))
        offset, filled = offset + len(shard), filled + len(sel)
        del shard
    bounds.append(("load", t0, time.perf_counter()))

    t0 = time.perf_counter()
    L, R = len(spec["levels"]), spec["resampling_steps"]
    result = ref.torch_hierarchical_kmeans(x, spec["levels"], spec["iters"], [R] * L, [None] * L, seed=spec["seed"])
    t1 = time.perf_counter()
    starts = [s for s, _ in runs.calls]
    for i in range(L):
        first = starts[i * (R + 1)]
        last = starts[(i + 1) * (R + 1)] if i + 1 < L else t1
        if i == 0:
            first = t0
        bounds.append((f"level{i + 1}_kmeans", first, starts[i * (R + 1) + 1] if R else last))
        if R:
            bounds.append((f"level{i + 1}_resample", starts[i * (R + 1) + 1], last))
    _log(f"  torch: {L} levels in {t1 - t0:.1f} s")
    # untimed: the squared distances the reference does not return (needed for 'closest' sampling and inertia)
    levels, items = [], x
    for c, a in result:
        _, d2 = ref._nearest(items, c)
        levels.append(KMeansLevel(c.numpy(), a.numpy().astype(np.int64), d2.numpy()))
        items = c
    target = int(round(spec["target"] * len(rows)))
    t0 = time.perf_counter()
    picked = balanced_sample(levels, target, "closest", spec["seed"])
    bounds.append(("sampling", t0, time.perf_counter()))
    mem = sampler.stop(base, folder)
    return {"stages": stage_rows(bounds, seeding, sampler), "memory": mem,
            "balance": balance_metrics(levels, picked, topics[rows]), "target": target}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- orchestration
def run_worker(role: str, spec: Dict, threads: int, checkout: Path = ROOT, processes: int = 1):
    """Run one worker in a fresh interpreter (its own peak memory), with the thread count fixed before imports,
    importing ``curation`` from ``checkout`` (this one, or a baseline's); ``processes`` > 1: under torchrun, one
    result per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps({**spec, "work": tmp, "threads": threads}))
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
        env["PYTHONPATH"] = str(checkout) + os.pathsep + env.get("PYTHONPATH", "")
        launch = [sys.executable]
        if processes > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        subprocess.run([*launch, __file__, "--_worker", role, str(spec_path), str(out_path)], env=env, check=True)
        if processes > 1:
            return [json.loads(Path(f"{out_path}.rank{r}").read_text()) for r in range(processes)]
        return json.loads(out_path.read_text())


def parse_dataset(text: str) -> Tuple[int, int]:
    n, d = text.lower().split("x")
    return int(float(n)), int(d)


def default_levels(n: int) -> List[int]:
    """sqrt(N) level-1 clusters and ten level-1 clusters per top cluster: [1000, 100] for 1M, [447, 45] for 200k."""
    k1 = max(2, round(n ** 0.5))
    return [k1, max(1, round(k1 / 10))]


def fmt_mib(b: Optional[float]) -> str:
    return "-" if b is None else f"{b / MIB:,.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{b / a:.2f}x" if a and b is not None else "-"


def print_table(res: Dict) -> None:
    cfg, f, t = res["config"], res["faiss"], res.get("torch")
    n, d = cfg["n"], cfg["dim"]
    fp16, fp32 = n * d * 2, n * d * 4
    R = cfg["resampling_steps"]
    w, c = 50, 17
    rule = "-" * (w + 3 * c)
    gen = res["generate"]
    print()
    print(f"=== {n:,} x {d}   levels {cfg['levels']}   Lloyd iters {cfg['iters']}   resampling steps {R}   "
          f"target {f['target']:,}   threads {cfg['threads']}")
    print(f"    pool: fp16 {fp16 / MIB:,.0f} MiB (memory-mapped shards)   fp32 {fp32 / MIB:,.0f} MiB   "
          f"generated in {gen['seconds']:.1f} s as {gen['shards']} shards, generator anonymous RSS above imports "
          f"{fmt_mib(gen['peak_anon'] - gen['base_anon'])} MiB")
    print(f"{'':<{w}}{'faiss + mmap':>{c}}{'torch reference':>{c}}{'torch / faiss':>{c}}")
    print(rule)

    def line(label, a, b, fmt="{:.1f}", show_ratio=True):
        sa = "-" if a is None else fmt.format(a)
        sb = "-" if b is None else fmt.format(b)
        print(f"{label:<{w}}{sa:>{c}}{sb:>{c}}{(ratio(a, b) if show_ratio else ''):>{c}}")

    def pair(label, a, b):
        print(f"{label:<{w}}{a:>{c}}{b:>{c}}")

    fs, ts = f["stages"], (t or {}).get("stages", {})
    names = [("dedup", "near-duplicate removal (s) [faiss only]"), ("load", "load the pool into RAM as fp32 (s)")]
    for i, k in enumerate(cfg["levels"]):
        names.append((f"level{i + 1}_kmeans", f"level {i + 1}: k-means, {k} clusters (s)"))
        if R:
            names.append((f"level{i + 1}_resample", f"level {i + 1}: {R} resampling step{'s' * (R > 1)} (s)"))
    names.append(("sampling", f"balanced sampling to {f['target']:,} (s)"))
    for key, label in names:
        a, b = fs.get(key), ts.get(key)
        if a is None and b is None:
            continue
        line(label, a and a["seconds"], b and b["seconds"])
        if key.startswith("level"):
            line("    of which k-means++ seeding (s)", a and a["seeding"], b and b["seeding"], show_ratio=False)
    tot_f = sum(v["seconds"] for v in fs.values())
    tot_t = sum(v["seconds"] for v in ts.values()) if t else None
    line("total (s)", tot_f, tot_t)
    if "dedup" in fs:
        line("total without dedup (s)", tot_f - fs["dedup"]["seconds"], tot_t)
    seed_f = sum(v["seeding"] for v in fs.values())
    seed_t = sum(v["seeding"] for v in ts.values()) if t else 0.0
    line("total without dedup and k-means++ seeding (s)", tot_f - fs.get("dedup", {}).get("seconds", 0.0) - seed_f,
         tot_t - seed_t if t else None)
    line("CPU time of the stages, user+sys, all threads (s)", sum(v["cpu"] for v in fs.values()),
         sum(v["cpu"] for v in ts.values()) if t else None)
    load = "{:.1f} -> {:.1f}"
    pair("machine load average (1 min), start -> end", load.format(*f["memory"]["loadavg"]),
         load.format(*t["memory"]["loadavg"]) if t else "-")
    print(rule)
    fm, tm = f["memory"], (t or {}).get("memory")

    def mem(label, get, fmt="{:,.0f}", show_ratio=True, unit=MIB):
        a = get(fm)
        b = get(tm) if tm else None
        line(label, a / unit, None if b is None else b / unit, fmt, show_ratio)

    mem("peak RSS of the process, VmHWM (MiB)", lambda m: m["hwm"])
    mem("  RSS after the imports (MiB)", lambda m: m["base_rss"], show_ratio=False)
    mem("  peak anonymous RSS above the imports (MiB)", lambda m: m["peak_anon"] - m["base_anon"])
    mem("    ... in units of the fp16 pool", lambda m: m["peak_anon"] - m["base_anon"], "{:.2f}", False, fp16)
    for key, label in (("level1_kmeans", "level 1 k-means"), ("level1_resample", "level 1 resampling")):
        if key in fs:
            a = fs[key]["peak_anon"] - fm["base_anon"]
            b = ts[key]["peak_anon"] - tm["base_anon"] if tm and key in ts else None
            line(f"    during {label} (MiB)", a / MIB, None if b is None else b / MIB, "{:,.0f}", False)
    mem("  peak file-backed RSS above the imports (MiB)", lambda m: m["peak_file"] - m["base_file"], show_ratio=False)
    mem("    of which shard pages mapped at the end (MiB)", lambda m: m.get("shards_resident", 0), show_ratio=False)
    print(rule)
    fb, tb = f["balance"], (t or {}).get("balance")
    for i in range(len(cfg["levels"])):
        line(f"mean sq. distance to centroid, level {i + 1}", fb["mean_dist2"][i], tb and tb["mean_dist2"][i], "{:.4f}")
    for label, key in (("top-level clusters", "entropy_top"), ("level-1 clusters", "entropy_leaf"),
                       (f"true topics ({TOPICS})", "entropy_topics")):
        pair(f"entropy of {label}, pool -> selection", f"{fb[key][0]:.3f} -> {fb[key][1]:.3f}",
             f"{tb[key][0]:.3f} -> {tb[key][1]:.3f}" if tb else "-")
    sizes = "{} / {}"
    for j, when in ((0, "pool"), (1, "selection")):
        pair(f"largest / smallest top cluster, {when}", sizes.format(*fb["top_size_max_min"][j]),
             sizes.format(*tb["top_size_max_min"][j]) if tb else "-")
    line("empty level-1 clusters", fb["empty_leaf"], tb and tb["empty_leaf"], "{:d}", show_ratio=False)
    if "dedup" in f:
        dd = f["dedup"]
        print(f"dedup ({dd['index']} index): {dd['removed']:,} near duplicates removed in {dd['groups']:,} groups, "
              f"{dd['kept']:,} kept; {gen['planted_duplicates']:,} planted")


def checkout_label(path: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        return f"{path.name}@{rev}"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return path.name


def print_processes_table(res: Dict) -> None:
    """1 process (this checkout, and the baseline checkout's) against N processes, per rank: time, memory, result."""
    cfg, one = res["config"], res["faiss"]
    ranks = res.get("processes") or []
    base = res.get("baseline")
    cols = [("1 process", one)] + ([(f"1 proc {res['baseline_label']}", base)] if base else []) + \
        [(f"{len(ranks)} proc: rank {r['rank']}", r) for r in ranks]
    w, c = 44, 20
    print()
    print(f"--- processes: 1 process ({cfg['threads']} threads) against {len(ranks)} processes "
          f"({max(1, cfg['threads'] // max(1, len(ranks)))} thread(s) each, torchrun, gloo), the same shards; "
          f"ratios against the 1-process row of this checkout")
    print(f"{'':<{w}}" + "".join(f"{name:>{c}}" for name, _ in cols))
    print("-" * (w + c * len(cols)))

    def row(label, get, fmt="{:.1f}", ratio_of=None):
        cells = []
        for _, r in cols:
            v = get(r)
            cells.append("-" if v is None else fmt.format(v))
        line = f"{label:<{w}}" + "".join(f"{x:>{c}}" for x in cells)
        print(line)

    def stage(key):
        return lambda r: r["stages"][key]["seconds"] if key in r["stages"] else None
    for key, label in (("dedup", "near-duplicate removal (s)"), ("level1_kmeans", "level 1 k-means (s)"),
                       ("level1_resample", "level 1 resampling (s)"), ("sampling", "levels >= 2 + balanced sampling (s)")):
        if key in one["stages"]:
            row(label, stage(key))
    keys = [k for k in ("dedup", "level1_kmeans", "level1_resample", "sampling") if k in one["stages"]]
    total = lambda r: sum(r["stages"][k]["seconds"] for k in keys if k in r["stages"])  # noqa: E731
    t1 = total(one)
    row("total of these (s)", total)
    row("  against 1 process (x time)", lambda r: total(r) / t1, "{:.2f}")
    row("peak RSS of the process, VmHWM (MiB)", lambda r: r["memory"]["hwm"] / MIB, "{:,.0f}")
    row("  anonymous RSS above the imports (MiB)", lambda r: (r["memory"]["peak_anon"] - r["memory"]["base_anon"]) / MIB,
        "{:,.0f}")
    row("grid chunks of level 1 run", lambda r: r.get("chunks"), "{}")
    row("result: level-1 centroids + sample", lambda r: r.get("result"), "{}")
    if ranks:
        same = all(r.get("result") == one.get("result") for r in ranks)
        print(f"{len(ranks)} processes give the 1-process result (centroid bits, sampled rows): {'yes' if same else 'NO'}")
    if base:
        print(f"the baseline checkout's result: {'the same' if base.get('result') == one.get('result') else 'other bits'}"
              " (an earlier version may search other blocks of rows per faiss call: last-bit differences)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (20k x 64, 5k x 128, levels 50,5, 5 iters, dedup)")
    p.add_argument("--datasets", default=None, help="comma-separated NxD (default 1000000x384,200000x1024)")
    p.add_argument("--levels", default=None,
                   help="clusters per level, bottom first, for every dataset (default sqrt(N),sqrt(N)/10: 1000,100 for 1M)")
    p.add_argument("--iters", type=int, default=None, help="Lloyd iterations of every k-means run (default 10)")
    p.add_argument("--resampling-steps", type=int, default=1, help="R at every level (default 1)")
    p.add_argument("--target", type=float, default=0.5, help="balanced sample size, fraction of the pool")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=65536, help="rows per faiss assignment chunk")
    p.add_argument("--shard-rows", type=int, default=50_000)
    p.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=None,
                   help="run near-duplicate removal first (default: on with --quick, off otherwise)")
    p.add_argument("--dedup-index", default="auto", choices=("auto", "flat", "ivf"))
    p.add_argument("--dedup-nlist", type=int, default=None)
    p.add_argument("--dedup-nprobe", type=int, default=16)
    p.add_argument("--dedup-threshold", type=float, default=0.95)
    p.add_argument("--no-torch", action="store_true", help="skip the pure-torch reference")
    p.add_argument("--processes", type=int, default=2,
                   help="also run the pipeline's code on this many processes (torchrun, --threads split between them) "
                        "against 1; 0 or 1 skips it")
    p.add_argument("--baseline", default=None, metavar="CHECKOUT",
                   help="also run the 1-process faiss row with curation imported from another checkout (e.g. a "
                        "`git worktree` of an earlier commit): the same work, timed in the same run")
    p.add_argument("--dedup-shard-rows", type=int, default=None,
                   help="dedup.shard_rows for the processes row (default: a quarter of the pool, so 16 shard pairs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the shards go (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write all numbers to this file")
    p.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        role, spec_path, out_path = args._worker
        spec = json.loads(Path(spec_path).read_text())
        if role == "generate":
            result = generate(Path(spec["folder"]), spec["n"], spec["dim"], spec["shard_rows"], spec["seed"])
        elif role == "processes":
            result = worker_processes(spec)
            out_path = f"{out_path}.rank{result['rank']}"
        else:
            result = {"faiss": worker_faiss, "torch": worker_torch}[role](spec)
        Path(out_path).write_text(json.dumps(result))
        return 0

    datasets = args.datasets or ("20000x64,5000x128" if args.quick else "1000000x384,200000x1024")
    fixed_levels = args.levels or ("50,5" if args.quick else None)
    iters = args.iters or (5 if args.quick else 10)
    dedup = args.dedup if args.dedup is not None else args.quick
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        for text in datasets.split(","):
            n, dim = parse_dataset(text)
            folder = Path(work) / f"{n}x{dim}"
            levels = [int(k) for k in fixed_levels.split(",")] if fixed_levels else default_levels(n)
            cfg = {"n": n, "dim": dim, "levels": levels, "iters": iters, "resampling_steps": args.resampling_steps,
                   "target": args.target, "threads": args.threads, "chunk_size": args.chunk_size, "seed": args.seed,
                   "dedup": dedup, "dedup_index": args.dedup_index, "dedup_nlist": args.dedup_nlist,
                   "dedup_nprobe": args.dedup_nprobe, "dedup_threshold": args.dedup_threshold, "folder": str(folder),
                   "shard_rows": args.shard_rows}
            _log(f"[{n:,} x {dim}] generating {n * dim * 2 / MIB:,.0f} MiB of fp16 shards in {folder}")
            gen = run_worker("generate", cfg, args.threads)
            cfg["shards"] = gen["shards"]
            res = {"config": cfg, "generate": gen}
            _log(f"[{n:,} x {dim}] faiss + mmap (curation.kmeans) ...")
            t0 = time.time()
            res["faiss"] = run_worker("faiss", cfg, args.threads)
            _log(f"[{n:,} x {dim}] faiss done in {time.time() - t0:.0f} s")
            if args.baseline:
                _log(f"[{n:,} x {dim}] faiss + mmap from the baseline checkout {args.baseline} ...")
                res["baseline"] = run_worker("faiss", cfg, args.threads, checkout=Path(args.baseline).resolve())
                res["baseline_label"] = checkout_label(Path(args.baseline))
            if args.processes > 1:
                per_rank = max(1, args.threads // args.processes)
                _log(f"[{n:,} x {dim}] {args.processes} processes x {per_rank} thread(s) (torchrun) ...")
                cfg_p = {**cfg, "dedup_shard_rows": args.dedup_shard_rows or max(1, -(-n // 4))}
                res["processes"] = run_worker("processes", cfg_p, per_rank, processes=args.processes)
            if not args.no_torch:
                _log(f"[{n:,} x {dim}] torch reference (curation.kmeans_reference) ...")
                t0 = time.time()
                res["torch"] = run_worker("torch", cfg, args.threads)
                _log(f"[{n:,} x {dim}] torch done in {time.time() - t0:.0f} s")
            results.append(res)
            print_table(res)
            if "processes" in res or "baseline" in res:
                print_processes_table(res)
            sys.stdout.flush()
            for path in folder.iterdir():  # free the disk before the next dataset
                path.unlink()
            folder.rmdir()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
