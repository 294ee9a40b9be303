"""Backbone files of Hugging Face transformers' ``DINOv3ViTModel`` (``hf_dinov3`` layout) load strictly into
timm's DINOv3 ViTs and give transformers' own tokens in float64: a tiny randomly initialised
``DINOv3ViTModel`` (every parameter perturbed, so no mapping can hide behind zeros or ones), its
safetensors in both key spellings (``layer.{i}`` as ``save_pretrained`` writes the Hub files,
``model.layer.{i}`` as transformers 5 names its modules), plain and gated (SwiGLU) MLPs."""
import copy

import pytest
import torch
from safetensors.torch import save_file

from dinotxt.models import FrozenBackbone
from dinotxt.models.weights import detect_layout, hf_dinov3_to_official, read_backbone_state
from numerics import assert_close
from test_backbone_weights import FP32_TABLES

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DINOv3ViTModel"):
    pytest.skip("transformers has no DINOv3ViTModel (needs >= 4.56)", allow_module_level=True)

# (timm name, timm overrides, gated MLP): the _qkvb variants take the query / value biases transformers has
VARIANTS = {
    "plain": ("vit_small_patch16_dinov3_qkvb", {"depth": 2}, False),
    "gated": ("vit_huge_plus_patch16_dinov3_qkvb", {"depth": 2, "embed_dim": 384, "num_heads": 6}, True),
}


def hf_dinov3(timm_name, overrides, gated, seed=1):
    """A random ``DINOv3ViTModel`` of the timm architecture's sizes (its MLP width read off timm's model)."""
    shapes = FrozenBackbone(timm_name, img_size=64, **overrides).encoder.state_dict()
    hidden = shapes["blocks.0.mlp.fc1_g.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0]
    cfg = transformers.DINOv3ViTConfig(hidden_size=384, intermediate_size=hidden, num_hidden_layers=2,
                                       num_attention_heads=6, num_register_tokens=4, patch_size=16, image_size=64,
                                       use_gated_mlp=gated, hidden_act="silu" if gated else "gelu")
    model = transformers.DINOv3ViTModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm_weight = name.endswith(("norm1.weight", "norm2.weight", "norm.weight"))
            p.copy_(0.2 * torch.randn(p.shape, generator=g) + (1.0 if norm_weight else 0.0))
    return model


def hub_keys(state):
    """The key spelling of the Hub files (``save_pretrained``): ``layer.{i}`` without ``model.``."""
    return {k.removeprefix("model."): v for k, v in state.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("spelling", ["hub", "module"])
def test_transformers_dinov3_safetensors_give_transformers_tokens(tmp_path, variant, spelling):
    name, overrides, gated = VARIANTS[variant]
    hf = hf_dinov3(name, overrides, gated)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.layer.0.") for k in state)  # transformers 5 module names
    if spelling == "hub":
        state = hub_keys(state)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    assert read_backbone_state(path)[1] == "hf_dinov3"
    bb = FrozenBackbone(name, weights=str(path), img_size=64, **overrides)
    g = torch.Generator().manual_seed(0)
    for h, w in ((64, 64), (48, 80)):
        x = torch.randn(2, 3, h, w, generator=g).double()
        ours = copy.deepcopy(bb).double()(x)
        with torch.no_grad():
            ref = copy.deepcopy(hf).double()(pixel_values=x).last_hidden_state  # [CLS, registers, patches], normed
        # transformers builds the RoPE tables in fp32 whatever the dtype, as the official model does
        assert_close(ours, ref, FP32_TABLES, f"{variant} tokens at {h}x{w}")


def test_save_pretrained_folder_loads_as_written(tmp_path):
    name, overrides, gated = VARIANTS["plain"]
    hf = hf_dinov3(name, overrides, gated)
    hf.save_pretrained(tmp_path / "hf")
    bb = FrozenBackbone(name, weights=str(tmp_path / "hf" / "model.safetensors"), img_size=64, **overrides)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        ref = copy.deepcopy(hf).double()(pixel_values=x).last_hidden_state
    assert_close(copy.deepcopy(bb).double()(x), ref, FP32_TABLES, "save_pretrained file")


def test_unknown_and_mismatched_keys_are_named():
    name, overrides, gated = VARIANTS["plain"]
    state = hub_keys(hf_dinov3(name, overrides, gated).state_dict())
    with pytest.raises(ValueError, match=r"1 keys with no place in the DINOv3 layout \(e.g. layer.0.attention.qk_norm"):
        hf_dinov3_to_official({**state, "layer.0.attention.qk_norm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="pooler.dense.weight"):
        FrozenBackbone(name, weights={**state, "pooler.dense.weight": torch.ones(3)}, img_size=64, **overrides)
    without_k = {k: v for k, v in state.items() if k != "layer.1.attention.k_proj.weight"}
    with pytest.raises(ValueError, match="layer 1 .* attention weights \\['q', 'v'\\]; expected q, k and v"):
        hf_dinov3_to_official(without_k)
    # a ViT-S/16 file for a deeper model: the architectures are named, not silently truncated
    with pytest.raises(ValueError, match="Hugging Face transformers DINOv3 layout: width 384, 2 blocks.*3 blocks"):
        FrozenBackbone(name, weights=state, img_size=64, depth=3)
    # the biases need the _qkvb variant; the error says so
    with pytest.raises(ValueError, match="_qkvb"):
        FrozenBackbone("vit_small_patch16_dinov3", weights=state, img_size=64, depth=2)
    assert detect_layout(hf_dinov3_to_official(state)) == "dinov3"
