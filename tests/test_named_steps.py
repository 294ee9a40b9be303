"""Issue 23's two defects, found while breaking long functions into named steps:

* the segmentation overlay paints a class whose name names a colour in a shade of that colour (its
  regions, its name and its legend swatch), never in another colour ("blue triangle" was yellow);
* ``dinotxt embed`` counts the samples of ``pipe:`` and URL shards (it counted 0: the part layout
  then overlapped, or a source of streamed shards only had "no samples") and writes for them exactly
  what it writes for the same shards on disk, resumes without reading them again, and stops when a
  streamed shard holds more samples than it counted.
"""
import colorsys
import functools
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinotxt
from conftest import TINY_BACKBONE, TINY_TEXT
from dinotxt.data.world import COLORS, class_names, render_sample, write_split

# ---------------------------------------------------------------------------- overlay colours


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0]


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def _named_colour(rgb) -> str:
    """The demo world's colour word whose object colour is nearest in hue to ``rgb``."""
    return min(COLORS, key=lambda word: _hue_distance(_hue(rgb), _hue(COLORS[word])))


def _stripes(names):
    """A label map with one vertical stripe per class, over a grey photograph."""
    labels = np.repeat(np.arange(len(names))[None, :], 48, 0).repeat(16, 1)
    return Image.new("RGB", (labels.shape[1], labels.shape[0]), (128, 128, 128)), labels


@pytest.mark.parametrize("with_background", [False, True])
def test_overlay_colours_agree_with_the_colour_words_of_the_class_names(tmp_path, with_background):
    from dinotxt.inference.visualize import MIN_SIDE, overlay_segmentation, save_image

    names = (["background"] if with_background else []) + class_names()  # "red circle" ... "orange star"
    image, labels = _stripes(names)
    picture = overlay_segmentation(image, labels, names, alpha=1.0, max_legend=len(names))
    path = save_image(picture, tmp_path / "overlay.png")
    picture = np.asarray(Image.open(path).convert("RGB"))
    scale = int(np.ceil(MIN_SIDE / min(labels.shape)))  # small label maps are enlarged
    big = np.repeat(np.repeat(labels, scale, 0), scale, 1)
    shown, legend = picture[:big.shape[0], :big.shape[1]], picture[:, big.shape[1]:]
    colours = {}
    for cls, name in enumerate(names):
        if name == "background":
            continue
        pixels, counts = np.unique(shown[big == cls], axis=0, return_counts=True)
        colour = tuple(int(v) for v in pixels[np.argmax(counts)])  # the tint (alpha 1), less outline and name
        assert (np.abs(legend.astype(int) - colour).max(-1) == 0).sum() > 50, f"{name}: no legend swatch"
        word = name.split()[0]
        assert _named_colour(colour) == word, f"{name!r} is drawn in {colour}, a shade of {_named_colour(colour)}"
        assert _hue_distance(_hue(colour), _hue(COLORS[word])) < 25 / 360, name
        colours[name] = colour
    assert len(set(colours.values())) == len(colours)  # the four classes of one colour stay apart


def test_class_palette_rule():
    from dinotxt.inference.visualize import class_palette, colour_word, label_palette

    plain = [f"segment {i}" for i in range(30)]
    assert np.array_equal(class_palette(plain), label_palette(30))  # no colour word: the palette as before
    assert colour_word("Blue Triangle") == "blue" and colour_word("crimson ring") == "crimson"
    assert colour_word("redwood") is None and colour_word("background") is None
    names = ["background", "red circle", "cat", "blue car", "dog", "yellow star", "grey cat", "black dog",
             "white horse", "(ignored)"]
    palette = class_palette(names)
    hsv = [colorsys.rgb_to_hsv(*(c / 255 for c in rgb)) for rgb in palette]
    named = {"red": 0.0, "blue": 225 / 360, "yellow": 56 / 360}
    for i, name in enumerate(names):
        word = colour_word(name)
        if word in named:
            assert _hue_distance(hsv[i][0], named[word]) < 0.03 and hsv[i][1] > 0.4, name
        elif word in ("grey", "black", "white"):
            assert hsv[i][1] == 0.0, name
        else:  # the others keep away from the hues the names use
            assert min(_hue_distance(hsv[i][0], h) for h in named.values()) >= 20 / 360, name
    assert hsv[7][2] < hsv[6][2] < hsv[8][2]  # black darker than grey, grey darker than white
    assert len({tuple(c) for c in palette}) == len(names)


def test_a_tint_shows_on_an_object_of_its_own_colour(tmp_path):
    """The readability of ``test_overlay_is_readable`` with the name-aware colours: a red circle labelled
    "red circle" is tinted (a lighter or darker red), not painted over in its own colour."""
    from dinotxt.inference.visualize import class_palette, overlay_segmentation

    sample = render_sample(7, 128, 2)  # a red circle and a blue star over dots
    names = ["background"] + class_names()
    back = np.asarray(overlay_segmentation(sample.image, sample.labels, names)).astype(int)
    scale = back.shape[0] // 128
    photo = np.asarray(sample.image.resize((128 * scale, 128 * scale), Image.BICUBIC)).astype(int)
    big = np.repeat(np.repeat(sample.labels, scale, 0), scale, 1)
    shown = back[:, : 128 * scale]
    for cls in set(np.unique(sample.labels)) - {0}:
        mask = big == cls
        colour = class_palette(names)[cls].astype(int)
        mixed = shown[mask].mean(0)
        assert np.abs(mixed - colour).max() > 20 and np.abs(mixed - photo[mask].mean(0)).max() > 20, names[cls]
        assert _named_colour(colour) == names[cls].split()[0]


# ---------------------------------------------------------------------------- dinotxt embed on streamed shards


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny checkpoint: embeddings need a model, not a good one."""
    root = tmp_path_factory.mktemp("named_steps_ckpt")
    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                                 vision_head={"num_blocks": 1, "drop_path": 0.0})
    tok = dinotxt.train_tokenizer([render_sample(i, 32).caption for i in range(60)], 64, TINY_TEXT["context_length"])
    return str(dinotxt.save_checkpoint(root / "ckpt", model, tok))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 5, 5 and 3 captioned images (000000.tar ... 000002.tar)."""
    return [str(s) for s in write_split(tmp_path_factory.mktemp("named_steps_data") / "train", 13, seed=1, size=32,
                                        samples_per_shard=5)]


def _pipe(path) -> str:
    return f"pipe:cat {shlex.quote(str(path))}"


def _files(out: Path):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _embed(checkpoint, data, out, **kw):
    from dinotxt.inference.clip_retrieval import embed_dataset

    report = embed_dataset(checkpoint, data, out, **{"batch_size": 3, "part_size": 4, "num_workers": 0, "device": "cpu",
                                                     **kw})
    report.pop("seconds")
    report.pop("out")
    return report


def test_embed_counts_a_pipe_shard(tiny_checkpoint, shards, tmp_path):
    report = _embed(tiny_checkpoint, [_pipe(shards[0])], tmp_path / "pipe")
    assert report == {"parts": 2, "parts_written": 2, "samples": 5, "skipped": {}}
    state = json.loads((tmp_path / "pipe" / "embed.json").read_text())
    assert [d["samples"] for d in state["settings"]["data"]] == [5]
    assert {k: p["rows"] for k, p in state["parts"].items()} == {"0": 4, "1": 1}


def test_embed_of_pipe_and_url_shards_equals_the_files(tiny_checkpoint, shards, tmp_path):
    from test_remote_shards import _Quiet, _serve

    server, base = _serve(functools.partial(_Quiet, directory=str(Path(shards[0]).parent)))
    try:
        streamed = [shards[0], _pipe(shards[1]), f"{base}/{Path(shards[2]).name}"]  # file, pipe:, URL
        want = _embed(tiny_checkpoint, shards, tmp_path / "files", num_workers=2)
        got = _embed(tiny_checkpoint, streamed, tmp_path / "streamed", num_workers=2)
    finally:
        server.shutdown()
    assert got == want == {"parts": 4, "parts_written": 4, "samples": 13, "skipped": {}}
    state = json.loads((tmp_path / "streamed" / "embed.json").read_text())
    assert [d["samples"] for d in state["settings"]["data"]] == [5, 5, 3]
    assert _files(tmp_path / "streamed") == _files(tmp_path / "files")  # byte for byte, embed.json included


def test_a_rerun_takes_the_counts_of_streamed_shards_from_embed_json(tiny_checkpoint, shards, tmp_path, monkeypatch):
    import dinotxt.inference.clip_retrieval as clip_retrieval

    data = [_pipe(s) for s in shards]
    out = tmp_path / "emb"
    _embed(tiny_checkpoint, data, out)
    first = _files(out)
    (out / "metadata" / "metadata_1.parquet").unlink()  # an interrupted run: part 1 not finished

    def read_twice(unit):
        raise AssertionError(f"{unit.path} counted again")

    monkeypatch.setattr(clip_retrieval, "_count_streamed", read_twice)
    assert _embed(tiny_checkpoint, data, out)["parts_written"] == 1
    assert _files(out) == first

    # a streamed shard that now holds more samples than recorded would shift every later part: it stops
    state = json.loads((out / "embed.json").read_text())
    state["settings"]["data"][1]["samples"] = 4
    (out / "embed.json").write_text(json.dumps(state))
    (out / "metadata" / "metadata_1.parquet").unlink()  # so that shard 000001.tar is read again
    with pytest.raises(ValueError, match="000001.tar now holds more than the 4 samples counted for it"):
        _embed(tiny_checkpoint, data, out)
