"""The evaluation commands end to end on a tiny checkpoint and a tiny demo world:
``dinotxt segment``, ``dinotxt eval segmentation|retrieval|zeroshot|suite``, the suite on an
open_clip model, and the CLIP_benchmark loader."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, TINY_TEXT
from PIL import Image

import dinotxt
from dinotxt.cli import main
from dinotxt.data.world import render_sample, write_split


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny checkpoint (random weights, tokenizer trained on world captions) and a 12-image eval world."""
    root = tmp_path_factory.mktemp("evalcli")
    world = root / "world" / "eval"
    write_split(world, 12, seed=3, size=64, samples_per_shard=6, max_objects=1, image_folder=True)
    captions = [render_sample(i, 64).caption for i in range(200)]
    tokenizer = dinotxt.train_tokenizer(captions, vocab_size=64, context_length=TINY_TEXT["context_length"])
    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                                 vision_head={"num_blocks": 1, "drop_path": 0.0})
    dinotxt.save_checkpoint(root / "checkpoint", model, tokenizer)
    Image.fromarray(np.asarray(render_sample(11, 96).image)).save(root / "photo.png")
    return root


@pytest.mark.slow
def test_segment_command_writes_overlay_and_heatmaps(setup):
    out = setup / "seg" / "overlay.png"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "dinotxt.cli", "segment", str(setup / "photo.png"), "--checkpoint",
                          str(setup / "checkpoint"), "--labels", "red circle, blue star,background", "--out", str(out),
                          "--templates", "simple", "--save-labels", str(setup / "seg" / "labels.png")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    overlay = Image.open(out)
    assert overlay.width > overlay.height >= 96  # image (enlarged) + legend panel
    assert Image.open(setup / "seg" / "overlay_heatmaps.png").width > 0
    labels = np.asarray(Image.open(setup / "seg" / "labels.png"))
    assert labels.shape == (96, 96) and labels.max() < 3
    assert "wrote" in run.stdout and "area" in run.stdout


@pytest.mark.parametrize("args,message", [
    (["--labels", " , "], "empty label list"),
    (["--labels", "cat,,dog"], "empty name"),
])
def test_segment_errors_are_one_line(setup, capsys, args, message):
    code = main(["segment", str(setup / "photo.png"), "--checkpoint", str(setup / "checkpoint"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_eval_segmentation_and_retrieval_commands(setup, capsys):
    report = setup / "report"
    code = main(["eval", "segmentation", "--checkpoint", str(setup / "checkpoint"), "--dataset", "demo", "--root",
                 str(setup / "world" / "eval"), "--templates", "simple", "--mode", "whole", "--short-side", "0",
                 "--out", str(report), "--num-examples", "1", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and "majority-class mIoU" in out
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["num_images"] == 12 and 0 <= metrics["miou"] <= 1
    assert (report / "confusion.png").is_file() and (report / "per_class_iou.md").is_file()

    code = main(["eval", "retrieval", "--checkpoint", str(setup / "checkpoint"), "--dataset", "shards", "--root",
                 str(setup / "world" / "eval"), "--num-workers", "0", "--json"])
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["num_images"] == 12 and res["num_texts"] == 12 and "t->i R@1" in out

    missing = main(["eval", "segmentation", "--checkpoint", str(setup / "checkpoint"), "--dataset", "ade20k",
                    "--root", str(setup / "no_such_folder")])
    err = capsys.readouterr().err.strip()
    assert missing == 2 and "dataset folder not found" in err and len(err.splitlines()) == 1


def write_suite(path, body):
    path.write_text(body)
    return str(path)


def test_suite_on_a_checkpoint(setup, capsys):
    world = setup / "world" / "eval"
    recipe = write_suite(setup / "suite.yaml", f"""
name: tiny
output_dir: {setup / "eval_runs"}
model:
  checkpoint: {setup / "checkpoint"}
tasks:
  - {{task: zeroshot, dataset: folder, root: {world / "classes"}, templates: simple, batch_size: 8}}
  - {{task: segmentation, dataset: demo, root: {world}, templates: simple, mode: whole, short_side: 0, num_examples: 1}}
  - {{task: retrieval, dataset: shards, root: {world}}}
""")
    assert main(["eval", "suite", recipe]) == 0
    out_dir = setup / "eval_runs" / "tiny"
    results = json.loads((out_dir / "results.json").read_text())
    assert [t["task"] for t in results["tasks"]] == ["zeroshot", "segmentation", "retrieval"]
    table = (out_dir / "results.md").read_text()
    for row in ("| zeroshot/folder |", "| mIoU |", "| txt->img R@1 |", "| img->txt R@10 |", "| top-1 |"):
        assert row in table, row
    assert (out_dir / "segmentation_demo" / "confusion.png").is_file()
    assert "results.md" in capsys.readouterr().out

    # a typo in a task key, and a missing dataset, fail before the model loads
    bad = write_suite(setup / "bad.yaml", f"model: {{checkpoint: {setup / 'checkpoint'}}}\n"
                                          f"tasks:\n  - {{task: zeroshot, dataset: folder, rot: {world}}}\n")
    assert main(["eval", "suite", bad]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'rot'" in err and "did you mean 'root'" in err
    gone = write_suite(setup / "gone.yaml", f"model: {{checkpoint: {setup / 'checkpoint'}}}\n"
                                           f"tasks:\n  - {{task: retrieval, dataset: coco, root: {setup / 'nowhere'}}}\n")
    assert main(["eval", "suite", gone]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_suite_on_an_open_clip_model(setup):
    from dinotxt.evaluation.suite import run_suite

    config = setup / "tiny-open-clip.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    world = setup / "world" / "eval"
    recipe = write_suite(setup / "oc.yaml", f"""
name: open_clip_tiny
output_dir: {setup / "eval_runs"}
model: {{open_clip: {config}}}
tasks:
  - {{task: zeroshot, dataset: folder, root: {world / "classes"}, templates: simple}}
  - {{task: retrieval, dataset: shards, root: {world}}}
""")
    res = run_suite(recipe)
    assert "open_clip tiny-open-clip (random init)" == res["model"]
    assert res["tasks"][0]["metrics"]["num_images"] == 12 and 0 <= res["tasks"][1]["metrics"]["text_to_image_R@1"] <= 1
    assert (Path(res["output_dir"]) / "results.md").is_file()
    seg = write_suite(setup / "oc_seg.yaml", f"model: {{open_clip: {config}}}\n"
                                            f"tasks:\n  - {{task: segmentation, dataset: demo, root: {world}}}\n")
    with pytest.raises(ValueError, match="encode_patches"):
        run_suite(seg)


def test_clip_benchmark_loader(setup):
    from dinotxt.evaluation.clip_benchmark import load_dinotxt, register

    model, transform, tokenizer = load_dinotxt("dinotxt", pretrained=str(setup / "checkpoint"), cache_dir=None, device="cpu")
    image = transform(Image.open(setup / "photo.png"))[None]
    img, txt = model.encode_image(image), model.encode_text(tokenizer(["a red circle", "a blue star"]))
    assert img.shape == (1, model.embed_dim) and txt.shape == (2, model.embed_dim)
    with pytest.raises(ValueError, match="pretrained"):
        load_dinotxt("dinotxt", pretrained=None)
    try:
        import clip_benchmark  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="clip-benchmark"):
            register()
    else:
        register()
        from clip_benchmark.models import load_clip

        assert load_clip("dinotxt", "dinotxt", str(setup / "checkpoint"), None, "cpu")[0].embed_dim == model.embed_dim
