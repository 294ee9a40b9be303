"""Unlocking the last backbone blocks (``model.backbone.trainable_blocks=K``, the LiT paper's unlocked
settings): exactly the last K blocks and the modules after them train, with their own learning rate; the
rest keeps its weights, its eval mode and no autograd graph; the unlocked weights go into checkpoints and
exports and come back on load; gradient caching stays exact; the feature cache is refused."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinotxt
from conftest import TINY_TEXT, tiny_batch
from numerics import assert_float64_equal, assert_grads_float64_equal

ROOT = Path(__file__).parents[1]
BACKBONE = {"img_size": 56, "kwargs": {"depth": 3, "embed_dim": 96, "num_heads": 2}}


def _model(k=1, **backbone):
    torch.manual_seed(0)
    return dinotxt.create_model("dinotxt_demo", backbone={**BACKBONE, "trainable_blocks": k, **backbone},
                                text=TINY_TEXT, vision_head={"num_blocks": 1, "drop_path": 0.0})


def _batch(n=6, seed=1, dtype=torch.float32):
    images, ids = tiny_batch(n, seed, dtype)
    return {"image": images, "text": ids}


def test_exactly_the_last_blocks_and_the_final_norm_train_and_the_rest_stays_frozen_in_eval_mode():
    model = _model(2).train()
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.blocks.1.", "encoder.blocks.2.", "encoder.norm.")) for n in trainable)
    assert any(n.startswith("encoder.blocks.1.") for n in trainable) and "encoder.norm.weight" in trainable
    enc = model.backbone.encoder
    assert not enc.blocks[0].training and not enc.patch_embed.training and not model.backbone.training
    assert enc.blocks[1].training and enc.blocks[2].training and enc.norm.training
    model.eval()
    assert not enc.blocks[2].training
    assert _model(0).backbone.unlocked_state() == {} and not any(p.requires_grad for p in _model(0).backbone.parameters())


def test_gradients_reach_the_unlocked_blocks_only_and_no_graph_is_kept_below_them():
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.step import contrastive_loss

    model = _model(1).train()
    seen = []
    # a frozen block's output never requires a gradient: autograd records nothing below the unlocked blocks
    model.backbone.encoder.blocks[1].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    model.backbone.encoder.blocks[2].register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    contrastive_loss(model, ClipLoss(), _batch()).backward()
    assert seen == [False, True]
    for name, p in model.backbone.named_parameters():
        unlocked = name.startswith(("encoder.blocks.2.", "encoder.norm."))
        assert (p.grad is not None and bool(p.grad.abs().sum() > 0)) == unlocked, name


def test_training_steps_change_the_unlocked_blocks_at_their_own_lr_and_nothing_else_of_the_backbone():
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.optim import build_optimizer
    from dinotxt.train.step import contrastive_loss

    model = _model(1).train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt, sched = build_optimizer(model, 1e-3, 1e-4, (0.9, 0.99), 1e-8, 0, 10, backbone_lr=1e-5)
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [1e-5, 1e-3]
    backbone_params = {id(p) for p in model.backbone.parameters()}
    for g in opt.param_groups:
        assert all((id(p) in backbone_params) == (g["lr"] == 1e-5) for p in g["params"])
    for step in range(3):
        opt.zero_grad()
        contrastive_loss(model, ClipLoss(), _batch(seed=step)).backward()
        opt.step()
        sched.step()
    after = model.backbone.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        assert changed == model.backbone.is_unlocked(k), k


def test_unlocked_blocks_are_checkpointed_exported_and_loaded_back(tmp_path):
    from safetensors.torch import load_file

    from dinotxt.checkpoint.export import export_official, export_safetensors

    model = _model(1)
    with torch.no_grad():  # "trained" unlocked weights that the rebuilt backbone could not know
        model.backbone.encoder.blocks[2].mlp.fc1.weight.add_(0.5)
        model.backbone.encoder.norm.bias.fill_(0.25)
    tok = dinotxt.train_tokenizer(["a red circle", "a blue square", "a green star"] * 20, vocab_size=60,
                                  context_length=16)
    ckpt = dinotxt.save_checkpoint(tmp_path / "ckpt", model, tok)
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert "unlocked_backbone.encoder.blocks.2.mlp.fc1.weight" in keys and "unlocked_backbone.encoder.norm.bias" in keys
    assert not any(k.startswith(("backbone.", "unlocked_backbone.encoder.blocks.1.", "unlocked_backbone.encoder.patch"))
                   for k in keys)
    x = torch.randn(2, 3, 56, 56)
    carried = export_safetensors(ckpt, tmp_path / "with_backbone.safetensors", include_backbone=True)["out"]
    for source in (ckpt, export_safetensors(ckpt)["out"], carried):
        loaded = dinotxt.load(source)[0]
        assert loaded.backbone.trainable_blocks == 1
        assert torch.equal(loaded.backbone.encoder.norm.bias, torch.full((96,), 0.25))
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(x), model.eval().encode_image(x))
    report = export_official(ckpt, tmp_path / "official")
    assert report["unlocked_backbone_blocks"] == 1 and "dinotxt_demo_backbone_unlocked.pth" in report["files"]
    assert report["loads_in_official_entry_point"] is False  # it would build the backbone without them
    blocks = torch.load(tmp_path / "official" / "dinotxt_demo_backbone_unlocked.pth", weights_only=True)
    assert torch.equal(blocks["norm.bias"], torch.full((96,), 0.25)) and "blocks.2.mlp.fc1.weight" in blocks
    assert not any(k.startswith("blocks.1.") for k in blocks)
    # the Hub model card says what trained
    from dinotxt.checkpoint import read_checkpoint
    from dinotxt.checkpoint.push import backbone_provenance, model_card

    cfg, state, _ = read_checkpoint(ckpt)
    card = model_card("me/unlocked", cfg, state, {}, {}, None, backbone_provenance(cfg.model.backbone), False,
                      {"license": "apache-2.0"})
    assert "frozen but for its last 1 block(s)" in card and "**frozen** vision encoder" not in card
    # a checkpoint without the unlocked blocks does not fit a model that has them
    frozen = dinotxt.save_checkpoint(tmp_path / "frozen", _model(0), tok)
    state = load_file(str(frozen / "model.safetensors"))
    with pytest.raises(ValueError, match="missing.*unlocked_backbone.encoder.*trainable_blocks must match"):
        model.load_trainable_state_dict(state)


def test_gradient_caching_with_unlocked_blocks_equals_one_pass():
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.gradcache import gradcache_backward
    from dinotxt.train.step import contrastive_loss

    batch = _batch(8, dtype=torch.float64)
    one, cached = _model(1).double().train(), _model(1).double().train()
    ref = contrastive_loss(one, ClipLoss(), batch)
    ref.backward()
    micro = [{k: v[i:i + 4] for k, v in batch.items()} for i in (0, 4)]
    loss = gradcache_backward(cached, ClipLoss(), micro, seeds=[0, 1])
    assert_float64_equal(loss, ref.detach(), "loss")
    grads = {k: p.grad for k, p in cached.named_parameters() if p.grad is not None}
    assert any(k.startswith("backbone.encoder.blocks.2.") for k in grads)
    assert_grads_float64_equal(grads, {k: p.grad for k, p in one.named_parameters() if p.grad is not None})


def test_a_cnn_tapped_at_an_inner_stage_unlocks_the_blocks_on_its_path():
    """Tapped at stage 2 (timm features_only keeps every block, but blocks 3-6 never run): unlocking 1 block
    unlocks blocks.2, the tapped one, and every unlocked parameter gets a gradient."""
    model = dinotxt.create_model("dinotxt_demo_effnet", backbone={"weights": None, "img_size": 64, "trainable_blocks": 1,
                                                                  "kwargs": {"stage": 2}}, text=TINY_TEXT,
                                 vision_head={"num_blocks": 1}).train()
    assert model.backbone.unlocked_prefixes == ("encoder.net.blocks.2.",)
    model.encode_image(torch.randn(2, 3, 64, 64)).sum().backward()
    unlocked = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert unlocked and all(p.grad is not None for _, p in unlocked)
    with pytest.raises(ValueError, match="trainable_blocks=4, but .* has 3 blocks up to its tapped feature stage"):
        dinotxt.create_model("dinotxt_demo_effnet", backbone={"weights": None, "img_size": 64, "trainable_blocks": 4,
                                                              "kwargs": {"stage": 2}}, text=TINY_TEXT)


@pytest.mark.parametrize("name, after", [("cnn:tf_efficientnet_lite0", ("conv_head", "bn2")), (None, ())])
def test_cnn_backbones_unlock_their_last_stages_with_batchnorm_statistics_frozen(name, after):
    """The full EfficientNet-Lite0 (its head convolution after the blocks), and the demo's, which stops at
    the last block stage (timm features_only: nothing after the blocks)."""
    backbone = {"weights": None, "img_size": 64, "trainable_blocks": 1, **({"name": name, "kwargs": {"stage": None}} if name else {})}
    model = dinotxt.create_model("dinotxt_demo_effnet", backbone=backbone, text=TINY_TEXT,
                                 vision_head={"num_blocks": 1}).train()
    net = model.backbone.encoder.net
    last = len(net.blocks) - 1
    assert model.backbone.unlocked_prefixes == (f"encoder.net.blocks.{last}.", *(f"encoder.net.{a}." for a in after))
    assert net.blocks[-1].training and not net.blocks[0].training
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    running = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    model.encode_image(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in running.items())
    assert net.blocks[-1][0].conv_pw.weight.grad is not None and net.blocks[-2][0].conv_pw.weight.grad is None


def test_settings_that_cannot_unlock_are_one_line_errors():
    from dinotxt.config import ConfigError, load_train_config

    with pytest.raises(ValueError, match="trainable_blocks=4, but backbone .* has 3 blocks"):
        _model(4)
    with pytest.raises(ValueError, match="no 'blocks' list"):
        dinotxt.create_model("dinotxt_demo_effnet", backbone={"name": "cnn:resnet18", "weights": None, "img_size": 64,
                                                              "trainable_blocks": 1, "kwargs": {"stage": None}},
                             text=TINY_TEXT)
    with pytest.raises(ConfigError, match="cannot come from the feature cache: set cache.path=null"):
        load_train_config("demo", ["model.backbone.trainable_blocks=1"])
    with pytest.raises(ConfigError, match="trainable_blocks=-1"):
        load_train_config("debug", ["model.backbone.trainable_blocks=-1"])
    with pytest.raises(ConfigError, match="optim.backbone_lr=0.0001 .* but model.backbone.trainable_blocks=0"):
        load_train_config("debug", ["optim.backbone_lr=1e-4"])


@pytest.mark.slow
def test_cli_run_with_unlocked_blocks_and_the_sigmoid_loss_trains_only_them_and_resumes(tmp_path):
    """The real command line: 6 steps of the debug recipe with the last of its 2 blocks unlocked, SigLIP's
    loss, checkpoints every 3 steps; the unlocked block moved, the first block equals a fresh build, and the
    Lightning checkpoint carries the unlocked block (a resume to 8 steps starts from it)."""
    from safetensors.torch import load_file

    recipe = str(ROOT / "recipes" / "debug.yaml")
    args = ["model.backbone.trainable_blocks=1", "optim.backbone_lr=3e-4", "loss.kind=sigmoid", "optim.max_steps=6",
            "trainer.checkpoint_every_n_steps=3", "trainer.val_every_n_steps=0"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "dinotxt.cli", "train", recipe, *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "runs" / "debug"
    state = load_file(str(folder / "checkpoint" / "model.safetensors"))
    cfg = dinotxt.load(folder / "checkpoint")[0].config
    fresh = dinotxt.create_model(cfg.copy()).backbone.state_dict()
    assert cfg.backbone.trainable_blocks == 1 and "logit_bias" in state and float(state["logit_bias"]) != -10.0
    for k, v in state.items():
        if k.startswith("unlocked_backbone."):
            assert k.startswith(("unlocked_backbone.encoder.blocks.1.", "unlocked_backbone.encoder.norm.")), k
    moved = [k for k in state if k.startswith("unlocked_backbone.")
             and not torch.equal(state[k], fresh[k[len("unlocked_backbone."):]])]
    assert any(".blocks.1." in k for k in moved)
    lightning = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert "model.backbone.encoder.blocks.1.mlp.fc1.weight" in lightning
    assert not any(k.startswith("model.backbone.encoder.blocks.0.") for k in lightning)
    resumed = subprocess.run([sys.executable, "-m", "dinotxt.cli", "train", recipe, "--resume", *args[:-3],
                              "optim.max_steps=8", "trainer.val_every_n_steps=0"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(str(folder / "checkpoint" / "model.safetensors"))
    assert not torch.equal(again["unlocked_backbone.encoder.blocks.1.mlp.fc1.weight"],
                           state["unlocked_backbone.encoder.blocks.1.mlp.fc1.weight"])
