import os
import tempfile
from pathlib import Path

import pytest
import torch

from dinotxt.utils.log import setup_console

# the progress messages the command line shows (tests read them from stdout, in process too)
setup_console()

# DINOTXT_TEST_THREADS=1 runs the suite single-threaded: reductions split differently over threads,
# so a tolerance must hold for both
torch.set_num_threads(int(os.environ.get("DINOTXT_TEST_THREADS", min(2, os.cpu_count() or 1))))

# reduced sizes so every registered architecture builds in well under a second
TINY_BACKBONE = {"img_size": 56, "kwargs": {"depth": 1, "embed_dim": 96, "num_heads": 2}}


def tiny_backbone(arch: str, img_size: int = 56) -> dict:
    """Reduced backbone overrides for a registered architecture: a cut-down ViT, or a CNN token source
    (``cnn:...``, already small) at a small image size without its pretrained weights."""
    import dinotxt

    if dinotxt.model_config(arch).backbone.name.startswith("cnn:"):
        return {"img_size": 64, "weights": None}
    return dict(TINY_BACKBONE, img_size=img_size)


TINY_TEXT = {"width": 64, "depth": 2, "heads": 2, "vocab_size": 100, "context_length": 16}
TINY_HEAD = {"num_blocks": 2, "drop_path": 0.0}
# the tiny dino.txt model: dinotxt.create_model("dinotxt_demo", **TINY_MODEL)
TINY_MODEL = dict(backbone=TINY_BACKBONE, text=TINY_TEXT, vision_head=TINY_HEAD)


def tiny_batch(n: int = 8, seed: int = 1, dtype: torch.dtype = torch.float64):
    """A batch for the tiny model from one seeded generator: ``n`` random 56-px images, then ``n`` captions of
    10 token ids (1..98, the end-of-text id 99, the largest, at position 6; the padding after it is trimmed):
    (images, ids)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 56, 56, generator=g, dtype=dtype)
    ids = torch.randint(1, 99, (n, 10), generator=g)
    ids[:, 6], ids[:, 7:] = 99, 0
    return images, ids


class Batches(torch.utils.data.IterableDataset):
    """Ready training batches, in order, as a dataset (``DataLoader(Batches(batches), batch_size=None)``):
    feeds a Lightning fit exactly the batches a test built."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def tiny_run_overrides(work, *extra: str, num_train: int = 64, num_eval: int = 24, steps: int = 4):
    """Overrides of the debug recipe for a run of a few steps in ``work`` on its own small world (one block
    of 96 wide, 32 samples per shard, no loader workers), in-process; ``extra`` adds or replaces settings."""
    return [f"output_dir={work}", f"data.world.root={Path(work) / 'world'}", f"data.world.num_train={num_train}",
            f"data.world.num_eval={num_eval}", "data.world.samples_per_shard=32", "data.num_workers=0",
            "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}", f"optim.max_steps={steps}",
            "optim.warmup_steps=1", "tokenizer.vocab_size=128", *extra]


@pytest.fixture
def tiny_model():
    import dinotxt

    torch.manual_seed(0)
    return dinotxt.create_model("dinotxt_demo", **TINY_MODEL)


@pytest.fixture(scope="session")
def trained_debug_run(tmp_path_factory):
    """One tiny run of the real command line (``dinotxt train debug``, 12 steps, checkpoints at 6 and 12)
    in its own process, shared by the tests that need a trained run folder: (folder, recipe, result)."""
    import subprocess
    import sys
    from pathlib import Path

    work = tmp_path_factory.mktemp("e2e")
    recipe = str(Path(__file__).parents[1] / "recipes" / "debug.yaml")
    first = subprocess.run([sys.executable, "-m", "dinotxt.cli", "train", recipe, "optim.max_steps=12",
                            "trainer.checkpoint_every_n_steps=6"], cwd=work, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert first.returncode == 0, first.stderr[-3000:]
    return work, recipe, first


@pytest.fixture(scope="session")
def curation_pool(tmp_path_factory):
    """A tiny curation pool, written once per session: 240 demo-world pairs (48 px) in 4 webdataset shards
    (64, 64, 64, 48), the ``train`` folder; read-only (tests/test_curation_*.py call it ``world``)."""
    from curation_helpers import POOL_SIZE

    from dinotxt.data.world import write_split

    root = tmp_path_factory.mktemp("pool") / "train"
    shards = write_split(root, POOL_SIZE, seed=0, size=48, samples_per_shard=64)
    assert len(shards) == 4
    return root


@pytest.fixture(scope="session")
def curation_reference(curation_pool, tmp_path_factory):
    """One uninterrupted run of the curation debug recipe on the pool (shards written), in-process on one
    OpenMP thread, once per session: (output_dir, report); never modified by the tests."""
    from curation_helpers import _curate, single_thread

    out = tmp_path_factory.mktemp("reference")
    with single_thread():
        report = _curate(out, world=curation_pool)
    return out, report


# ---- temporary files: everything the suite and the processes it starts write to "the temporary folder" goes
# under pytest's own (basetemp/tmp), which pytest rotates. Without this, the system's folder kept, per test process
# killed on purpose (SIGKILL, SIGTERM to a rank), a wandb-media and a wandb-artifacts folder (importing timm imports
# wandb, which makes both and removes them at a normal exit only) and multiprocessing's pymp-*; and, from any
# run, torch's torchinductor_<user> cache (tests/test_loggers.py checks).
_SYSTEM_TEMP = {}


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has set up its factory
def pytest_configure(config):
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:  # -p no:tmpdir
        return
    folder = factory.getbasetemp() / "tmp"  # the basetemp itself is made under the system's folder
    folder.mkdir(exist_ok=True)
    _SYSTEM_TEMP.update(tempdir=tempfile.tempdir, TMPDIR=os.environ.get("TMPDIR"))
    os.environ["TMPDIR"] = str(folder)  # the processes the tests start
    tempfile.tempdir = str(folder)  # this one (tempfile reads TMPDIR once)


def pytest_unconfigure(config):
    if not _SYSTEM_TEMP:
        return
    tempfile.tempdir = _SYSTEM_TEMP["tempdir"]
    if _SYSTEM_TEMP["TMPDIR"] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = _SYSTEM_TEMP["TMPDIR"]
    _SYSTEM_TEMP.clear()
