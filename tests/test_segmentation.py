"""Dense inference (slide / whole) and the pictures made from it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinotxt.data.world import class_names, render_sample
from dinotxt.inference.dense import (dense_classifier, dense_probabilities, forwards_per_image, predict_labels, prepare_image,
                                  resized_short_side, segment, window_grid)
from dinotxt.inference.settings import DenseSettings
from dinotxt.inference.visualize import heatmap_sheet, class_palette, overlay_segmentation, save_image
from numerics import assert_float64_equal


def fake_tokenizer(texts):
    """Deterministic ids per text, so equal texts embed equally."""
    out = torch.zeros(len(texts), 16, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [1 + (ord(c) % 90) for c in t[:14]]
        out[i, : len(ids)] = torch.tensor(ids)
        out[i, len(ids)] = 99  # EOT = the largest id
    return out


def random_classifier(model, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_classes, model.vision_head.dim, generator=g), dim=-1)


def random_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("h,w,window,stride", [(512, 683, 384, 192), (100, 700, 384, 192), (384, 384, 384, 192),
                                               (70, 50, 384, 192), (1000, 513, 300, 100)])
def test_window_grid_covers_the_image_with_equal_windows(h, w, window, stride):
    boxes = window_grid(h, w, window, stride)
    cover = np.zeros((h, w), dtype=int)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (min(window, h), min(window, w))
        assert 0 <= y1 and y2 <= h and 0 <= x1 and x2 <= w
        cover[y1:y2, x1:x2] += 1
    assert cover.min() >= 1
    # mmsegmentation's grid size
    rows = max(h - window + stride - 1, 0) // stride + 1
    cols = max(w - window + stride - 1, 0) // stride + 1
    assert len(boxes) == rows * cols


def test_official_geometry_counts_forwards():
    assert resized_short_side(480, 640) == (512, 682)
    assert forwards_per_image(480, 640, DenseSettings(mode="whole")) == 1
    assert forwards_per_image(480, 640) == 2 * 3  # 512 x 682: 2 rows, 3 columns of 384 windows at stride 192
    with pytest.raises(ValueError, match="stride"):
        window_grid(100, 100, 50, 60)


def test_slide_equals_whole_when_the_image_fits_one_window(tiny_model):
    model = tiny_model.eval()
    x, _ = prepare_image(random_image(70, 98), short_side=None)
    clf = random_classifier(model, 5)
    whole = dense_probabilities(model, x, clf, DenseSettings(mode="whole"))
    slide = dense_probabilities(model, x, clf, DenseSettings(mode="slide", window=384, stride=192))
    assert torch.equal(whole, slide)
    assert torch.allclose(whole.sum(0), torch.ones(70, 98), atol=1e-5)


def test_slide_equals_the_plain_per_window_average(tiny_model):
    """The batched accumulation against a naive loop over windows (sizes not multiples of the patch)."""
    model = tiny_model.double().eval()  # the same mathematics: float64 on both sides (tests/numerics.py)
    x, _ = prepare_image(random_image(60, 130, seed=1), short_side=None)
    x, clf = x.double(), random_classifier(model, 4, seed=1).double()
    fast = dense_probabilities(model, x, clf, DenseSettings(window=50, stride=30, batch_size=3, logit_scale=10.0))
    total, visits = torch.zeros(4, 60, 130, dtype=torch.float64), torch.zeros(60, 130, dtype=torch.float64)
    for y1, y2, x1, x2 in window_grid(60, 130, 50, 30):
        crop = x[:, :, y1:y2, x1:x2]
        resized = F.interpolate(crop, size=(56, 56), mode="bicubic", align_corners=False)  # 50 -> 4 patches of 14
        patches = F.normalize(model.encode_patches(resized), dim=-1)[0]
        cosine = torch.einsum("hwd,cd->chw", patches, clf)
        cosine = F.interpolate(cosine[None], size=(50, 50), mode="bilinear", align_corners=False)[0]
        total[:, y1:y2, x1:x2] += (10.0 * cosine).softmax(0)
        visits[y1:y2, x1:x2] += 1
    assert_float64_equal(fast, total / visits, "slide")
    assert not torch.allclose(fast, dense_probabilities(model, x, clf, DenseSettings(mode="whole", logit_scale=10.0)), atol=1e-3)


def test_dense_classifier_uses_the_patch_half(tiny_model):
    model = tiny_model.double().eval()
    names, templates = ["red circle", "blue star"], ["a photo of a {}.", "a {} on a plain background"]
    clf = dense_classifier(model, fake_tokenizer, names, templates)
    d = model.vision_head.dim
    for i, name in enumerate(names):
        feats = model.encode_text(fake_tokenizer([t.format(name) for t in templates]))[:, d:]
        expected = F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1)
        assert_float64_equal(clf[i], expected, name)


def test_segment_returns_maps_at_the_image_size_and_applies_the_background_threshold(tiny_model):
    model = tiny_model.eval()
    image = random_image(90, 120, seed=2)
    res = segment(model, fake_tokenizer, image, ["cat", "grass", "sky"], templates="simple", short_side=112)
    assert res.labels.shape == (90, 120) and res.scores.shape == (3, 90, 120)
    assert res.class_names == ["cat", "grass", "sky"] and int(res.labels.max()) < 3
    assert torch.equal(res.labels, res.scores.argmax(0))
    none = segment(model, fake_tokenizer, image, ["cat", "grass"], templates="simple", background_threshold=1.01)
    assert none.class_names[0] == "background" and int(none.labels.max()) == 0
    probs = torch.tensor([[[0.7, 0.2]], [[0.3, 0.8]]])
    assert predict_labels(probs, 0.75).tolist() == [[0, 2]]
    assert predict_labels(probs).tolist() == [[0, 1]]


def test_segment_errors_say_what_to_fix(tiny_model):
    with pytest.raises(ValueError, match="empty label list"):
        segment(tiny_model, fake_tokenizer, random_image(40, 40), [])
    with pytest.raises(ValueError, match="empty"):
        segment(tiny_model, fake_tokenizer, random_image(40, 40), ["cat", ""])
    with pytest.raises(ValueError, match="tokenizer"):
        segment(tiny_model, None, random_image(40, 40), ["cat"])
    with pytest.raises(ValueError, match="mode"):
        segment(tiny_model, fake_tokenizer, random_image(40, 40), ["cat"], mode="tiles")
    with pytest.raises(FileNotFoundError, match="image not found"):
        segment(tiny_model, fake_tokenizer, "/nonexistent/x.jpg", ["cat"])


def test_overlay_is_readable(tmp_path):
    sample = render_sample(7, 128, 2)  # a red circle and a blue star over dots
    names = ["background"] + class_names()
    picture = overlay_segmentation(sample.image, sample.labels, names)
    path = save_image(picture, tmp_path / "overlay.png")
    back = np.asarray(Image.open(path).convert("RGB")).astype(int)
    scale = back.shape[0] // 128  # small images are enlarged for legible text
    assert scale >= 3 and back.shape[1] > 128 * scale  # the legend panel sits right of the image
    photo = np.asarray(sample.image.resize((128 * scale, 128 * scale), Image.BICUBIC)).astype(int)
    big = np.repeat(np.repeat(sample.labels, scale, 0), scale, 1)
    shown = back[:, : 128 * scale]
    # background stays the photograph; objects are tinted but the photograph still shows through
    interior = (big == 0)
    assert np.abs(shown[interior] - photo[interior]).mean() < 12
    for cls in set(np.unique(sample.labels)) - {0}:
        mask = big == cls
        colour = class_palette(names)[cls].astype(int)
        mixed = shown[mask].mean(0)
        assert np.abs(mixed - colour).max() > 20 and np.abs(mixed - photo[mask].mean(0)).max() > 20
    # the legend lists the classes: its swatches carry the class colours
    legend = back[:, 128 * scale:]
    for cls in set(np.unique(sample.labels)) - {0}:
        colour = class_palette(names)[cls]
        assert (np.abs(legend - colour).max(-1) == 0).sum() > 50


def test_heatmap_sheet_and_bad_label_values(tmp_path):
    image = random_image(64, 96)
    scores = torch.rand(5, 64, 96)
    sheet = heatmap_sheet(image, scores, list("abcde"), columns=3, tile=120)
    assert sheet.size == (3 * 120, 28 + 2 * (80 + 24))
    with pytest.raises(ValueError, match="class names"):
        heatmap_sheet(image, scores, list("abc"))
    with pytest.raises(ValueError, match="label values"):
        overlay_segmentation(image, np.full((64, 96), 7), ["a", "b"])


def test_batched_whole_mode_equals_one_image_at_a_time(tiny_model):
    from dinotxt.inference.dense import segment_batch

    model = tiny_model.double().eval()  # batched and single are the same mathematics: float64
    images = [random_image(60, 80, seed=s) for s in range(3)] + [random_image(80, 60, seed=3)]  # mixed sizes
    clf = random_classifier(model, 4, seed=3).double()
    names = list("abcd")
    batched = segment_batch(model, images, clf, names, DenseSettings(mode="whole", short_side=None, batch_size=2))
    for image, res in zip(images, batched):
        single = segment(model, None, image, names, mode="whole", short_side=None, classifier=clf)
        assert_float64_equal(res.scores, single.scores, "scores")
        assert torch.equal(res.labels, single.labels)
    lean = segment_batch(model, images, clf, names, DenseSettings(mode="whole", short_side=None), output_sizes=[(30, 40)] * 4,
                         keep_scores=False)
    assert lean[0].scores is None and lean[0].labels.shape == (30, 40)
