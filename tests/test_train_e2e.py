"""The real CLI, end to end on CPU, on a tiny procedural world (recipes/debug.yaml)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinotxt

ROOT = Path(__file__).parents[1]


def cli(*args, cwd):
    """The real entry point, in its own process (``python -m dinotxt.cli``)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "dinotxt.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def in_process(capsys, monkeypatch, cwd, *args):
    """``dinotxt ARGS`` in this process (the CLI's own error handling): (exit code, stdout, stderr)."""
    from dinotxt.cli import main

    monkeypatch.chdir(cwd)
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def debug_run(trained_debug_run):
    return trained_debug_run


def test_train_writes_a_complete_run_folder(debug_run):
    work, _, first = debug_run
    run = work / "runs" / "debug"
    for name in ["config.yaml", "tokenizer.model", "metrics.json", "loss_curve.png", "checkpoints/last.ckpt",
                 "checkpoint/model.safetensors", "checkpoint/config.yaml", "checkpoint/tokenizer.model"]:
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 12 and 0 <= metrics["zeroshot"]["top1"] <= 1
    assert list((run / "logs" / "tensorboard").rglob("events.out.tfevents*"))
    # checkpoints hold only trainable weights
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("model.backbone.") for k in ckpt["state_dict"])
    assert "positions" in str(ckpt.get("ImageTextDataModule", ckpt.keys()))
    from safetensors.torch import load_file

    assert not any(k.startswith("backbone.") for k in load_file(str(run / "checkpoint" / "model.safetensors")))


def test_checkpoint_loads_and_classifies(debug_run):
    # (that training leaves the live frozen weights untouched is checked in one process, before and
    # after a real fit, in tests/test_batchnorm_encoder.py)
    work, _, _ = debug_run
    model, transform, tokenizer = dinotxt.load(work / "runs" / "debug" / "checkpoint")
    names = ["red circle", "blue square", "green star"]
    clf = dinotxt.zero_shot_classifier(model, tokenizer, names, ["a photo of a {}."])
    from PIL import Image

    img = transform(Image.new("RGB", (64, 64), (200, 20, 20)))[None]
    probs = (100 * model.encode_image(img, normalize=True) @ clf.t()).softmax(-1)
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(), torch.tensor(1.0))


@pytest.mark.slow
def test_resume_continues_the_run(debug_run):
    work, recipe, _ = debug_run
    again = cli("train", recipe, cwd=work)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = cli("train", recipe, "--resume", "optim.max_steps=16", cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stdout + resumed.stderr
    metrics = json.loads((work / "runs" / "debug" / "metrics.json").read_text())
    assert metrics["steps"] == 16


def test_eval_zeroshot_cli(debug_run, capsys, monkeypatch):
    work, _, _ = debug_run
    rc, out, err = in_process(capsys, monkeypatch, work, "eval", "zeroshot", "--checkpoint", "runs/debug/checkpoint",
                              "--data", "runs/debug_world/eval/classes", "--templates", "simple", "--json")
    assert rc == 0, err[-2000:]
    assert "top-1" in out and "chance" in out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["num_classes"] == 24 and res["num_images"] == 48


@pytest.mark.parametrize("args, message", [
    (["train", "RECIPE", "optim.lrr=1"], "did you mean 'optim.lr'"),
    (["train", "RECIPE", "data.train=/nonexistent/{000..003}.tar", "data.world.generate=false", "name=x"], "shard not found"),
    (["train", "RECIPE", "model.vision_head.pooling=median"], "is not one of mean, max, gem"),
    (["eval", "zeroshot", "--checkpoint", "/nonexistent", "--data", "."], "not a dinotxt checkpoint"),
])
def test_user_errors_are_one_line(debug_run, args, message, capsys, monkeypatch):
    work, recipe, _ = debug_run
    rc, _, err = in_process(capsys, monkeypatch, work, *[recipe if a == "RECIPE" else a for a in args])
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("dinotxt: error: "), err


def test_tokenizer_train_cli(debug_run, tmp_path, capsys, monkeypatch):
    work, _, _ = debug_run
    rc, out, err = in_process(capsys, monkeypatch, work, "tokenizer", "train", "--data", "runs/debug_world/train",
                              "--out", tmp_path / "t.model", "--vocab-size", "128", "--context-length", "20")
    assert rc == 0, err[-2000:]
    tok = dinotxt.Tokenizer(tmp_path / "t.model", context_length=20)
    ids = tok(["a red circle"])
    assert ids.shape == (1, 20) and ids.argmax(-1).item() == (ids[0] != 0).sum().item() - 1


@pytest.mark.slow
def test_train_with_the_clip_bpe_tokenizer(tmp_path, monkeypatch):
    """tokenizer.kind=clip: the official trainer's tokenizer; its ids are open_clip's (the official ones)."""
    import open_clip

    from dinotxt.text.clip_bpe import ClipTokenizer
    from dinotxt.train.run import run_training

    monkeypatch.chdir(tmp_path)
    metrics = run_training("debug", ["tokenizer.kind=clip", "optim.max_steps=3", "trainer.val_every_n_steps=0",
                                     "trainer.checkpoint_every_n_steps=0", "data.num_workers=0",
                                     "eval.zeroshot_dir=null"])
    assert metrics["steps"] == 3
    model, _, tok = dinotxt.load(tmp_path / "runs" / "debug" / "checkpoint")
    assert isinstance(tok, ClipTokenizer) and model.config.text.vocab_size == 49408
    texts = ["a red circle on a striped background", "Two BLUE stars!"]
    assert torch.equal(tok(texts), open_clip.tokenize(texts, context_length=24))
