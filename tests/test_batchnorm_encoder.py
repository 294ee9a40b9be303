"""An encoder with BatchNorm (a timm ResNet-18 as a ``package.module:factory`` token source,
tests/cnn_encoder.py) through everything that handles the frozen backbone: the feature cache
(its weights fingerprint hashes 0-dim buffers), training from the cache, the live weights and
running statistics untouched by training, the checkpoint, the single-file export with the
backbone inside, and the curation embedding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dinotxt

TESTS = Path(__file__).parent
RECIPE = {
    "model": {"arch": "dinotxt_vits14_reg4",  # a registry entry without backbone kwargs
              "backbone": {"name": "cnn_encoder:build", "img_size": 64, "kwargs": {"arch": "resnet18"}},
              "vision_head": {"num_blocks": 1, "num_heads": 8, "drop_path": 0.0},
              "text": {"width": 64, "depth": 2, "heads": 2, "context_length": 24}},
    "data": {"batch_size": 16, "num_workers": 0, "shuffle_buffer": 32},
    "optim": {"lr": 1e-3, "warmup_steps": 1, "max_steps": 4},
    "tokenizer": {"vocab_size": 128},
    "trainer": {"log_every_n_steps": 2, "checkpoint_every_n_steps": 0, "val_every_n_steps": 0},
    "cache": {"views": 2, "batch_size": 24},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dinotxt.data.world import write_world

    work = tmp_path_factory.mktemp("bn")
    write_world(str(work / "world"), num_train=64, num_eval=0, size=64, samples_per_shard=32, seed=0)
    recipe = work / "cnn.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data": {**RECIPE["data"], "train": str(work / "world" / "train")},
                                      "cache": {**RECIPE["cache"], "path": str(work / "cache")},
                                      "output_dir": str(work / "runs")}))
    return work, recipe


def cli(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dinotxt.cli", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cache_train_and_load_a_batchnorm_encoder(setup):
    work, recipe = setup
    refused = cli("cache", recipe, cwd=work)
    assert refused.returncode == 2 and "--trust-code" in refused.stderr
    made = cli("cache", recipe, "--trust-code", cwd=work)
    assert made.returncode == 0, made.stderr[-2000:]
    summary = json.loads(made.stdout[made.stdout.index("{"):])
    assert summary["samples"] == 64 and summary["token_shape"] == [1 + 4, 512]  # [mean, 2 x 2 cells] of ResNet-18
    trained = cli("train", recipe, "--trust-code", cwd=work)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "training on the feature cache" in trained.stdout
    ckpt = work / "runs" / "cnn" / "checkpoint"
    model, transform, tokenizer = dinotxt.load(ckpt, trust_code=True)
    assert model.config.backbone.name == "cnn_encoder:build" and model.backbone.num_prefix_tokens == 1
    bn = model.backbone.encoder.net.bn1
    assert bn.num_batches_tracked.ndim == 0 and int(bn.num_batches_tracked) == 0  # eval mode: never updated
    with torch.no_grad():
        emb = model.encode_image(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 1024) and torch.isfinite(emb).all()
    # the single-file export carries the backbone, 0-dim buffers included, and loads back bit for bit
    out = cli("export", ckpt, "--format", "safetensors", "--include-backbone", "--trust-code", cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    single, _, _ = dinotxt.load(work / "runs" / "cnn" / "checkpoint.safetensors", trust_code=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(single.encode_image(x), model.encode_image(x))


@pytest.mark.slow
def test_training_leaves_the_live_frozen_weights_and_running_statistics_untouched(setup, monkeypatch):
    """The live backbone before and after a real fit (online, with validation), in one process."""
    from dinotxt.train import run as run_module

    work, recipe = setup
    monkeypatch.syspath_prepend(str(TESTS))
    seen = {}

    class Spy(run_module.DinoTxtSystem):
        def on_fit_start(self):
            seen["before"] = {k: v.clone() for k, v in self.model.backbone.state_dict().items()}
            seen["head_before"] = {k: v.clone() for k, v in self.model.vision_head.state_dict().items()}

        def on_fit_end(self):
            seen["after"] = {k: v.clone() for k, v in self.model.backbone.state_dict().items()}
            seen["head_after"] = {k: v.clone() for k, v in self.model.vision_head.state_dict().items()}
            seen["modes"] = {m.training for m in self.model.backbone.modules()}

    monkeypatch.setattr(run_module, "DinoTxtSystem", Spy)
    from dinotxt.data.world import write_world

    write_world(str(work / "val_world"), num_train=0, num_eval=24, size=64, samples_per_shard=32, seed=1)
    run_module.run_training(str(recipe), ["name=online", "cache.path=null", "trainer.val_every_n_steps=2",
                                          f"eval.zeroshot_dir={work / 'val_world' / 'eval' / 'classes'}",
                                          "eval.templates=simple"], trust_code=True)
    before, after = seen["before"], seen["after"]
    assert any(k.endswith("running_mean") for k in before) and any(v.ndim == 0 for v in before.values())
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert seen["modes"] == {False}  # still in eval mode after validation switched the system back to train
    assert any(not torch.equal(seen["head_before"][k], seen["head_after"][k]) for k in seen["head_before"])


def test_curation_embeds_with_a_batchnorm_encoder(tmp_path, monkeypatch):
    from curation.config import load_curation_config
    from curation.pipeline import Curation
    from dinotxt.data.world import write_split

    monkeypatch.syspath_prepend(str(TESTS))
    pool = tmp_path / "pool"
    write_split(pool, 40, seed=0, size=64, samples_per_shard=20)
    cfg = load_curation_config("curation/debug", [f"pool.data={pool}", f"output_dir={tmp_path / 'out'}",
                                                  "embed.model=dinotxt_vits14_reg4", "embed.backbone.name=cnn_encoder:build",
                                                  "embed.backbone.img_size=64"])
    cfg.embed.backbone.kwargs = {"arch": "resnet18"}  # replace the recipe's ViT kwargs
    stats = Curation(cfg, trust_code=True).run(until="embed")
    assert stats["embed"]["samples"] == 40 and stats["embed"]["dim"] == 1024  # [CLS || mean(cells)] of 512
