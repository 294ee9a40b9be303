"""Checkpoints: a DinoTxt assembled by hand saves and loads like a factory one; a checkpoint that
names code to run (``subprocess:run``) is refused and runs nothing unless the user opts in."""
from pathlib import Path

import pytest
import torch
import yaml

import dinotxt
from dinotxt.models import DinoTxt, FrozenBackbone, TextTower, VisionHead
from dinotxt.utils.plugins import UntrustedCodeError

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
            for s in ("circle", "square", "star") for b in ("plain", "striped")]


@pytest.fixture(scope="module")
def tokenizer():
    return dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=16)


def hand_built(tokenizer, backbone=None):
    backbone = backbone or FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=56, init_seed=3, depth=1,
                                          embed_dim=96, num_heads=2)
    head = VisionHead(backbone.embed_dim, backbone.num_prefix_tokens, num_blocks=1, num_heads=2, drop_path=0.1)
    text = TextTower(vocab_size=tokenizer.vocab_size, context_length=16, width=32, depth=1, heads=2,
                     output_dim=head.output_dim)
    return DinoTxt(backbone, head, text)


def test_hand_built_model_saves_and_loads(tmp_path, tokenizer):
    model = hand_built(tokenizer).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # a trained value, not the init
    dinotxt.save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, transform, tok = dinotxt.load(tmp_path / "ckpt")
    assert loaded.config.arch == "" and loaded.config.backbone.init_seed == 3
    x, ids = torch.randn(2, 3, 56, 56), tok(CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))  # backbone rebuilt from its seed
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    assert loaded.logit_scale.item() == 3.0 and transform(__import__("PIL.Image").Image.new("RGB", (80, 60))).shape[-1] == 56


def test_a_backbone_nothing_can_rebuild_is_a_clear_error_before_anything_is_written(tmp_path, tokenizer):
    import timm

    module = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56, depth=1)
    model = hand_built(tokenizer, FrozenBackbone(module=module))
    with pytest.raises(ValueError, match="passed as a ready module"):
        dinotxt.save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    weights = FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=56, depth=1).encoder.state_dict()
    model = hand_built(tokenizer, FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=weights, img_size=56, depth=1))
    with pytest.raises(ValueError, match="state dict, not a file"):
        dinotxt.save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture
def malicious_checkpoint(tmp_path, tokenizer):
    """A checkpoint whose config names ``subprocess:run`` as its backbone factory, as a stranger could."""
    dinotxt.save_checkpoint(tmp_path / "ckpt", hand_built(tokenizer), tokenizer)
    marker = tmp_path / "pwned"
    config = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())
    config["model"]["backbone"].update(name="subprocess:run", kwargs={"args": ["touch", str(marker)]})
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "ckpt", marker


def test_checkpoint_naming_code_is_refused_and_runs_nothing(malicious_checkpoint, capsys):
    from dinotxt.cli import main

    ckpt, marker = malicious_checkpoint
    with pytest.raises(UntrustedCodeError, match=r"subprocess:run.*trust_code=True"):
        dinotxt.load(ckpt)
    assert not marker.exists()
    image = ckpt.parent / "photo.png"
    __import__("PIL.Image").Image.new("RGB", (64, 48)).save(image)
    for args in (["eval", "zeroshot", "--checkpoint", str(ckpt), "--data", str(ckpt)],
                 ["segment", str(image), "--checkpoint", str(ckpt), "--labels", "a,b"],
                 ["export", str(ckpt), "--format", "safetensors", "--include-backbone"]):
        rc, err = main(args), capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "subprocess:run" in err and "--trust-code" in err
        assert not marker.exists()
    # the opt-in is real: with it the file's code runs (and then fails, as it builds no module)
    with pytest.raises(TypeError, match="did not build an nn.Module"):
        dinotxt.load(ckpt, trust_code=True)
    assert marker.exists()


def test_suite_loader_named_by_a_recipe_is_refused(tmp_path):
    from dinotxt.evaluation.suite import run_suite

    marker = tmp_path / "pwned"
    recipe = tmp_path / "suite.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"loader": "subprocess:run", "loader_kwargs": {"args": ["touch", str(marker)]}},
        "tasks": [{"task": "zeroshot", "dataset": "folder", "root": str(tmp_path)}]}))
    (tmp_path / "cls").mkdir()
    Image = __import__("PIL.Image").Image
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "a.png")
    with pytest.raises(UntrustedCodeError, match="model.loader='subprocess:run'"):
        run_suite(str(recipe))
    assert not marker.exists()


def test_registered_timm_names_need_no_opt_in(tmp_path, tokenizer):
    dinotxt.save_checkpoint(tmp_path / "ok", hand_built(tokenizer), tokenizer)
    assert Path(dinotxt.load(tmp_path / "ok")[0].config.backbone.name).name == "vit_small_patch14_reg4_dinov2"
