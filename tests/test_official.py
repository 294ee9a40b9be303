"""The official dino.txt release: files in the official key layout (METHOD.md section 6) load
strictly through dinotxt.load_official and give the embeddings of the independent official
implementation (tests/test_official_reference.py) in float64; export writes them back
bit-identically; wrong files name the mismatch. Small sizes (ViT-S, 2 blocks, 64-wide text)
except the full-size key/shape check, which builds shapes only (meta device)."""
import copy
import json
import math

import pytest
import torch

import dinotxt
from dinotxt.checkpoint import save_checkpoint
from dinotxt.text.clip_bpe import ClipTokenizer
from dinotxt.checkpoint.export import export_official, export_safetensors
from dinotxt.models import TextTower, VisionHead
from dinotxt.checkpoint.official import KEY_MAPS, official_state_dicts
from test_official_reference import (official_dinov2_state, official_dinov2_tokens, official_dinov3_state,
                                     official_dinov3_tokens, official_text_embedding, official_text_encoder_state,
                                     official_vision_embedding, official_vision_head_state, save_pth)

from numerics import assert_close, assert_float64_equal, max_error
from test_backbone_weights import FP32_TABLES

TEXT = {"width": 64, "depth": 2, "heads": 2}
SMALL_V2 = {"backbone": {"name": "vit_small_patch14_reg4_dinov2", "img_size": 56, "kwargs": {"depth": 2}}, "text": TEXT}
SMALL_V3 = {"backbone": {"name": "vit_small_patch16_dinov3", "img_size": 64, "kwargs": {"depth": 2}}, "text": TEXT}
CAPTIONS = ["a photo of a cat.", "two dogs playing in the snow", "a red circle"]


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer()


@pytest.fixture(scope="module")
def dinov2_release(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov2_release")
    sds = {"backbone": official_dinov2_state(dim=384, depth=2, grid=8),
           "vision_head": official_vision_head_state(dim=384),
           "text_encoder": official_text_encoder_state(width=64, depth=2, output_dim=768)}
    paths = {role: save_pth(sd, d / f"{role}.pth") for role, sd in sds.items()}
    return sds, paths


@pytest.fixture(scope="module")
def dinov3_release(tmp_path_factory):
    d = tmp_path_factory.mktemp("dinov3_release")
    backbone = official_dinov3_state(dim=384, depth=2, heads=6, qkv_bias=True)
    head = official_vision_head_state(dim=384, prefix="visual_model.head.blocks", seed=3)
    head = {k if k.startswith("visual_model.") else "visual_model.head." + k: v for k, v in head.items()}
    text = {"text_model." + k: v for k, v in official_text_encoder_state(width=64, depth=2, output_dim=768).items()}
    weights = {**head, **text, "logit_scale": torch.tensor([4.25])}
    return {"backbone": backbone, "weights": weights}, {"backbone": save_pth(backbone, d / "dinov3_vits16.pth"),
                                                        "weights": save_pth(weights, d / "dinotxt.pth")}


def f64(sd):
    return {k: v.double() for k, v in sd.items()}


def _load_v2(paths, **kw):
    return dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", backbone=paths["backbone"], vision_head=paths["vision_head"],
                                 text_encoder=paths["text_encoder"], overrides=SMALL_V2, **kw)


def test_full_size_official_keys_and_shapes_match_method_md():
    cfg = dinotxt.model_config("dinotxt_vitl14_reg4")
    D, t = 1024, cfg.text
    with torch.device("meta"):
        head = VisionHead(D, 5, cfg.vision_head.num_blocks)
        text = TextTower(t.vocab_size, t.context_length, t.width, t.depth, t.heads, t.mlp_ratio, 2 * D)
    trainable = {**{"vision_head." + k: v for k, v in head.state_dict().items()},
                 **{"text." + k: v for k, v in text.state_dict().items()}, "logit_scale": torch.zeros(())}
    files = {role: {k: tuple(v.shape) for k, v in sd.items()} for role, sd in official_state_dicts(trainable).items()}
    expected_head = {"ln_final.weight": (D,), "ln_final.bias": (D,)}
    for i in range(2):
        p = f"block_list.{i}."
        expected_head.update({p + "norm1.weight": (D,), p + "norm1.bias": (D,), p + "attn.qkv.weight": (3072, D),
                              p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,), p + "ls1.gamma": (D,),
                              p + "norm2.weight": (D,), p + "norm2.bias": (D,), p + "mlp.w1.weight": (2752, D),
                              p + "mlp.w1.bias": (2752,), p + "mlp.w2.weight": (2752, D), p + "mlp.w2.bias": (2752,),
                              p + "mlp.w3.weight": (D, 2752), p + "mlp.w3.bias": (D,), p + "ls2.gamma": (D,)})
    W = 1280
    expected_text = {"backbone.token_embedding.weight": (49408, W), "backbone.positional_embedding": (77, W),
                     "backbone.ln_final.weight": (W,), "backbone.ln_final.bias": (W,),
                     "head.linear_projection.weight": (2048, W)}
    for i in range(24):
        p = f"backbone.blocks.{i}."
        expected_text.update({p + "attention_norm.weight": (W,), p + "attention_norm.bias": (W,),
                              p + "attention.qkv.weight": (3840, W), p + "attention.proj.weight": (W, W),
                              p + "attention.proj.bias": (W,), p + "ffn_norm.weight": (W,), p + "ffn_norm.bias": (W,),
                              p + "feed_forward.fc1.weight": (5120, W), p + "feed_forward.fc1.bias": (5120,),
                              p + "feed_forward.fc2.weight": (W, 5120), p + "feed_forward.fc2.bias": (W,)})
    assert files == {"vision_head": expected_head, "text_encoder": expected_text}
    # the DINOv3 release: one file, `blocks` instead of `block_list`, logit_scale of shape (1,)
    v3 = {k: tuple(v.shape) for k, v in official_state_dicts(trainable, "dinov3")["weights"].items()}
    assert v3 == {**{"visual_model.head." + k.replace("block_list", "blocks"): s for k, s in expected_head.items()},
                  **{"text_model." + k: s for k, s in expected_text.items()}, "logit_scale": (1,)}


def test_official_dinov2_release_matches_the_official_implementation(dinov2_release, tokenizer):
    sds, paths = dinov2_release
    model, transform, tok = _load_v2(paths)
    assert isinstance(tok, ClipTokenizer) and model.logit_scale.item() == pytest.approx(math.log(100.0))
    g = torch.Generator().manual_seed(0)
    model64 = copy.deepcopy(model).double()  # float64 on both sides (tests/numerics.py)
    for size in (56, 84):  # 84 px: the position embeddings are resized from the file's 8 x 8 grid
        x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
        tokens = official_dinov2_tokens(f64(sds["backbone"]), x, heads=6)
        ref = official_vision_embedding(f64(sds["vision_head"]), tokens, heads=6, num_registers=4)
        with torch.no_grad():
            ours = model64.encode_image(x)
        assert ours.shape == (2, 768)
        assert_close(ours, ref, FP32_TABLES, f"image embedding at {size} px")
    ids = tok(CAPTIONS)
    ref = official_text_embedding(f64(sds["text_encoder"]), ids, heads=2)
    with torch.no_grad():
        assert_float64_equal(model64.encode_text(ids), ref, "text embedding")


def test_official_dinov3_single_file_matches_the_official_implementation(dinov3_release, tmp_path):
    sds, paths = dinov3_release
    model, _, tok = dinotxt.load_official("dinov3_vitl16_dinotxt", backbone=paths["backbone"], weights=paths["weights"],
                                          overrides=SMALL_V3)
    assert model.config.backbone.name == "vit_small_patch16_dinov3_qkvb"  # the file's qkv biases are non-zero
    assert model.logit_scale.item() == 4.25
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    model64, x64 = copy.deepcopy(model).double(), x.double()  # float64 on both sides (tests/numerics.py)
    tokens = official_dinov3_tokens(f64(sds["backbone"]), x64, heads=6)
    head = {k[len("visual_model.head."):]: v for k, v in sds["weights"].items() if k.startswith("visual_model.head.")}
    ref = official_vision_embedding(f64(head), tokens, heads=6, num_registers=4, prefix="blocks")
    with torch.no_grad():
        assert_close(model64.encode_image(x64), ref, FP32_TABLES, "image embedding")
        text = {k[len("text_model."):]: v for k, v in sds["weights"].items() if k.startswith("text_model.")}
        ids = tok(CAPTIONS)
        assert_float64_equal(model64.encode_text(ids), official_text_embedding(f64(text), ids, heads=2), "text")
    # a file that also carries the backbone (visual_model.backbone.*) needs no separate backbone file
    merged = save_pth({**sds["weights"], **{"visual_model.backbone." + k: v for k, v in sds["backbone"].items()}},
                      tmp_path / "with_backbone.pth")
    again, _, _ = dinotxt.load_official("dinov3_vitl16_dinotxt", weights=merged, overrides=SMALL_V3)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x), model.encode_image(x))


def test_export_official_then_load_is_bit_identical(dinov2_release, dinov3_release, tmp_path):
    for release, (sds, paths), load in (("dinov2", dinov2_release, None), ("dinov3", dinov3_release, None)):
        if release == "dinov2":
            model, _, tok = _load_v2(paths)
        else:
            model, _, tok = dinotxt.load_official("dinov3_vitl16_dinotxt", backbone=paths["backbone"],
                                                  weights=paths["weights"], overrides=SMALL_V3)
        ckpt = save_checkpoint(tmp_path / f"{release}_ckpt", model, tok)
        report = export_official(ckpt, tmp_path / f"{release}_official")
        assert report["layout"] == release and report["tokenizer"]["kind"] == "clip_bpe"
        assert not report["loads_in_official_entry_point"]  # ViT-S / 64-wide text: not the released architecture
        out = tmp_path / f"{release}_official"
        assert json.loads((out / "export.json").read_text())["files"] == report["files"]
        exported = {name: torch.load(out / name, weights_only=True) for name in report["files"]}
        originals = [sds[r] for r in KEY_MAPS[release]]
        for original, name in zip(originals, report["files"]):
            assert set(exported[name]) == set(original), name
            assert all(torch.equal(exported[name][k], original[k]) for k in original), name
        x = torch.randn(2, 3, 56 if release == "dinov2" else 64, 64 if release == "dinov3" else 56)
        ids = tok(CAPTIONS)
        if release == "dinov2":
            files = [str(out / n) for n in report["files"]]
            again, _, _ = dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", backbone=paths["backbone"],
                                                vision_head=files[0], text_encoder=files[1], overrides=SMALL_V2)
        else:
            again, _, _ = dinotxt.load_official("dinov3_vitl16_dinotxt", backbone=paths["backbone"],
                                                weights=str(out / report["files"][0]), overrides=SMALL_V3)
        with torch.no_grad():
            assert torch.equal(again.encode_image(x), model.encode_image(x))
            assert torch.equal(again.encode_text(ids), model.encode_text(ids))


def test_checkpoint_folder_and_single_safetensors_keep_the_clip_tokenizer(dinov3_release, tmp_path):
    sds, paths = dinov3_release
    backbone = tmp_path / "backbone.pth"
    backbone.write_bytes(open(paths["backbone"], "rb").read())
    model, _, tok = dinotxt.load_official("dinov3_vitl16_dinotxt", backbone=str(backbone), weights=paths["weights"],
                                          overrides=SMALL_V3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    assert (ckpt / "bpe_simple_vocab_16e6.txt.gz").is_file() and not (ckpt / "tokenizer.model").exists()
    x, ids = torch.randn(1, 3, 64, 64), tok(CAPTIONS)
    folder_model, _, folder_tok = dinotxt.load(ckpt)
    assert isinstance(folder_tok, ClipTokenizer) and torch.equal(folder_tok(CAPTIONS), ids)
    plain = export_safetensors(ckpt, tmp_path / "model_only.safetensors")
    full = export_safetensors(ckpt, tmp_path / "with_backbone.safetensors", include_backbone=True)
    assert not plain["includes_backbone"] and full["bytes"] > plain["bytes"]
    backbone.unlink()  # the single file with the backbone no longer needs the original file
    with pytest.raises(FileNotFoundError, match="backbone_weights=PATH"):
        dinotxt.load(tmp_path / "model_only.safetensors")
    single, _, single_tok = dinotxt.load(tmp_path / "with_backbone.safetensors")
    assert isinstance(single_tok, ClipTokenizer) and torch.equal(single_tok(CAPTIONS), ids)
    with torch.no_grad():
        # includes the RoPE periods taken from the official file (timm would recompute them)
        assert torch.equal(single.encode_image(x), model.encode_image(x))
        assert torch.equal(single.encode_text(ids), model.encode_text(ids))
        assert torch.equal(folder_model.encode_text(ids), model.encode_text(ids))


def test_wrong_official_files_name_the_mismatch(dinov2_release, tmp_path):
    sds, paths = dinov2_release
    with pytest.raises(ValueError, match=r"vision head file .* \(a text encoder file\) does not fit .*missing \d+ keys "
                                         r"\(e.g. block_list.0.norm1.weight"):
        dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", backbone=paths["backbone"], vision_head=paths["text_encoder"],
                              text_encoder=paths["vision_head"], overrides=SMALL_V2)
    wide = save_pth(official_vision_head_state(dim=768), tmp_path / "vitb_head.pth")
    with pytest.raises(ValueError, match=r"shape mismatches \(e.g. block_list.0.norm1.weight: file \(768,\) vs model "
                                         r"\(384,\)"):
        dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", backbone=paths["backbone"], vision_head=wide,
                              text_encoder=paths["text_encoder"], overrides=SMALL_V2)
    with pytest.raises(ValueError, match="pass backbone=PATH to dinov2_vitl14_reg4_pretrain.pth"):
        dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", vision_head=paths["vision_head"],
                              text_encoder=paths["text_encoder"], overrides=SMALL_V2)
    with pytest.raises(FileNotFoundError, match="text encoder file not found"):
        dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", backbone=paths["backbone"], vision_head=paths["vision_head"],
                              text_encoder=str(tmp_path / "nope.pth"), overrides=SMALL_V2)
    with pytest.raises(ValueError, match="unknown official dino.txt release 'dinov2_vitl14'"):
        dinotxt.load_official("dinov2_vitl14", backbone=paths["backbone"])


def test_official_model_works_with_the_zero_shot_and_dense_api(dinov2_release):
    from PIL import Image

    model, transform, tok = _load_v2(dinov2_release[1])
    classifier = dinotxt.zero_shot_classifier(model, tok, ["cat", "dog", "car"], templates=["a photo of a {}.", "a {}."])
    assert classifier.shape == (3, 768) and torch.allclose(classifier.norm(dim=-1), torch.ones(3))
    image = transform(Image.new("RGB", (90, 70), (200, 30, 30)))[None]
    with torch.no_grad():
        probs = (100 * model.encode_image(image, normalize=True) @ classifier.t()).softmax(-1)
        patches = model.encode_patches(image, normalize=True)
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(), torch.tensor(1.0))
    dense = dinotxt.zero_shot_classifier(model, tok, ["cat", "dog"], templates=["a {}."], half="patch")
    assert patches.shape == (1, 4, 4, 384) and (patches @ dense.t()).shape == (1, 4, 4, 2)
    seg = dinotxt.segment(model, tok, Image.new("RGB", (60, 44)), ["cat", "sky"], templates=["a {}."], mode="slide",
                          short_side=56, window=42, stride=28)
    assert seg.labels.shape == (44, 60) and seg.scores.shape == (2, 44, 60)


def test_cli_export_writes_files_and_reports_errors_in_one_line(dinov2_release, tmp_path, capsys):
    from dinotxt.cli import main

    model, _, tok = _load_v2(dinov2_release[1])
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    assert main(["export", str(ckpt), "--format", "official", "--out", str(tmp_path / "off")]) == 0
    assert (tmp_path / "off" / "dinotxt_vitl14_reg4_vision_head.pth").is_file()
    assert main(["export", str(ckpt), "--format", "safetensors"]) == 0
    assert (tmp_path / "ckpt.safetensors").is_file()
    capsys.readouterr()
    assert main(["export", str(tmp_path / "missing"), "--format", "official"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinotxt: error: ") and "is not a dinotxt checkpoint: it does not exist" in err
    assert "\n" not in err
    assert main(["export", str(ckpt), "--format", "official", "--include-backbone"]) == 2


@pytest.mark.skipif(not __import__("os").environ.get("DINOTXT_FULLSIZE"),
                    reason="full-size official files (3.5 GB, about a minute each on 2 cores): set DINOTXT_FULLSIZE=1")
@pytest.mark.parametrize("release", ["dinov2_vitl14_reg4_dinotxt", "dinov3_vitl16_dinotxt"])
def test_full_size_release_with_the_default_architecture(release, tmp_path, tokenizer):
    """The released sizes end to end: ViT-L backbone at its 37 x 37 (DINOv2) grid, 2 head blocks at
    width 1024, the 24 x 1280 text encoder; no overrides."""
    v3 = release.startswith("dinov3")
    backbone = (official_dinov3_state(dim=1024, depth=24, heads=16, qkv_bias=False) if v3
                else official_dinov2_state(dim=1024, depth=24, grid=37))
    head = official_vision_head_state(dim=1024, prefix="blocks" if v3 else "block_list")
    text = official_text_encoder_state(width=1280, depth=24, output_dim=2048)
    kw = {"backbone": save_pth(backbone, tmp_path / "backbone.pth")}
    if v3:
        kw["weights"] = save_pth({**{"visual_model.head." + k: v for k, v in head.items()},
                                  **{"text_model." + k: v for k, v in text.items()}}, tmp_path / "dinotxt.pth")
    else:
        kw["vision_head"], kw["text_encoder"] = save_pth(head, tmp_path / "h.pth"), save_pth(text, tmp_path / "t.pth")
    model, _, tok = dinotxt.load_official(release, **kw)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    tokens = official_dinov3_tokens(backbone, x, 16) if v3 else official_dinov2_tokens(backbone, x, 16)
    ref = official_vision_embedding(head, tokens, 16, 4, prefix="blocks" if v3 else "block_list")
    ids = tok(CAPTIONS)
    with torch.no_grad():  # fp32 at full size (float64 would need 7 GB): 26 blocks of width 1024-1280 on both
        # sides, summed in other orders; roundoff grows about as u * sqrt(width) * depth, 5e-5 relative
        ours_image, ours_text = model.encode_image(x), model.encode_text(ids)
        ref_text = official_text_embedding(text, ids, heads=20)
    print(f"{release}: image max abs diff {max_error(ours_image, ref):.1e}, text {max_error(ours_text, ref_text):.1e}")
    assert_close(ours_image, ref, 1e-4, "image")
    assert_close(ours_text, ref_text, 1e-4, "text")


@pytest.mark.slow
def test_fine_tune_the_released_model_on_your_own_pairs(dinov2_release, tmp_path, monkeypatch):
    """model.init_from the official DINOv2-release files: step 0 is the official model exactly; a few
    steps later the trained heads export in the official layout, which loads strictly again."""
    from dinotxt.config import load_train_config
    from dinotxt.checkpoint.init_from import apply_init, read_init_source
    from dinotxt.train.run import run_training

    sds, paths = dinov2_release
    overrides = ["model.arch=dinotxt_vitl14_reg4", "model.backbone.name=vit_small_patch14_reg4_dinov2",
                 "model.backbone.img_size=56", "model.backbone.kwargs={depth: 2}", f"model.backbone.weights={paths['backbone']}",
                 "model.text={width: 64, depth: 2, heads: 2}",
                 f"model.init_from=[{paths['text_encoder']},{paths['vision_head']}]",  # either order
                 "optim.max_steps=3", "optim.lr=1e-5", "optim.warmup_steps=1", "trainer.val_every_n_steps=0",
                 "trainer.checkpoint_every_n_steps=0", "data.num_workers=0", "eval.zeroshot_dir=null",
                 "data.world.generate=true", "data.world.root=world", "data.train=world/train",
                 "data.world.num_train=32", "data.world.num_eval=0", "data.world.samples_per_shard=32",
                 "data.world.image_size=64", "data.batch_size=8", "name=finetune"]
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(None, overrides)
    init = read_init_source(cfg.model.init_from)
    assert init.tokenizer_kind == "clip_bpe" and set(init.official) == {"vision_head", "text_encoder"}
    model = dinotxt.create_model(cfg.model)
    apply_init(model, init)  # step 0
    model.eval()  # (no drop path in the comparison)
    official, _, tok = _load_v2(paths)
    x, ids = torch.randn(2, 3, 56, 56), tok(CAPTIONS)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), official.encode_image(x))
        assert torch.equal(model.encode_text(ids), official.encode_text(ids))
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    # a real fine-tune from them, then the official layout again
    run_training(None, overrides)
    run = tmp_path / "runs" / "finetune"
    tuned, _, tuned_tok = dinotxt.load(run / "checkpoint")
    assert isinstance(tuned_tok, ClipTokenizer) and torch.equal(tuned_tok(CAPTIONS), ids)  # it trained with the CLIP BPE
    assert any(not torch.equal(v, official.trainable_state_dict()[k]) for k, v in tuned.trainable_state_dict().items())
    files = export_official(run / "checkpoint", tmp_path / "exported")["files"]
    again, _, _ = dinotxt.load_official("dinov2_vitl14_reg4_dinotxt", backbone=paths["backbone"],
                                        vision_head=tmp_path / "exported" / files[0],
                                        text_encoder=tmp_path / "exported" / files[1], overrides=SMALL_V2)
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids), tuned.encode_text(ids))


def test_init_from_a_text_encoder_alone_and_refuses_a_mismatch(dinov2_release, tmp_path):
    from dinotxt.config import load_train_config
    from dinotxt.checkpoint.init_from import apply_init, read_init_source

    sds, paths = dinov2_release
    base = ["model.arch=dinotxt_vitl14_reg4", "model.backbone.name=vit_small_patch14_reg4_dinov2",
            "model.backbone.img_size=56", "model.backbone.kwargs={depth: 2}", "model.text={width: 64, depth: 2, heads: 2}"]
    cfg = load_train_config(None, base + [f"model.init_from={paths['text_encoder']}"])
    model = dinotxt.create_model(cfg.model)
    head_before = {k: v.clone() for k, v in model.vision_head.state_dict().items()}
    apply_init(model, read_init_source(cfg.model.init_from))
    official, _, tok = _load_v2(paths)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tok(CAPTIONS)), official.encode_text(tok(CAPTIONS)))
    assert all(torch.equal(v, head_before[k]) for k, v in model.vision_head.state_dict().items())  # its own init
    wide = load_train_config(None, [*base[:-1], "model.text={width: 96, depth: 2, heads: 2}",
                                       f"model.init_from={paths['text_encoder']}"])
    with pytest.raises(ValueError, match=r"text encoder file .* does not fit .*shape mismatches"):
        apply_init(dinotxt.create_model(wide.model), read_init_source(wide.model.init_from))


def test_variants_start_from_the_release_with_their_own_weights_at_init(dinov2_release):
    """SigLIP's bias and unlocked backbone blocks are not in the release: model.init_from the official files
    leaves the bias at its init and the unlocked blocks at the backbone's pretrained weights, so step 0 is
    still the official model; a plain checkpoint starts a variant the same way."""
    from dinotxt.config import load_train_config
    from dinotxt.checkpoint.init_from import InitSource, apply_init, read_init_source

    sds, paths = dinov2_release
    cfg = load_train_config(None, [
        "model.arch=dinotxt_vitl14_reg4", "model.backbone.name=vit_small_patch14_reg4_dinov2",
        "model.backbone.img_size=56", "model.backbone.kwargs={depth: 2}", f"model.backbone.weights={paths['backbone']}",
        "model.text={width: 64, depth: 2, heads: 2}", f"model.init_from=[{paths['vision_head']},{paths['text_encoder']}]",
        "loss.kind=sigmoid", "model.backbone.trainable_blocks=1"])
    model = dinotxt.create_model(cfg.model)
    assert {"logit_bias", "unlocked_backbone.encoder.blocks.1.mlp.fc1.weight"} <= model.variant_keys()
    apply_init(model, read_init_source(cfg.model.init_from))
    official, _, tok = _load_v2(paths)
    model.eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), official.encode_image(x))
        assert torch.equal(model.encode_text(tok(CAPTIONS)), official.encode_text(tok(CAPTIONS)))
    assert model.logit_bias.item() == -10.0
    plain = official.trainable_state_dict()
    variant = dinotxt.create_model(cfg.model)
    apply_init(variant, InitSource("checkpoint", [], "clip_bpe", b"", state=plain))
    with torch.no_grad():
        assert torch.equal(variant.eval().encode_image(x), official.encode_image(x))
    with pytest.raises(ValueError, match="missing"):  # a missing key that is not a variant's is still an error
        variant.load_trainable_state_dict({k: v for k, v in plain.items() if k != "logit_scale"}, keep_variants=True)
