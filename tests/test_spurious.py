"""The spurious-correlation split of the world (dinotxt/data/world.py) and worst-group zero-shot accuracy."""
import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_overrides
from dinotxt.data.world import ATTRIBUTES, TINTS, spurious_plan, write_spurious_world
from dinotxt.data.world import SHAPES, render_sample

RECIPE = str(Path(__file__).parents[1] / "recipes" / "debug.yaml")


@pytest.mark.parametrize("attribute", ["texture", "tint"])
def test_the_plan_ties_the_attribute_to_the_class_at_the_exact_rate(attribute):
    plan = spurious_plan(400, seed=3, attribute=attribute, rate=0.95)
    values = ATTRIBUTES[attribute]
    assert Counter(p["class"] for p in plan) == {s: 100 for s in SHAPES}
    for c, shape in enumerate(SHAPES):
        mine = [p for p in plan if p["class"] == shape]
        own = [p for p in mine if p["group"] == f"{shape}|{values[c]}"]
        assert len(own) == 95 and all(p["own"] for p in own)
        # the rest spread over the other three values in turn
        assert sorted(Counter(p["group"] for p in mine if not p["own"]).values()) == [1, 2, 2]
    anti = spurious_plan(400, seed=3, attribute=attribute, rate=0.05)
    assert sum(p["own"] for p in anti) == 4 * 5
    assert spurious_plan(400, seed=3, attribute=attribute) == spurious_plan(400, seed=3, attribute=attribute)
    with pytest.raises(ValueError, match="must lie in"):
        spurious_plan(10, 0, attribute, rate=1.5)


def test_forcing_shape_background_and_tint():
    free = render_sample(5, 64, 1)
    # forcing what the seed gives anyway changes nothing: every draw still happens
    same = render_sample(5, 64, 1, shape=free.objects[0]["shape"])
    assert np.array_equal(np.asarray(same.image), np.asarray(free.image)) and same.caption == free.caption
    other = next(s for s in SHAPES if s != free.objects[0]["shape"])
    assert render_sample(5, 64, 1, shape=other).objects[0]["shape"] == other
    mentions = [render_sample(i, 64, 1, background="dotted").caption for i in range(60)]
    assert any("dotted" in c for c in mentions)
    assert not any(k in c for c in mentions for k in ("striped", "checkered", "noisy", "gradient", "plain"))
    # a tint shifts the background's mean colour in its direction
    for name, tint in TINTS.items():
        tinted = render_sample(5, 64, 1, tint=tint)
        bg = free.labels == 0
        shift = np.asarray(tinted.image, float)[bg].mean(0) - np.asarray(free.image, float)[bg].mean(0)
        assert np.all(np.sign(shift) == np.sign(tint)), (name, shift)


def test_the_world_writes_train_shards_and_a_grouped_test_folder(tmp_path):
    import tarfile

    out = write_spurious_world(str(tmp_path), num_train=40, num_eval=40, size=32, samples_per_shard=16, rate=0.9)
    assert len(out["train"]) == 3 and len(out["eval"]) == 3
    folder = tmp_path / "eval" / "classes"
    assert sorted(d.name for d in folder.iterdir() if d.is_dir()) == sorted(SHAPES)
    with open(folder / "groups.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and sum(1 for _ in folder.rglob("*.jpg")) == 40
    for r in rows:
        assert (folder / r["path"]).is_file() and r["path"].split("/")[0] == r["label"] == r["group"].split("|")[0]
    own = {f"{s}|{t}" for s, t in zip(SHAPES, ATTRIBUTES["texture"])}
    assert sum(r["group"] in own for r in rows) == 4  # test_rate = 1 - 0.9: one of the ten per class
    with tarfile.open(out["train"][0]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert all(m["group"].split("|")[0] == m["objects"][0]["shape"] for m in metas)


def test_group_metrics_are_per_group_top1_their_minimum_and_mean():
    from dinotxt.evaluation.zeroshot import group_metrics

    logits = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]])
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    groups = ["a", "a", "a", "b", "b", "c"]
    res = group_metrics(logits, targets, groups)
    assert [(g["group"], g["images"], g["top1"]) for g in res["groups"]] == [("a", 3, 2 / 3), ("b", 2, 0.5), ("c", 1, 1.0)]
    assert res["worst_group"] == "b" and res["worst_group_top1"] == 0.5
    assert res["group_mean_top1"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)


@pytest.fixture(scope="module")
def spurious_run(tmp_path_factory):
    from dinotxt.train.run import run_training

    work = tmp_path_factory.mktemp("spurious")
    overrides = tiny_run_overrides(work, "data.world.spurious.enabled=true", "trainer.val_every_n_steps=0",
                                   num_eval=32)
    run_training(RECIPE, overrides)
    return work


@pytest.mark.slow
def test_eval_zeroshot_reports_worst_group_accuracy_on_a_spurious_split(spurious_run, capsys):
    import dinotxt
    from dinotxt.cli import main
    from dinotxt.data.folder import ImageFolderDataset
    from dinotxt.inference.classifier import load_templates, zero_shot_classifier

    folder = spurious_run / "world" / "eval" / "classes"
    ckpt = spurious_run / "debug" / "checkpoint"
    assert main(["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(folder), "--templates", "simple",
                 "--num-workers", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert "worst-group top-1" in out and "average top-1" in out
    res = json.loads(out.strip().splitlines()[-1])
    # the same numbers, straight from the model's predictions and the groups.csv
    model, transform, tokenizer = dinotxt.load(str(ckpt))
    data = ImageFolderDataset(str(folder), transform)
    classifier = zero_shot_classifier(model, tokenizer, data.classes, load_templates("simple"))
    with torch.no_grad():
        images = torch.stack([data[i][0] for i in range(len(data))])
        pred = (model.encode_image(images, normalize=True) @ classifier.t()).argmax(1).tolist()
    with open(folder / "groups.csv", newline="") as f:
        group_of = {(folder / r["path"]).resolve(): r["group"] for r in csv.DictReader(f)}
    hits = {}
    for (path, label), p in zip(data.samples, pred):
        hits.setdefault(group_of[Path(path).resolve()], []).append(p == label)
    expected = {g: sum(h) / len(h) for g, h in hits.items()}
    assert {g["group"]: g["top1"] for g in res["groups"]} == pytest.approx(expected, abs=1e-12)
    assert res["worst_group_top1"] == min(expected.values())
    assert res["group_mean_top1"] == pytest.approx(sum(expected.values()) / len(expected))
    assert sum(g["images"] for g in res["groups"]) == res["num_images"] == 32
    assert res["top1"] == pytest.approx(sum(sum(h) for h in hits.values()) / 32)


@pytest.mark.slow
def test_a_groups_file_that_does_not_fit_the_folder_is_one_line(spurious_run, tmp_path, capsys):
    from dinotxt.cli import main

    folder = spurious_run / "world" / "eval" / "classes"
    lines = (folder / "groups.csv").read_text().splitlines()
    base = ["eval", "zeroshot", "--checkpoint", str(spurious_run / "debug" / "checkpoint"), "--data", str(folder),
            "--templates", "simple", "--num-workers", "0", "--groups"]
    path, label, group = lines[1].split(",")
    wrong = next(s for s in SHAPES if s != label)
    cases = {"gives no group for": lines[:-1],
             "not in": lines + ["circle/nope.jpg,circle,x"],
             "lies in the class folder": [lines[0], f"{path},{wrong},{group}"] + lines[2:],
             "needs the columns": ["path,group"]}
    for message, content in cases.items():
        bad = tmp_path / f"{len(message)}.csv"
        bad.write_text("\n".join(content) + "\n")
        assert main(base + [str(bad)]) == 2, message
        assert message in capsys.readouterr().err, message


def test_the_suite_table_shows_the_worst_group():
    from types import SimpleNamespace

    from dinotxt.evaluation.suite import _rows

    res = {"top1": 0.5, "top5": 1.0, "mean_per_class_recall": 0.5, "chance_top1": 0.25}
    assert len(_rows(SimpleNamespace(task="zeroshot"), res)) == 3
    res.update(worst_group_top1=0.1, worst_group="circle|dotted")
    assert ("worst-group top-1 (circle|dotted)", 0.1, 0.25) in _rows(SimpleNamespace(task="zeroshot"), res)
