"""What the curation tests (tests/test_curation_*.py) share: the debug recipe and its stages, running the
pipeline and the ``dinotxt curate`` command in-process, comparing runs, reading their outputs; the module
fixtures each of those files imports (one OpenMP thread; ``world`` and ``reference``, the session's pool
and reference run from conftest.py under the names the tests use)."""
import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from curation.kmeans import KMeansLevel
from curation.store import load_table, read_parts

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "curation" / "debug.yaml")
POOL_SIZE = 240
STAGES = ["embed", "embed_text", "dedup", "cluster_level1", "cluster_level2", "image_balance", "text_balance",
          "combine", "report"]
QUIET = lambda msg: None  # noqa: E731
FAST = ["combine.write_shards=false", "report.plots=false"]  # for reruns that test an earlier stage


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


def _pool_table(run: Path):
    metas = sorted((run / "embed" / "meta").glob("*.parquet"))
    tables = [load_table(p) for p in metas]
    return {k: (np.concatenate([t[k] for t in tables]) if k in ("uid", "unit") else sum((t[k] for t in tables), []))
            for k in tables[0]}


@contextlib.contextmanager
def single_thread():
    """One OpenMP thread: the inputs are tiny, and faiss's parallel regions spin for milliseconds per search
    on a busy 2-core machine (torch shares the OpenMP runtime and resets its thread count, so both are set).
    No result depends on it: the tests compare outputs across processes."""
    import faiss

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


# ---- module fixtures: a test file imports them (``from curation_helpers import _one_thread, reference, world``)
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One OpenMP thread in the importing module (single_thread)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def world(curation_pool):
    """A tiny pool: 240 demo-world pairs (48 px) in 4 webdataset shards (conftest.py, written once per session)."""
    return curation_pool


@pytest.fixture(scope="module")
def reference(curation_reference):
    """One uninterrupted run of the debug recipe (shards written), once per session; never modified by the tests."""
    return curation_reference
