"""Segmentation metrics against a plain reference, and the evaluation loop on demo shards."""
import json

import numpy as np
import pytest

from dinotxt.data.world import write_split
from dinotxt.evaluation.datasets import segmentation_dataset
from dinotxt.inference.settings import DenseSettings
from dinotxt.evaluation.segmentation import (confusion_matrix, constant_prediction_miou, evaluate_segmentation,
                                             segmentation_metrics)


def reference_miou(preds, targets, num_classes, ignore=255):
    """IoU per class from boolean masks over all images, mean over classes whose union is non-empty."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, t in zip(preds, targets):
            valid = t != ignore
            inter += np.sum((p == c) & (t == c) & valid)
            union += np.sum(((p == c) | (t == c)) & valid)
        if union > 0:
            ious.append(inter / union)
    return float(np.mean(ious))


def test_miou_matches_the_reference_on_random_maps_with_ignored_pixels():
    rng = np.random.default_rng(0)
    k = 7
    preds, targets = [], []
    conf = np.zeros((k, k), dtype=np.int64)
    for _ in range(5):
        t = rng.integers(0, k - 1, (31, 45))  # class k-1 never in the labels, sometimes predicted
        t[rng.random(t.shape) < 0.2] = 255
        p = np.where(rng.random(t.shape) < 0.5, np.where(t == 255, 0, t), rng.integers(0, k, t.shape))
        preds.append(p), targets.append(t)
        conf += confusion_matrix(p, t, k)
    m = segmentation_metrics(conf, [str(i) for i in range(k)])
    assert m["miou"] == pytest.approx(reference_miou(preds, targets, k), abs=1e-12)
    valid = np.concatenate([t.ravel() for t in targets]) != 255
    hits = np.concatenate([(p == t).ravel() for p, t in zip(preds, targets)])
    assert m["aacc"] == pytest.approx(hits[valid].mean())
    assert conf.sum() == valid.sum()
    assert m["per_class"][k - 1]["iou"] == 0.0  # predicted but absent: counts as 0, as in mmsegmentation


def test_classes_absent_everywhere_do_not_count_and_constant_baseline():
    conf = confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 255]), 4)
    m = segmentation_metrics(conf)
    assert m["miou"] == pytest.approx((0.5 + 0.5) / 2)  # classes 2 and 3 have an empty union
    assert m["per_class"][2]["iou"] is None
    t = np.array([0, 0, 0, 1, 2, 255])
    c = confusion_matrix(t, t, 3)
    assert constant_prediction_miou(c, 0) == pytest.approx(
        segmentation_metrics(confusion_matrix(np.zeros(6, int), t, 3))["miou"])
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0]), np.array([9]), 3)


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "eval"
    write_split(root, 6, seed=5, size=64, samples_per_shard=4, max_objects=1)
    return root


def test_evaluate_on_demo_shards_writes_a_report(tiny_model, demo_shards, tmp_path):
    from test_segmentation import fake_tokenizer

    data = segmentation_dataset("demo", demo_shards)
    assert len(data) == 6 and len(data.class_names) == 24
    whole = DenseSettings(templates="simple", mode="whole", short_side=None)
    res = evaluate_segmentation(tiny_model.eval(), fake_tokenizer, data, whole, out_dir=tmp_path / "report",
                                num_examples=2, progress=False)
    conf = np.array(res["confusion"])
    object_pixels = sum(int((data[i].labels != 255).sum()) for i in range(6))
    assert conf.sum() == object_pixels and conf.shape == (24, 24)
    assert res["miou"] == pytest.approx(segmentation_metrics(conf)["miou"])
    for name in ["metrics.json", "per_class_iou.md", "confusion.png"]:
        assert (tmp_path / "report" / name).is_file()
    assert len(list((tmp_path / "report" / "examples").glob("*.png"))) == 2
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["num_images"] == 6
    assert "| **mean** |" in (tmp_path / "report" / "per_class_iou.md").read_text()

    with_bg = segmentation_dataset("demo_bg", demo_shards)
    res_bg = evaluate_segmentation(tiny_model, fake_tokenizer, with_bg, whole.but(background_threshold=2.0),
                                   progress=False)  # nothing reaches 2: all background
    assert res_bg["miou"] == pytest.approx(res_bg["baseline_all_background_miou"])
    with pytest.raises(ValueError, match="background"):
        evaluate_segmentation(tiny_model, fake_tokenizer, data, whole.but(background_threshold=0.5))
