"""Perceptual grouping (dinotxt/inference/grouping.py) and its evaluation as unsupervised segmentation."""
import itertools
import json

import numpy as np
import pytest
import torch

from dinotxt.evaluation.grouping import (hungarian_match, matched_confusion, matched_metrics, random_cells,
                                         random_voronoi, segment_class_iou)
from dinotxt.inference.grouping import cluster_patches, kmeans, silhouette, upsample_segments


def brute_force_best(iou: np.ndarray) -> float:
    """The largest summed IoU of any one-to-one matching of segments (rows) to classes (columns)."""
    k, c = iou.shape
    best = 0.0
    for size in range(1, min(k, c) + 1):
        for rows in itertools.combinations(range(k), size):
            for cols in itertools.permutations(range(c), size):
                best = max(best, sum(iou[r, col] for r, col in zip(rows, cols)))
    return best


@pytest.mark.parametrize("k,c", [(2, 2), (3, 2), (2, 4), (4, 4), (5, 3)])
def test_hungarian_matching_equals_brute_force(k, c):
    rng = np.random.default_rng(k * 10 + c)
    for _ in range(20):
        segs = rng.integers(0, k, size=(12, 12))
        labels = rng.integers(0, c, size=(12, 12))
        labels[rng.random((12, 12)) < 0.1] = 255
        iou = segment_class_iou(segs, labels, k, c)
        match = hungarian_match(iou)
        assert len(match) == min(k, c) and len(set(match.values())) == len(match)
        assert sum(iou[s, cl] for s, cl in match.items()) == pytest.approx(brute_force_best(iou), abs=1e-12)


def test_segment_class_iou_by_hand():
    segs = np.array([[0, 0, 1, 1]])
    labels = np.array([[0, 1, 1, 255]])  # the ignored pixel counts for nothing
    iou = segment_class_iou(segs, labels, 2, 2)
    assert iou.tolist() == [[1 / 2, 1 / 3], [0.0, 1 / 2]]


def test_a_perfect_partition_scores_one_and_unmatched_segments_count_against_the_truth():
    labels = np.array([[0, 0, 1, 1], [0, 0, 2, 2]])
    perm = np.array([2, 0, 1])[labels]  # the same regions, other ids
    assert matched_metrics(matched_confusion(perm, labels, 3, 3))["miou"] == 1.0
    # one segment splits class 0 in two: the unmatched half is missed, class 0's IoU is 1/2
    split = perm.copy()
    split[1, 0:2] = 3
    conf = matched_confusion(split, labels, 4, 3)
    assert conf[0, 3] == 2 and matched_metrics(conf)["miou"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_kmeans_and_both_choices_of_k_find_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(6)[:3] * 4
    x = torch.cat([c + 0.05 * torch.randn(30, 6, generator=g) for c in centres])
    truth = torch.arange(3).repeat_interleave(30)
    labels, _ = kmeans(x, 3, seed=1)
    assert len({(int(a), int(b)) for a, b in zip(labels, truth)}) == 3  # the partition is the truth up to ids
    assert torch.equal(kmeans(x, 3, seed=1)[0], labels)  # a pure function of the seed
    for method in ("kmeans", "spectral"):
        auto, k = cluster_patches(x, "auto", method, seed=0, max_segments=6)
        assert k == 3, method
        assert len({(int(a), int(b)) for a, b in zip(auto, truth)}) == 3, method


def test_silhouette_equals_its_definition():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0] * 6 + [1] * 8 + [2])  # with a singleton
    u = torch.nn.functional.normalize(x, dim=-1)
    d = 1 - u @ u.t()
    s = []
    for i in range(15):
        own = [j for j in range(15) if labels[j] == labels[i] and j != i]
        if not own:
            s.append(0.0)
            continue
        a = float(d[i, own].mean())
        b = min(float(d[i, [j for j in range(15) if labels[j] == c]].mean()) for c in {0, 1, 2} - {int(labels[i])})
        s.append((b - a) / max(a, b))
    assert silhouette(x, labels) == pytest.approx(sum(s) / 15, abs=1e-12)


def test_random_partitions_and_upsampling():
    rng = np.random.default_rng(0)
    v = random_voronoi(6, 6, 4, rng)
    assert sorted(v.unique().tolist()) == [0, 1, 2, 3]
    assert random_cells(6, 6, 3, rng).max() < 3
    grid = torch.tensor([[0, 1], [1, 1]])
    up = upsample_segments(grid, 2, (8, 8))
    assert up.shape == (8, 8) and int(up[0, 0]) == 0 and int(up[7, 7]) == 1 and int(up[0, 7]) == 1


def test_grouping_of_a_trained_model_beats_random_partitions_on_the_demo_label_maps(trained_debug_run):
    """The demo world's backgrounds vs objects (demo_bg: background + the 24 object classes), 2 segments per image:
    the trained tiny model's patch features group far better than a random partition of the same patch grid
    into the same 2 segments, spatially coherent (Voronoi) or not (seeds 0-4 measured: 0.33-0.34 against at most
    0.143; one seed here, for time)."""
    import dinotxt
    from dinotxt.evaluation.datasets import segmentation_dataset
    from dinotxt.evaluation.grouping import evaluate_grouping

    work, _, _ = trained_debug_run
    model, _, _ = dinotxt.load(str(work / "runs" / "debug" / "checkpoint"))
    dataset = segmentation_dataset("demo_bg", work / "runs" / "debug_world" / "eval")
    res = evaluate_grouping(model, dataset, 2, "kmeans", seed=0, progress=False)
    assert res["num_images"] == 48 and res["mean_k"] == 2
    assert res["miou"] > max(res["random_voronoi_miou"], res["random_cells_miou"]) + 0.1, res


def test_group_and_eval_grouping_commands(trained_debug_run, tmp_path, capsys):
    from PIL import Image

    from dinotxt.cli import main

    work, _, _ = trained_debug_run
    ckpt = str(work / "runs" / "debug" / "checkpoint")
    image = next((work / "runs" / "debug_world" / "eval" / "classes").rglob("*.jpg"))
    out = tmp_path / "segments.png"
    assert main(["group", str(image), "--checkpoint", ckpt, "--segments", "3", "--out", str(out),
                 "--save-labels", str(tmp_path / "ids.png")]) == 0
    printed = capsys.readouterr().out
    assert "3 segments (fixed, kmeans over 4 x 4 patch features" in printed and out.is_file()
    ids = np.asarray(Image.open(tmp_path / "ids.png"))
    assert ids.shape == (64, 64) and set(np.unique(ids)) <= {0, 1, 2}
    assert main(["group", str(image), "--checkpoint", ckpt, "--segments", "auto", "--method", "spectral",
                 "--out", str(out)]) == 0
    assert "chosen by the eigengap" in capsys.readouterr().out
    assert main(["group", str(image), "--checkpoint", ckpt, "--segments", "99", "--out", str(out)]) == 2
    assert "choose 1 <= K <= 16" in capsys.readouterr().err
    assert main(["eval", "grouping", "--checkpoint", ckpt, "--dataset", "demo_bg", "--root",
                 str(work / "runs" / "debug_world" / "eval"), "--limit", "6", "--out", str(tmp_path / "rep"),
                 "--num-examples", "2", "--json"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(printed.strip().splitlines()[-1])
    assert res["num_images"] == 6 and "random Voronoi" in printed
    assert (tmp_path / "rep" / "metrics.json").is_file() and len(list((tmp_path / "rep" / "examples").glob("*.png"))) == 2


def test_eval_grouping_reads_the_standard_layouts(tiny_model, tmp_path):
    """A non-square ADE20K-layout image pair (label 0 ignored), through the same reader the segmentation
    evaluation uses: every pixel is scored, the baselines come with it."""
    from PIL import Image

    from dinotxt.evaluation.datasets import segmentation_dataset
    from dinotxt.evaluation.grouping import BASELINES, evaluate_grouping

    base = tmp_path / "ADEChallengeData2016"
    label = np.zeros((40, 60), np.uint8)
    label[:, 20:] = 3
    label[10:30, 30:50] = 12
    for k in ("ADE_val_00000001", "ADE_val_00000002"):
        for folder, array in (("images", np.random.default_rng(0).integers(0, 255, (40, 60, 3))), ("annotations", label)):
            path = base / folder / "validation" / f"{k}.{'jpg' if folder == 'images' else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(array, np.uint8)).save(path)
    dataset = segmentation_dataset("ade20k", tmp_path)
    res = evaluate_grouping(tiny_model.eval(), dataset, 3, "spectral", progress=False, out_dir=tmp_path / "rep",
                            num_examples=1)
    assert res["num_images"] == 2 and res["num_classes"] == 150 and res["mean_k"] == 3
    for key in ["miou"] + [f"{b}_miou" for b in BASELINES]:
        assert 0 <= res[key] <= 1, key
    assert len(list((tmp_path / "rep" / "examples").glob("*.png"))) == 1
