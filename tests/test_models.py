import math

import pytest
import torch
from omegaconf import OmegaConf

import dinotxt
from dinotxt.models import FrozenBackbone, TextTower, VisionHead, pool_patches, swiglu_hidden_dim
from conftest import TINY_BACKBONE, TINY_TEXT, tiny_backbone
from numerics import assert_float64_equal


@pytest.mark.parametrize("arch", dinotxt.list_models())
def test_registry_forward_backward(arch):
    """Every registered config builds (at reduced size) and trains one step: every trainable
    parameter gets a finite, non-zero gradient, and no frozen one gets any."""
    backbone = tiny_backbone(arch, 112)  # 112 divides patch 14 and 16; CNN token sources run at 64 (patch 32)
    model = dinotxt.create_model(arch, backbone=backbone, text=TINY_TEXT).eval()  # eval: no drop path skips a block
    size = backbone["img_size"]
    images, ids = torch.randn(2, 3, size, size), torch.randint(1, 99, (2, 16))
    logits, logits_t = model.get_logits(images, ids)
    assert logits.shape == (2, 2) and torch.equal(logits, logits_t.t())
    loss = dinotxt.ClipLoss()(**model(images, ids))
    loss.backward()
    trainable = dict(model.trainable_parameters())
    assert "logit_scale" in trainable and any(k.startswith("text.") for k in trainable)
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        else:
            assert name.startswith("backbone.") and p.grad is None, name
    assert all(not p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize("arch", dinotxt.list_models())
def test_config_read_off_the_modules_is_the_registry_config(arch):
    """``model.config`` is derived from the modules; for a factory model it is the resolved registry entry."""
    from dinotxt.config import model_config, resolve_model_dims

    model = dinotxt.create_model(arch, backbone=tiny_backbone(arch), text=TINY_TEXT)
    expected = model_config(arch, {"backbone": tiny_backbone(arch), "text": TINY_TEXT})
    resolve_model_dims(expected, model.backbone.embed_dim, model.backbone.num_heads)
    assert OmegaConf.to_container(model.config) == OmegaConf.to_container(expected)


def test_paper_model_exact_sizes():
    model = dinotxt.create_model("dinotxt_vitl14_reg4", backbone={"kwargs": {"depth": 1}}, text={"depth": 1})
    assert model.backbone.embed_dim == 1024 and model.backbone.num_prefix_tokens == 5
    block = model.vision_head.block_list[0]
    assert len(model.vision_head.block_list) == 2
    assert block.attn.qkv.weight.shape == (3072, 1024) and block.attn.qkv.bias is None
    assert block.attn.proj.bias is not None and block.attn.num_heads == 16
    assert block.mlp.w1.weight.shape == (2752, 1024) and block.mlp.w2.weight.shape == (2752, 1024)
    assert block.mlp.w3.weight.shape == (1024, 2752) and block.mlp.w1.bias is not None
    assert torch.all(block.ls1.gamma == 1e-5) and torch.all(block.ls2.gamma == 1e-5)
    assert block.norm1.eps == 1e-5
    # stochastic depth 0.3 on EVERY head block, in the official batch-subset form
    assert [(b.residual1.p, b.residual2.p, b.residual1.mode) for b in model.vision_head.block_list] == \
        [(pytest.approx(0.3), pytest.approx(0.3), "batch_subset")] * 2
    assert model.embed_dim == 2048
    t = model.text
    assert t.head.linear_projection.weight.shape == (2048, 1280) and t.head.linear_projection.bias is None
    assert t.backbone.token_embedding.weight.shape == (49408, 1280)
    assert t.backbone.positional_embedding.shape == (77, 1280)
    assert t.backbone.blocks[0].attention.qkv.weight.shape == (3840, 1280)
    assert t.backbone.blocks[0].attention.qkv.bias is None
    assert t.backbone.blocks[0].feed_forward.fc1.weight.shape == (5120, 1280)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-4)


def test_swiglu_hidden():
    assert swiglu_hidden_dim(1024) == 2752 and swiglu_hidden_dim(384) % 64 == 0


def test_lit_baseline_is_cls_only():
    model = dinotxt.create_model("lit_vitl14_reg4", backbone=TINY_BACKBONE, text=TINY_TEXT)
    assert len(model.vision_head.block_list) == 0 and model.embed_dim == 96
    images = torch.randn(2, 3, 56, 56)
    tokens = model.backbone(images)
    assert torch.allclose(model.encode_image(images), tokens[:, 0])  # exactly the frozen CLS


def test_embedding_is_cls_concat_pooled_patches(tiny_model):
    images = torch.randn(2, 3, 56, 56)
    tokens = tiny_model.backbone(images)
    cls, patches = tiny_model.vision_head.forward_tokens(tokens)
    assert patches.shape == (2, 16, 96)  # registers dropped: 56/14 = 4 -> 16 patches
    emb = tiny_model.encode_image(images)
    assert torch.allclose(emb, torch.cat([cls, patches.mean(1)], -1), atol=1e-6)
    normed = tiny_model.encode_image(images, normalize=True)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2), atol=1e-5)  # the FULL 2D vector is normalised
    dense = tiny_model.encode_patches(images)
    assert dense.shape == (2, 4, 4, 96) and torch.allclose(dense.reshape(2, 16, 96), patches, atol=1e-6)
    text = tiny_model.encode_text(torch.randint(1, 99, (3, 16)))
    assert tiny_model.dense_text(text, normalize=False).shape == (3, 96)
    assert torch.equal(tiny_model.dense_text(text, normalize=False), text[:, 96:])


@pytest.mark.parametrize("kind", ["mean", "max", "gem"])
def test_poolers(kind):
    x = torch.rand(2, 5, 8)
    ref = {"mean": x.mean(1), "max": x.max(1).values, "gem": x.clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)}[kind]
    assert torch.allclose(pool_patches(x, kind), ref)
    head = VisionHead(8, 1, num_blocks=0, num_heads=2, pooling=kind)
    assert head(torch.rand(2, 6, 8)).shape == (2, 16)


def test_head_zero_blocks_and_invalid_pooling():
    head = VisionHead(16, 3, num_blocks=0, num_heads=2, final_norm=False)
    x = torch.randn(2, 3 + 4, 16)
    assert torch.allclose(head(x), torch.cat([x[:, 0], x[:, 3:].mean(1)], -1))
    with pytest.raises(ValueError, match="pooling"):
        VisionHead(16, 1, pooling="median")


def test_text_tower_causal_eot_pooling():
    """Padding after EOT is inert (causal attention) and only the EOT token is projected: exact
    claims, so both paths run in float64."""
    torch.manual_seed(0)
    tower = TextTower(vocab_size=50, context_length=12, width=32, depth=2, heads=4, output_dim=24).double().eval()
    ids = torch.tensor([[47, 5, 6, 7, 49, 0, 0, 0, 0, 0, 0, 0]])
    junk = ids.clone()
    junk[0, 5:] = torch.randint(1, 40, (7,))  # anything after EOT (the largest id) is inert
    assert_float64_equal(tower(ids), tower(junk), "padding after EOT")
    full = tower.head.linear_projection(tower.backbone(ids))  # every column, every token projected
    assert_float64_equal(tower(ids), full[:, 4], "EOT pooling")
    assert not torch.allclose(tower(ids), full[:, 3])  # another token is another embedding
    with pytest.raises(ValueError, match="vocab_size"):
        tower(torch.tensor([[60, 1]]))


def test_logit_scale_clamp(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale.fill_(9.0)
    tiny_model.clamp_logit_scale_()
    assert tiny_model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        tiny_model.logit_scale.fill_(-3.0)
    tiny_model.clamp_logit_scale_()
    assert tiny_model.logit_scale.item() == 0.0


def test_frozen_backbone_is_pinned(tiny_model):
    bb = tiny_model.backbone
    tiny_model.train()
    assert not bb.training and all(not m.training for m in bb.modules())
    assert all(not p.requires_grad for p in bb.parameters())
    out = bb(torch.randn(1, 3, 56, 56, requires_grad=True))
    assert not out.requires_grad
    assert not any(k.startswith("backbone.") for k in tiny_model.trainable_state_dict())
    assert tiny_model.vision_head.training  # the head itself trains


def test_custom_encoder_by_import_path():
    from dinotxt.utils.plugins import UntrustedCodeError

    with pytest.raises(UntrustedCodeError, match="trust_code=True"):  # code named by a setting needs the opt-in
        FrozenBackbone("custom_encoder:build", dropout=0.5)
    bb = FrozenBackbone("custom_encoder:build", dropout=0.5, trust_code=True)
    assert bb.num_prefix_tokens == 3 and bb.patch_size == 8 and bb.embed_dim == 32
    bb.train()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(bb(x), bb(x))  # dropout inactive: eval pinned
    model = dinotxt.create_model("dinotxt_vitl14_reg4", backbone={"name": "custom_encoder:build"},
                                 text=TINY_TEXT, trust_code=True)
    assert model.encode_image(x).shape == (2, 64)
    with pytest.raises(ImportError, match="no attribute"):
        FrozenBackbone("custom_encoder:nope", trust_code=True)


def test_backbone_tokens_match_timm_forward_features():
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56,
                            depth=1, dynamic_img_size=True).eval()
    bb = FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=56, depth=1)
    bb.encoder.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(bb(x), ref.forward_features(x))
    cls, regs, patches = bb.split_tokens(bb(x))
    assert regs.shape == (2, 4, 384) and patches.shape == (2, 16, 384)


def test_backbone_weights_file_roundtrip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    bb = FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=56, depth=1)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in bb.encoder.state_dict().items()}, str(path))
    bb2 = FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=56, depth=1, weights=str(path))
    x = torch.randn(1, 3, 56, 56)
    assert torch.equal(bb(x), bb2(x))
    with pytest.raises(ValueError, match="do not fit"):
        FrozenBackbone("vit_base_patch14_reg4_dinov2", img_size=56, depth=1, weights=str(path))


def test_same_seed_rebuilds_same_random_backbone():
    a = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT)
    b = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT)
    for (k, v), (_, w) in zip(a.backbone_state().items(), b.backbone_state().items()):
        assert torch.equal(v, w), k
