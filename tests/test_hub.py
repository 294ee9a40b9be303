"""The Hugging Face Hub and the open_clip factory, without a network.

``dinotxt push-to-hub --dry-run`` stages what a push uploads (the checkpoint folder and its model
card); that folder is written into a Hub cache laid out as ``huggingface_hub`` lays out downloads
(``models--org--name/{blobs,snapshots/<commit>,refs}``), which ``dinotxt.load`` and
``dinotxt.create_model_and_transforms`` then read with ``HF_HUB_OFFLINE=1`` as ``hf-hub:org/name``.
The upload call itself is ``huggingface_hub``'s (recorded here, not made). The official release
goes through the same factory from local files."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import dinotxt
from dinotxt.cli import main

REPO = "someone/dinotxt-debug"


def populate_hub_cache(cache: Path, repo_id: str, folder: Path, refs=("main",)) -> str:
    """Write ``folder`` into the Hub cache ``cache`` as a snapshot of ``repo_id`` (content-addressed blobs,
    snapshot symlinks, refs naming the commit), as ``huggingface_hub`` stores a download. Returns the commit."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for p in files:
        data = p.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hub cache in offline mode, for this process: huggingface_hub reads HF_HUB_OFFLINE and the
    cache folder when it is imported, so its constants are set as those variables would set them."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def run_folder(trained_debug_run):
    work, _, _ = trained_debug_run
    return work / "runs" / "debug"


@pytest.fixture(scope="module")
def staged(run_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "stage"
    assert main(["push-to-hub", str(run_folder), REPO, "--dry-run", str(out)]) == 0
    return out


def image_batch(n=2, size=64, seed=0):
    from dinotxt.data.world import render_sample

    return [render_sample(seed + i, size).image for i in range(n)]


def test_staged_folder_is_the_checkpoint_and_its_card_is_complete(staged, run_folder):
    ckpt = run_folder / "checkpoint"
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "config.yaml", "metrics.json", "model.safetensors",
                                                        "tokenizer.model"]  # no backbone unless asked
    for name in ("model.safetensors", "config.yaml", "tokenizer.model"):
        assert (staged / name).read_bytes() == (ckpt / name).read_bytes(), name
    card = (staged / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "dinotxt" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "zero-shot-image-classification" and "synthetic-data" in meta["tags"]
    metrics = json.loads((run_folder / "metrics.json").read_text())
    index = meta["model-index"][0]
    assert index["name"] == REPO
    assert index["results"][0]["metrics"][0]["value"] == round(metrics["zeroshot"]["top1"], 4)
    for section in ("## Model", "## Backbone weights", "## Training", "## Evaluation", "## Intended use",
                    "## How to use", "## Files", "## Citation"):
        assert section in body, section
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    assert f"`{cfg['model']['backbone']['name']}` at {cfg['model']['backbone']['img_size']} px" in body  # architecture
    assert "randomly initialised** (seed 0)" in body  # where the backbone weights come from: nowhere
    assert f"{metrics['steps']:,} optimizer steps of batch {cfg['train']['data']['batch_size']}" in body
    assert "procedural demo world" in body and f"{cfg['train']['data']['world']['num_train']:,} synthetic" in body
    # the measured metrics are the run's, as percentages
    zs = metrics["zeroshot"]
    for name, key in (("top-1", "top1"), ("top-5", "top5"), ("mean per-class recall", "mean_per_class_recall")):
        assert f"| {name} | {100 * zs[key]:.1f}% |" in body, name
    assert "Research on vision-language alignment" in body
    # loading in three lines
    snippet = body.split("```python\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert snippet == ["import dinotxt",
                       f'model, preprocess_train, preprocess = dinotxt.create_model_and_transforms("hf-hub:{REPO}")',
                       f'tokenizer = dinotxt.get_tokenizer("hf-hub:{REPO}")']
    assert "@inproceedings{jose2025dinov2meetstext" in body


def test_a_pushed_model_loads_offline_from_the_hub_cache(staged, run_folder, offline_hub):
    populate_hub_cache(offline_hub, REPO, staged)
    local, transform, tok = dinotxt.load(run_folder / "checkpoint")
    model, _, tokenizer = dinotxt.load(f"hf-hub:{REPO}")
    factory, preprocess_train, preprocess = dinotxt.create_model_and_transforms(f"hf-hub:{REPO}")
    captions = ["a red circle", "a photo of a blue star on a striped background"]
    assert torch.equal(tokenizer(captions), tok(captions))
    assert torch.equal(dinotxt.get_tokenizer(f"hf-hub:{REPO}")(captions), tok(captions))
    images = torch.stack([preprocess(im) for im in image_batch()])
    assert torch.equal(images, torch.stack([transform(im) for im in image_batch()]))
    with torch.no_grad():
        want = local.encode_image(images), local.encode_text(tok(captions))
        for m in (model, factory):  # bit-identical to the local checkpoint, through both entry points
            assert torch.equal(m.encode_image(images), want[0]) and torch.equal(m.encode_text(tok(captions)), want[1])
    # the training crop of the run's recipe (data.crop_scale)
    crop = next(t for t in preprocess_train.transforms if type(t).__name__ == "RandomResizedCrop")
    assert crop.scale == (0.5, 1.0) and crop.size == (local.backbone.img_size,) * 2


def test_revisions_and_what_is_not_in_the_cache(staged, offline_hub, capsys):
    commit = populate_hub_cache(offline_hub, REPO, staged, refs=("main", "v1"))
    for name in (f"hf-hub:{REPO}@v1", f"hf-hub:{REPO}@{commit}"):
        assert dinotxt.load(name)[0].embed_dim > 0
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        dinotxt.load(f"hf-hub:{REPO}@v2")
    code = main(["export", "hf-hub:someone/missing", "--format", "safetensors"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "hf-hub:someone/missing is not in the local Hugging Face cache" in err and len(err.splitlines()) == 1
    for bad, message in (("hf-hub:justaname", "org/name"), ("hf-hub:org/name@", "nothing after '@'")):
        with pytest.raises(ValueError, match=message):
            dinotxt.load(bad)


@pytest.mark.slow
def test_command_line_reads_hf_hub_names_with_hf_hub_offline(staged, trained_debug_run, tmp_path, capsys):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, in a fresh process (huggingface_hub reads them at import)."""
    work, _, _ = trained_debug_run
    populate_hub_cache(tmp_path / "home" / "hub", REPO, staged)
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.pop("HF_HUB_CACHE", None)
    classes = work / "runs" / "debug_world" / "eval" / "classes"
    hub = subprocess.run([sys.executable, "-m", "dinotxt.cli", "-q", "eval", "zeroshot", "--checkpoint", f"hf-hub:{REPO}",
                          "--data", str(classes), "--templates", "simple", "--num-workers", "0", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert hub.returncode == 0, hub.stderr[-2000:]
    capsys.readouterr()
    assert main(["-q", "eval", "zeroshot", "--checkpoint", str(work / "runs" / "debug" / "checkpoint"), "--data",
                 str(classes), "--templates", "simple", "--num-workers", "0", "--json"]) == 0
    local = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    res = json.loads(hub.stdout.strip().splitlines()[-1])
    assert res["num_images"] == 48 and res["confusion"] == local["confusion"] and res["top1"] == local["top1"]


def test_push_uploads_the_staged_folder_with_huggingface_hub(run_folder, monkeypatch):
    """The upload is huggingface_hub's create_repo + upload_folder; what they receive is recorded."""
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kw):
        calls["create"] = (repo_id, private, exist_ok, repo_type)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, **kw):
        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kw.get("revision"))
        return type("CommitInfo", (), {"oid": "abc123"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    from dinotxt.checkpoint.push import push_to_hub

    report = push_to_hub(run_folder, REPO, private=True)
    assert calls["create"] == (REPO, True, True, "model")
    assert calls["upload"] == (REPO, ["README.md", "config.yaml", "metrics.json", "model.safetensors", "tokenizer.model"],
                               None)
    assert report["uploaded"] and report["commit"] == "abc123"

    def refused(self, *a, **kw):
        raise huggingface_hub.errors.HfHubHTTPError("401 Client Error: Unauthorized")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refused)
    with pytest.raises(ValueError, match="upload to someone/dinotxt-debug failed.*hf auth login"):
        push_to_hub(run_folder, REPO)


def tiny_checkpoint_with_backbone_file(tmp_path, name="dinov2_vits14_reg4_pretrain.pth"):
    """A checkpoint whose frozen backbone was loaded from a weights file (not a random init)."""
    from conftest import TINY_BACKBONE, TINY_TEXT

    from dinotxt.models import FrozenBackbone

    torch.manual_seed(0)
    source = FrozenBackbone("vit_small_patch14_reg4_dinov2", img_size=56, init_seed=7, **TINY_BACKBONE["kwargs"])
    weights = tmp_path / "weights" / name
    weights.parent.mkdir()
    torch.save({k: v.contiguous() for k, v in source.full_state_dict().items()}, weights)
    model = dinotxt.create_model("dinotxt_demo", backbone={**TINY_BACKBONE, "weights": str(weights)}, text=TINY_TEXT,
                                 vision_head={"num_blocks": 1, "drop_path": 0.0})
    from dinotxt.data.world import render_sample

    tok = dinotxt.train_tokenizer([render_sample(i, 64).caption for i in range(100)], 64, TINY_TEXT["context_length"])
    dinotxt.save_checkpoint(tmp_path / "ckpt", model, tok)
    return tmp_path / "ckpt", weights, model


def test_backbone_file_is_named_in_the_card_or_uploaded_when_asked(tmp_path, offline_hub):
    ckpt, weights, model = tiny_checkpoint_with_backbone_file(tmp_path)
    out = tmp_path / "bare"
    assert main(["push-to-hub", str(ckpt), REPO, "--dry-run", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "backbone.safetensors" not in [p.name for p in out.iterdir()]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"**Not included in this repository.** Bring `{weights.name}`" in card and digest in card
    assert "official DINOv2 release" in card
    assert f'create_model_and_transforms("hf-hub:{REPO}", backbone_weights="/path/to/{weights.name}")' in card
    with_backbone = tmp_path / "full"
    assert main(["push-to-hub", str(ckpt), "other/with-backbone", "--dry-run", str(with_backbone),
                 "--include-backbone"]) == 0
    assert (with_backbone / "backbone.safetensors").is_file()
    assert "`backbone.safetensors` in this repository" in (with_backbone / "README.md").read_text()

    populate_hub_cache(offline_hub, REPO, out)
    populate_hub_cache(offline_hub, "other/with-backbone", with_backbone)
    images = torch.stack([model_transform(im, model) for im in image_batch(size=56)])
    with torch.no_grad():
        want = model.eval().encode_image(images)
        moved = weights.with_name("moved.pth")
        weights.rename(moved)  # the recorded path no longer exists, as on another machine
        with pytest.raises(FileNotFoundError, match="backbone_weights=PATH"):
            dinotxt.load(f"hf-hub:{REPO}")
        for m in (dinotxt.load(f"hf-hub:{REPO}", backbone_weights=str(moved))[0],
                  dinotxt.load("hf-hub:other/with-backbone")[0]):  # the uploaded backbone, nothing to bring
            assert torch.equal(m.encode_image(images), want)


def model_transform(image, model):
    from dinotxt.models.transforms import eval_transform

    return eval_transform(model.backbone.img_size)(image)


def test_license_follows_the_backbone_or_is_given(tmp_path):
    from dinotxt.checkpoint.push import stage_hub_folder

    ckpt, _, _ = tiny_checkpoint_with_backbone_file(tmp_path, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    report = stage_hub_folder(ckpt, tmp_path / "a", REPO)
    assert report["license"] == {"license": "other", "license_name": "dinov3-license",
                                 "license_link": "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"}
    front = yaml.safe_load((tmp_path / "a" / "README.md").read_text().split("---\n")[1])
    assert front["license"] == "other" and front["license_name"] == "dinov3-license"
    assert stage_hub_folder(ckpt, tmp_path / "b", REPO, license="mit")["license"] == {"license": "mit"}
    with pytest.raises(ValueError, match="license-name"):
        stage_hub_folder(ckpt, tmp_path / "c", REPO, license="other")
    with pytest.raises(ValueError, match="not an empty folder"):
        stage_hub_folder(ckpt, tmp_path / "a", REPO)


# ---------------------------------------------------------------------------- the open_clip factory


OPEN_CLIP_README = '''
import torch
from PIL import Image
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms(MODEL_NAME)
model.eval()  # model in train mode by default, impacts some models with BatchNorm or stochastic depth active
tokenizer = open_clip.get_tokenizer(MODEL_NAME)

image = preprocess(Image.open(IMAGE_PATH)).unsqueeze(0)
text = tokenizer(["a diagram", "a dog", "a cat"])

with torch.no_grad(), torch.autocast("cuda"):
    image_features = model.encode_image(image)
    text_features = model.encode_text(text)
    image_features /= image_features.norm(dim=-1, keepdim=True)
    text_features /= text_features.norm(dim=-1, keepdim=True)

    text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)

print("Label probs:", text_probs)
logits = model.logit_scale.exp() * model.encode_image(image, normalize=True) @ model.encode_text(text, normalize=True).T
'''


def test_open_clip_readme_snippet_runs_with_one_changed_import(run_folder, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    image_batch(1)[0].save(photo)
    code = OPEN_CLIP_README.replace("import open_clip", "import dinotxt as open_clip")
    scope = {"MODEL_NAME": str(run_folder / "checkpoint"), "IMAGE_PATH": str(photo)}
    exec(compile(code, "open_clip_readme", "exec"), scope)
    probs = scope["text_probs"]
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(), torch.tensor(1.0))
    assert "Label probs" in capsys.readouterr().out
    model, _, tok = dinotxt.load(run_folder / "checkpoint")
    img = dinotxt.create_model_and_transforms(run_folder / "checkpoint")[2](Image.open(photo))[None]
    with torch.no_grad():
        want = (100 * model.encode_image(img, normalize=True) @ model.encode_text(tok(["a diagram", "a dog", "a cat"]),
                                                                                  normalize=True).T).softmax(-1)
    assert torch.allclose(probs, want, rtol=0, atol=1e-6)
    assert float(scope["model"].logit_scale.detach().exp()) == pytest.approx(
        json.loads((run_folder / "metrics.json").read_text())["logit_scale"], rel=1e-6)


def test_factory_on_a_single_file_and_its_errors(run_folder, tmp_path):
    from dinotxt.checkpoint.export import export_safetensors

    single = Path(export_safetensors(run_folder / "checkpoint", tmp_path / "model_single.safetensors")["out"])
    model, _, preprocess = dinotxt.create_model_and_transforms(single, precision="fp64")
    assert next(model.text.parameters()).dtype == torch.float64
    tok = dinotxt.get_tokenizer(single, context_length=8)
    assert tok(["a red circle"]).shape == (1, 8) and tok(["a red circle"]).dtype == torch.long
    with pytest.raises(TypeError, match="official: names only"):
        dinotxt.create_model_and_transforms(run_folder / "checkpoint", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="precision"):
        dinotxt.create_model_and_transforms(single, precision="fp8")
    with pytest.raises(FileNotFoundError, match="not a dinotxt checkpoint"):
        dinotxt.get_tokenizer(tmp_path)


def test_official_release_through_the_factory_from_local_files(tmp_path, monkeypatch):
    """``official:dinov2_vitl14_reg4_dinotxt``: the release files by their official names in a folder (or in
    torch.hub's checkpoint folder) give exactly what ``load_official`` gives from the same files."""
    from test_official import SMALL_V2
    from test_official_reference import (official_dinov2_state, official_text_encoder_state,
                                         official_vision_head_state, save_pth)

    from dinotxt.checkpoint.official import get_release

    release = get_release("dinov2_vitl14_reg4_dinotxt")
    folder = tmp_path / "release"
    folder.mkdir()
    files = {"backbone": save_pth(official_dinov2_state(dim=384, depth=2, grid=8), folder / release.backbone_file),
             "vision_head": save_pth(official_vision_head_state(dim=384), folder / release.head_files[0]),
             "text_encoder": save_pth(official_text_encoder_state(width=64, depth=2, output_dim=768),
                                      folder / release.head_files[1])}
    ref, ref_transform, ref_tok = dinotxt.load_official(release.name, overrides=SMALL_V2, **files)
    name = "official:dinov2_vitl14_reg4_dinotxt"
    model, _, preprocess = dinotxt.create_model_and_transforms(name, pretrained=folder, overrides=SMALL_V2)
    tokenizer = dinotxt.get_tokenizer(name)
    captions = ["a photo of a cat.", "two dogs playing in the snow"]
    assert torch.equal(tokenizer(captions), ref_tok(captions)) and tokenizer(captions).shape == (2, 77)
    images = torch.stack([preprocess(im) for im in image_batch(size=56)])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref.encode_image(images))
        assert torch.equal(model.encode_text(tokenizer(captions)), ref.encode_text(ref_tok(captions)))
    # the same files where torch.hub.load puts them
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    (tmp_path / "torch_hub").mkdir()
    folder.rename(tmp_path / "torch_hub" / "checkpoints")
    hub_model = dinotxt.create_model_from_pretrained(name, overrides=SMALL_V2)[0]
    with torch.no_grad():
        assert torch.equal(hub_model.encode_image(images), ref.encode_image(images))
    (tmp_path / "torch_hub" / "checkpoints" / release.head_files[0]).unlink()
    with pytest.raises(FileNotFoundError, match=release.head_files[0]):
        dinotxt.create_model_and_transforms(name, overrides=SMALL_V2)
    with pytest.raises(TypeError, match="unknown argument 'vision_heads'"):
        dinotxt.create_model_and_transforms(name, vision_heads="x")
