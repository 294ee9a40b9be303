import io
import tarfile

import numpy as np
from PIL import Image

from dinotxt.data.world import COLORS, SHAPES, class_index, class_names, render_sample, write_split


def test_render_is_deterministic_and_labelled():
    a, b = render_sample(7), render_sample(7)
    assert a.caption == b.caption and np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert render_sample(8).caption != a.caption or not np.array_equal(render_sample(8).labels, a.labels)
    o = a.objects[0]
    assert o["color"] in a.caption and o["shape"] in a.caption
    ids = set(np.unique(a.labels)) - {0}
    assert 1 + class_index(o["color"], o["shape"]) in ids or len(a.objects) > 1
    assert len(class_names()) == len(COLORS) * len(SHAPES)


def test_object_pixels_have_the_object_colour():
    s = render_sample(3, max_objects=1)
    o = s.objects[0]
    mask = s.labels == 1 + class_index(o["color"], o["shape"])
    assert mask.sum() > 50
    mean = np.asarray(s.image)[mask].mean(0)
    assert np.abs(mean - np.array(COLORS[o["color"]])).max() < 45


def test_shards_in_img2dataset_layout(tmp_path):
    shards = write_split(tmp_path / "w", 10, seed=0, size=32, samples_per_shard=4, image_folder=True)
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    assert {f"{key}.jpg", f"{key}.txt", f"{key}.json", f"{key}.seg.png"} <= set(names)
    with tarfile.open(shards[0]) as tar:
        seg = Image.open(io.BytesIO(tar.extractfile(f"{key}.seg.png").read()))
    assert seg.size == (32, 32)
    assert sum(1 for _ in (tmp_path / "w" / "classes").rglob("*.jpg")) == 10
    assert len(list((tmp_path / "w" / "classes").iterdir())) == len(class_names())


def test_demo_attribute_accuracy_from_confusion():
    from dinotxt.demo.run import attribute_accuracy

    zs = {"classnames": ["red circle", "red star", "blue circle"], "confusion": [[2, 1, 0], [0, 1, 1], [1, 0, 2]]}
    assert attribute_accuracy(zs) == {"color_top1": 0.75, "shape_top1": 0.75}
