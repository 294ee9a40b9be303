"""Backbone weight files in every layout load strictly into FrozenBackbone and give the tokens
of the independent official implementation (tests/test_official_reference.py), at the native
resolution and at other input sizes; wrong files fail naming the mismatch."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from dinotxt.models import FrozenBackbone
from dinotxt.models.weights import detect_layout, native_grid, read_backbone_state
from test_official_reference import (official_dinov2_state, official_dinov2_tokens, official_dinov3_state,
                                     official_dinov3_tokens, official_to_hf_dinov2, official_vision_head_state,
                                     save_pth)
from numerics import FP32_U, assert_close

# Both implementations resample the position embeddings (DINOv2) and build the RoPE tables
# (DINOv3) in fp32 whatever the model's dtype, as the official code does; everything else runs
# in float64 here, so the two agree to a few fp32 roundings of those tables (measured: 0.5 u).
FP32_TABLES = 16 * FP32_U


def assert_matches_official(bb, sd, x, reference, **kwargs):
    """``bb``'s tokens against the official forward of ``sd`` (``reference``), both in float64."""
    ours = copy.deepcopy(bb).double()(x.double())
    ref = reference({k: v.double() for k, v in sd.items()}, x.double(), **kwargs)
    assert_close(ours, ref, FP32_TABLES, f"tokens at {tuple(x.shape[-2:])}")


def _images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("registers", [4, 0])
def test_official_dinov2_pth_matches_official_forward_at_any_size(tmp_path, registers):
    sd = official_dinov2_state(dim=384, depth=2, grid=8, registers=registers)
    path = save_pth(sd, tmp_path / "dinov2_vits14_pretrain.pth")
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    bb = FrozenBackbone(name, weights=path, img_size=56, depth=2)
    assert bb.num_register_tokens == registers
    # native grid (8 x 8 = 112 px) needs no resize; reg4 models also match the official resize exactly
    sizes = [(112, 112), (56, 56), (70, 98)] if registers else [(112, 112)]
    for x in _images(*sizes):
        assert_matches_official(bb, sd, x, official_dinov2_tokens, heads=6)


def test_dinov2_without_registers_resizes_position_embeddings_bicubic_antialias(tmp_path):
    # METHOD.md: bicubic with antialias for every model; the official non-register models use a
    # 0.1 offset without antialias, so at other sizes only that resampling differs
    sd = official_dinov2_state(dim=384, depth=1, grid=8, registers=0)
    bb = FrozenBackbone("vit_small_patch14_dinov2", weights=sd, img_size=56, depth=1)
    (x,) = _images((56, 56))
    assert_matches_official(bb, sd, x, official_dinov2_tokens, heads=6, interpolate_antialias=True,
                            interpolate_offset=0.0)
    with pytest.raises(AssertionError, match="max error"):  # another resampling: far more than fp32 roundoff
        assert_matches_official(bb, sd, x, official_dinov2_tokens, heads=6, interpolate_antialias=False,
                                interpolate_offset=0.1)


def test_position_embeddings_are_resized_once_from_the_file_grid(tmp_path):
    sd = official_dinov2_state(dim=384, depth=1, grid=8)
    assert native_grid(sd) == 8
    bb = FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=sd, img_size=56, depth=1)
    assert tuple(bb.encoder.patch_embed.grid_size) == (8, 8)  # stored at the file's grid, not at img_size
    assert bb.img_size == 56


def test_dinov2_giant_swiglu_w12_w3(tmp_path):
    sd = official_dinov2_state(dim=384, depth=1, grid=4, swiglu=True)
    bb = FrozenBackbone("vit_giant_patch14_reg4_dinov2", weights=save_pth(sd, tmp_path / "g.pth"), img_size=56,
                        depth=1, embed_dim=384, num_heads=6)
    (x,) = _images((56, 56))
    assert_matches_official(bb, sd, x, official_dinov2_tokens, heads=6)


def test_hugging_face_transformers_dinov2_safetensors(tmp_path):
    sd = official_dinov2_state(dim=384, depth=2, grid=8)
    hf = {"dinov2." + k: v.contiguous() for k, v in official_to_hf_dinov2(sd).items()}  # as in a classifier file
    hf["classifier.weight"] = torch.zeros(10, 768)
    path = tmp_path / "model.safetensors"
    save_file(hf, str(path))
    state, layout = read_backbone_state(path)
    assert layout == "hf_dinov2" and set(state) == set(sd)
    bb = FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=str(path), img_size=56, depth=2)
    (x,) = _images((56, 84))
    assert_matches_official(bb, sd, x, official_dinov2_tokens, heads=6)


def test_dinov2_training_checkpoint_wrapper(tmp_path):
    sd = official_dinov2_state(dim=384, depth=1, grid=4)
    wrapped = {"teacher": {**{"backbone." + k: v for k, v in sd.items()}, "dino_head.last_layer.weight": torch.zeros(3)}}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save(wrapped, path)
    bb = FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=str(path), img_size=56, depth=1)
    (x,) = _images((56, 56))
    assert_matches_official(bb, sd, x, official_dinov2_tokens, heads=6)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_official_dinov3_pth_matches_official_forward(tmp_path, qkv_bias):
    sd = official_dinov3_state(dim=384, depth=2, heads=6, qkv_bias=qkv_bias)
    assert detect_layout(sd) == "dinov3"
    name = "vit_small_patch16_dinov3_qkvb" if qkv_bias else "vit_small_patch16_dinov3"
    bb = FrozenBackbone(name, weights=save_pth(sd, tmp_path / "dinov3.pth"), img_size=64, depth=2)
    assert bb.num_register_tokens == 4
    # the stored (bf16-rounded) periods are used, as in the official model
    assert torch.equal(bb.encoder.rope.periods, sd["rope_embed.periods"])
    for x in _images((64, 64), (48, 80)):
        assert_matches_official(bb, sd, x, official_dinov3_tokens, heads=6)


def test_dinov3_nonzero_qkv_bias_needs_the_qkvb_variant(tmp_path):
    sd = official_dinov3_state(dim=384, depth=1, heads=6, qkv_bias=True)
    with pytest.raises(ValueError, match="has no qkv bias.*_qkvb"):
        FrozenBackbone("vit_small_patch16_dinov3", weights=sd, img_size=64, depth=1)


def test_any_timm_vit_from_its_own_safetensors_drops_the_classifier(tmp_path):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, num_classes=5).eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = FrozenBackbone("vit_tiny_patch16_224", weights=str(path), img_size=224, depth=2)
    (x,) = _images((224, 224))
    with torch.no_grad():  # the same architecture; ours resizes position embeddings (in fp32) per input
        assert_close(copy.deepcopy(bb).double()(x.double()), ref.double().forward_features(x.double()), FP32_TABLES)


def test_vit_b_file_for_a_vit_l_config_names_the_mismatch(tmp_path):
    path = save_pth(official_dinov2_state(dim=768, depth=1, grid=4), tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    with pytest.raises(ValueError) as err:
        FrozenBackbone("vit_large_patch14_reg4_dinov2", weights=path, img_size=56, depth=1)
    msg = str(err.value)
    assert "official DINOv2 layout: width 768" in msg and "'vit_large_patch14_reg4_dinov2' (width 1024" in msg
    assert "shape mismatches (e.g." in msg and "file (1, 1, 768) vs model (1, 1, 1024)" in msg
    assert "vit_base_patch14_reg4_dinov2" in msg  # what the file looks like


def test_depth_registers_patch_and_layout_mismatches_are_named(tmp_path):
    deeper = official_dinov2_state(dim=384, depth=2, grid=4)
    with pytest.raises(ValueError, match=r"2 blocks.*1 block\b.*unexpected \d+ keys \(e.g. blocks.1."):
        FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=deeper, img_size=56, depth=1)
    with pytest.raises(ValueError, match="4 registers.*0 registers"):
        FrozenBackbone("vit_small_patch14_dinov2", weights=official_dinov2_state(depth=1, grid=4), img_size=56, depth=1)
    with pytest.raises(ValueError, match="official DINOv3 layout: width 384, 1 block, patch 16.*patch 14"):
        FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=official_dinov3_state(depth=1), img_size=56, depth=1)
    head = save_pth(official_vision_head_state(dim=384), tmp_path / "vision_head.pth")
    with pytest.raises(ValueError, match="does not look like a ViT backbone"):
        FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=head, img_size=56, depth=1)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=str(corrupt), img_size=56, depth=1)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=str(tmp_path / "missing.pth"), img_size=56, depth=1)
