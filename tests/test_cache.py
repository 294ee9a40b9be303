"""Feature cache: a step on cached tokens equals a step on the same crops, the cache refuses
to mix backbones / image sizes / transforms / data, resumes, and streams like the shards."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinotxt
from dinotxt.data.feature_cache import CachedFeatureStream, FeatureCache, cache_views, view_transform
from dinotxt.features.build_cache import build_cache
from dinotxt.config import ConfigError, load_train_config
from dinotxt.data.sources import iter_tar_samples
from dinotxt.data.stream import sample_image
from dinotxt.train.loss import ClipLoss
from dinotxt.models.factory import create_backbone
from dinotxt.models.backbone import frozen_tokens
from dinotxt.train.step import contrastive_loss
from numerics import FP16_U, FP32_U, assert_float64_equal, assert_grads_float64_equal

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "debug.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from dinotxt.data.world import write_world

    root = tmp_path_factory.mktemp("cache_world")
    write_world(str(root), num_train=48, num_eval=0, size=48, samples_per_shard=16, seed=0)
    return root


def config(world, cache_dir, *extra):
    return load_train_config(RECIPE, [f"data.train={world}/train", f"cache.path={cache_dir}", "data.world.generate=false",
                                      "data.num_workers=0", "model.vision_head.drop_path=0.0", *extra])


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    cfg = config(world, tmp_path_factory.mktemp("c") / "cache", "cache.views=2", "cache.batch_size=20")
    summary = build_cache(cfg, device="cpu", log=quiet)
    return cfg, summary


def raw_images(world):
    """key -> (PIL image, caption) of the source shards."""
    out = {}
    for shard in sorted((world / "train").glob("*.tar")):
        for sample in iter_tar_samples(str(shard), {}):
            out[sample["__key__"]] = (sample_image(sample), sample["txt"].decode())
    return out


def test_cached_tokens_are_the_backbone_output_of_the_seeded_crops(built, world):
    cfg, summary = built
    assert summary["samples"] == 48 and summary["shards"] == 3 and summary["token_shape"] == [1 + 4 + 16, 96]
    cache = FeatureCache(cfg.cache.path)
    backbone = create_backbone(cfg.model.backbone)
    images = raw_images(world)
    name = cache.names[1]
    index = cache.index(name)
    for row in (0, 7):
        key = index["keys"][row]
        assert index["captions"][row] == images[key][1]
        crops = cache_views(images[key][0], key, view_transform(cfg), cfg.seed, 2)
        assert not torch.equal(crops[0], crops[1])  # two different random views
        tokens = frozen_tokens(backbone, crops)
        for view in range(2):
            # the fp16 rounding of the online tokens of the same crop: within half an fp16 ulp of them,
            # plus the few fp32 ulps by which a batch of 20 (the writer's) and a batch of 2 may differ
            cached, online = cache.read(name, row, view), tokens[view]
            assert cached.dtype == torch.float16
            bound = FP16_U * online.abs() + 16 * FP32_U * online.abs().max()
            assert ((cached.float() - online).abs() <= bound).all()
    assert cache.lookup(index["keys"][7]) == (name, 7)


def test_step_on_cached_tokens_equals_step_on_images_with_the_same_crops(built, world):
    cfg, _ = built
    cache = FeatureCache(cfg.cache.path)
    images = raw_images(world)
    torch.manual_seed(0)
    model = dinotxt.create_model(cfg.model)
    name, n = cache.names[0], 8
    keys = cache.index(name)["keys"][:n]
    crops = torch.stack([cache_views(images[k][0], k, view_transform(cfg), cfg.seed, 2)[1] for k in keys])
    ids = torch.randint(1, cfg.model.text.vocab_size - 1, (n, 12))
    ids[:, -1] = cfg.model.text.vocab_size - 1  # EOT = largest id

    def step(m, batch):
        m.zero_grad()
        loss = contrastive_loss(m, ClipLoss(), batch)
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    # a step on the backbone's tokens is the step on the images: the same mathematics (float64)
    exact = copy.deepcopy(model).double()
    crops64 = crops.double()
    loss_images, grads_images = step(exact, {"image": crops64, "text": ids})
    loss_tokens, grads_tokens = step(exact, {"tokens": frozen_tokens(exact.backbone, crops64), "text": ids})
    assert_float64_equal(loss_tokens, loss_images, "loss")
    assert_grads_float64_equal(grads_tokens, grads_images)
    assert any(k.startswith("vision_head.") for k in grads_images)
    # the cache stores fp16 (relative rounding 2**-11): the fp32 step on cached tokens stays close
    loss_online, grads_online = step(model, {"image": crops, "text": ids})
    cached = {"tokens": torch.stack([cache.read(name, r, 1) for r in range(n)]), "text": ids}
    loss_cached, grads_cached = step(model, cached)
    assert float(loss_online) == pytest.approx(float(loss_cached), abs=2e-3)
    assert grads_online.keys() == grads_cached.keys()
    for k in grads_online:
        scale = grads_online[k].abs().max().item() + 1e-8
        assert (grads_online[k] - grads_cached[k]).abs().max().item() <= 2e-2 * scale, k


@pytest.mark.parametrize("head", [
    ["model.vision_head.use_patch_tokens=false"],  # LiT: CLS only
    ["model.vision_head.final_norm=false", "model.vision_head.pooling=gem"],  # CLS + pooled patches
])
def test_pooled_cache_for_the_lit_setting(world, tmp_path, head):
    cfg = config(world, tmp_path / "pooled", "cache.tokens=pooled", "model.vision_head.num_blocks=0", *head)
    summary = build_cache(cfg, device="cpu", log=quiet)
    assert summary["token_shape"] == [2, 96]
    cache = FeatureCache(cfg.cache.path)
    model = dinotxt.create_model(cfg.model)
    images = raw_images(world)
    name = cache.names[2]
    keys = cache.index(name)["keys"][:4]
    crops = torch.stack([cache_views(images[k][0], k, view_transform(cfg), cfg.seed, 1)[0] for k in keys])
    pooled = torch.stack([cache.read(name, r) for r in range(4)]).float()
    expected = model.vision_head(model.backbone(crops))
    assert torch.allclose(model.vision_head.forward_pooled(pooled), expected, rtol=2e-3, atol=2e-3)
    stream = CachedFeatureStream(cache, shuffle_buffer=0, rank=0, world_size=1,
                                 tokenizer=lambda c: torch.zeros(len(c), 8, dtype=torch.long))
    assert next(iter(stream))["pooled"].shape == (2, 96)
    # the training path: the loader's collate keeps the pooled tokens and the step uses them
    from torch.utils.data import DataLoader

    from dinotxt.data.stream import collate_image_text
    from dinotxt.train.step import image_features

    batch = next(iter(DataLoader(stream, batch_size=4, collate_fn=collate_image_text)))
    assert batch["pooled"].shape == (4, 2, 96) and batch["text"].shape == (4, 8)
    assert torch.equal(image_features(model, batch), model.vision_head.forward_pooled(batch["pooled"].float()))


def test_pooled_cache_refused_for_a_head_with_blocks(world, tmp_path):
    cfg = config(world, tmp_path / "p", "cache.tokens=pooled")
    with pytest.raises(ConfigError, match="num_blocks=0"):
        build_cache(cfg, device="cpu", log=quiet)


def test_cache_refuses_to_mix_backbones_sizes_transforms_and_data(built, world, tmp_path):
    cfg, _ = built
    cache = FeatureCache(cfg.cache.path)
    cache.check_fits(cfg, create_backbone(cfg.model.backbone))  # the run it was built for
    cache.check_fits(config(world, cfg.cache.path, "cache.views=2", "seed=7"))  # another seed is fine
    for override, field in [("model.backbone.img_size=42", "img_size"), ("data.crop_scale=[0.3,1.0]", "crop_scale"),
                            ("model.backbone.init_seed=3", "init_seed"), ("model.backbone.name=vit_small_patch14_dinov2", "name"),
                            ("cache.dtype=bfloat16", "dtype")]:
        with pytest.raises(ConfigError, match=field):
            cache.check_fits(config(world, cfg.cache.path, "cache.views=2", override))
    other = create_backbone(cfg.model.backbone)
    with torch.no_grad():
        other.encoder.blocks[0].mlp.fc1.weight.mul_(1.5)  # same config, other weights
    with pytest.raises(ConfigError, match="other weights"):
        cache.check_fits(cfg, other)
    with pytest.raises(ConfigError, match="other data"):
        cache.check_fits(config(world, cfg.cache.path, "cache.views=2", f"data.train={world}/train/000000.tar"))
    # writing into a folder that holds another cache is refused too
    with pytest.raises(ConfigError, match="views=2"):
        build_cache(config(world, cfg.cache.path, "cache.views=1"), device="cpu", log=quiet)


def test_interrupted_cache_resumes_and_bfloat16_storage(world, tmp_path):
    cfg = config(world, tmp_path / "bf16", "cache.dtype=bfloat16")
    build_cache(cfg, device="cpu", log=quiet)
    root = Path(cfg.cache.path)
    first = (root / "00000.bin").stat().st_mtime_ns
    (root / "00001.json").unlink()  # as if killed after writing shard 1's tokens but before its index
    (root / ".00002.bin.tmp123").write_bytes(b"half")  # a leftover temporary file
    with pytest.raises(ValueError, match="incomplete"):
        FeatureCache(root)
    summary = build_cache(cfg, device="cpu", log=quiet)
    assert summary["written_now"] == 16 and summary["samples"] == 48
    assert (root / "00000.bin").stat().st_mtime_ns == first  # finished shards are not redone
    cache = FeatureCache(root)
    t = cache.read("00001", 3)
    assert t.dtype == torch.bfloat16 and torch.isfinite(t.float()).all()


def test_cached_stream_splits_across_ranks_and_workers_and_resumes(built):
    cfg, _ = built
    cache = FeatureCache(cfg.cache.path)
    seen = []
    for reader in range(4):  # 2 ranks x 2 workers over 3 shards: fewer shards than readers
        it = iter(CachedFeatureStream(cache, shuffle_buffer=5, rank=reader, world_size=4, seed=1))
        seen += [next(it)["key"] for _ in range(12)]
    assert len(seen) == 48 and len(set(seen)) == 48  # no duplicates, no gaps
    kw = dict(shuffle_buffer=5, rank=0, world_size=1, seed=2)
    full = [s["caption"] for s in _take(CachedFeatureStream(cache, **kw), 60)]
    head = _take(CachedFeatureStream(cache, **kw), 21)
    resumed = _take(CachedFeatureStream(cache, **kw, start_positions={0: head[-1]["position"]}), 39)
    assert [s["caption"] for s in resumed] == full[21:]


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


@pytest.mark.slow
def test_cache_and_train_from_it_on_the_command_line(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    common = ["data.world.num_train=128", "data.world.num_eval=24", "data.world.samples_per_shard=64", "cache.path=runs/feat"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dinotxt.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    made = cli("cache", RECIPE, *common)
    assert made.returncode == 0, made.stderr[-2000:]
    assert json.loads(made.stdout[made.stdout.index("{"):])["samples"] == 128
    trained = cli("train", RECIPE, *common, "optim.max_steps=3", "trainer.val_every_n_steps=0",
                  "trainer.checkpoint_every_n_steps=0", "data.num_workers=0")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "training on the feature cache" in trained.stdout
    assert json.loads((tmp_path / "runs" / "debug" / "metrics.json").read_text())["steps"] == 3
    wrong = cli("train", RECIPE, *common, "model.backbone.img_size=42", "name=other")
    assert wrong.returncode == 2 and "img_size" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    # a recipe naming a cache that is not there (or not finished) builds it first, then trains from it
    auto = cli("train", RECIPE, *common[:-1], "cache.path=runs/auto", "name=auto", "optim.max_steps=2",
               "trainer.val_every_n_steps=0", "trainer.checkpoint_every_n_steps=0", "data.num_workers=0")
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "not complete, building it first" in auto.stdout and "training on the feature cache" in auto.stdout
    assert (tmp_path / "runs" / "auto" / "cache.json").is_file()
