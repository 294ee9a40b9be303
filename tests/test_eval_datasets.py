"""Shipped class lists and the on-disk dataset layouts (built here in miniature)."""
import numpy as np
import pytest
from PIL import Image

from dinotxt.evaluation.datasets import (COCO_STUFF_RAW_TO_TRAIN_ID, imagenet_names, segmentation_dataset,
                                         zeroshot_folder)
from dinotxt.inference.classifier import load_classnames, load_templates


def test_shipped_lists_have_the_standard_sizes():
    sizes = {"ade20k": 150, "voc21": 21, "pascal_context59": 59, "cityscapes": 19, "coco_stuff171": 171,
             "imagenet": 1000}
    for name, n in sizes.items():
        names = load_classnames(name)
        assert len(names) == n, name
        assert len(set(names)) == n or name == "imagenet", name  # OpenAI's ImageNet names repeat a few
    assert load_classnames("voc21")[0] == "background" and load_classnames("ade20k")[7] == "bed"
    assert len(load_templates("imagenet")) == 80 and len(load_templates("ovseg")) == 14
    names = imagenet_names()
    assert names["n01440764"] == "tench" and names["n15075141"] == "toilet paper"
    assert sorted(COCO_STUFF_RAW_TO_TRAIN_ID.values()) == list(range(171))


def save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def rgb(h=8, w=10):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3))


def test_ade20k_layout_reduces_the_zero_label(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    label = np.tile(np.array([0, 1, 150, 7, 0], dtype=np.uint8).repeat(2), (8, 1))  # 8 x 10
    for k in ("ADE_val_00000001", "ADE_val_00000002"):
        save_png(base / "images" / "validation" / f"{k}.jpg", rgb(8, 10))
        save_png(base / "annotations" / "validation" / f"{k}.png", label)
    data = segmentation_dataset("ade20k", tmp_path)  # the parent of ADEChallengeData2016 works too
    assert len(data) == 2 and len(data.class_names) == 150
    got = data[0].labels
    assert set(np.unique(got)) == {255, 0, 149, 6} and got.dtype == np.int64


def test_voc_context_layouts(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    save_png(voc / "JPEGImages" / "2007_000033.jpg", rgb())
    lab = np.zeros((8, 10), np.uint8)
    lab[2:4, 2:4], lab[0, :] = 15, 255
    img = Image.fromarray(lab, "P")
    img.putpalette([0, 0, 0, 128, 0, 0] * 128)  # VOC labels are palette PNGs: the indices are the classes
    (voc / "SegmentationClass").mkdir()
    img.save(voc / "SegmentationClass" / "2007_000033.png")
    v21, v20 = segmentation_dataset("voc21", tmp_path)[0].labels, segmentation_dataset("voc20", tmp_path)[0].labels
    assert v21[3, 3] == 15 and v21[5, 5] == 0 and v21[0, 0] == 255
    assert v20[3, 3] == 14 and v20[5, 5] == 255
    assert segmentation_dataset("voc21", tmp_path).has_background
    assert segmentation_dataset("voc20", tmp_path).class_names[0] == "aeroplane"

    ctx = tmp_path / "VOCdevkit" / "VOC2010"
    (ctx / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (ctx / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n2008_000003\n")
    for k in ("2008_000002", "2008_000003"):
        save_png(ctx / "JPEGImages" / f"{k}.jpg", rgb())
        save_png(ctx / "SegmentationClassContext" / f"{k}.png", np.full((8, 10), 59))
    c = segmentation_dataset("context59", tmp_path)
    assert len(c) == 2 and len(c.class_names) == 59 and c[1].labels.max() == 58
    (ctx / "JPEGImages" / "2008_000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2008_000003.jpg"):
        segmentation_dataset("context59", tmp_path)


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    ids = np.array([[7, 26, 33, 0, 255]] * 4, np.uint8)
    save_png(tmp_path / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", rgb(4, 5))
    save_png(tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", ids)
    data = segmentation_dataset("cityscapes", tmp_path)
    assert data[0].labels[0].tolist() == [0, 13, 18, 255, 255] and len(data.class_names) == 19


def test_coco_stuff_raw_and_converted_maps(tmp_path):
    raw = np.array([[0, 11, 12, 91, 181, 182, 255]] * 3, np.uint8)
    save_png(tmp_path / "val2017" / "000000000139.jpg", rgb(3, 7))
    save_png(tmp_path / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", raw)
    data = segmentation_dataset("coco_stuff171", tmp_path)
    # raw value = COCO id - 1; id 12 is an unused thing id, 92..182 are stuff, 183 ('other') is ignored
    assert data[0].labels[0].tolist() == [0, 255, 11, 80, 170, 255, 255]
    conv = tmp_path / "mm"
    save_png(conv / "images" / "val2017" / "000000000139.jpg", rgb(3, 7))
    save_png(conv / "annotations" / "val2017" / "000000000139_labelTrainIds.png", np.full((3, 7), 170))
    assert segmentation_dataset("coco_stuff171", conv)[0].labels.max() == 170


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        segmentation_dataset("ade20k", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="ADE20K"):
        segmentation_dataset("ade20k", tmp_path)
    with pytest.raises(ValueError, match="did you mean 'ade20k'"):
        segmentation_dataset("ade20", tmp_path)
    custom = tmp_path / "custom"
    save_png(custom / "images" / "a.png", rgb(8, 10))
    save_png(custom / "labels" / "a.png", np.zeros((8, 9)))  # one column short
    with pytest.raises(ValueError, match="classnames"):
        segmentation_dataset("custom", custom)
    data = segmentation_dataset("custom", custom, classnames=["sky", "road"])
    with pytest.raises(ValueError, match="same size"):
        data[0]
    save_png(custom / "labels" / "a.png", np.full((8, 10), 5))
    with pytest.raises(ValueError, match="class id 5"):
        data[0]
    (tmp_path / "names.txt").write_text("# comment only\n\n")
    with pytest.raises(ValueError, match="empty"):
        segmentation_dataset("custom", custom, classnames=str(tmp_path / "names.txt"))
    base = tmp_path / "ade" / "ADEChallengeData2016"
    save_png(base / "images" / "validation" / "x.jpg", rgb())
    save_png(base / "annotations" / "validation" / "x.png", np.zeros((8, 10)))
    with pytest.raises(ValueError, match="150 classes"):
        segmentation_dataset("ade20k", tmp_path / "ade", classnames=["a", "b"])


def test_imagenet_layout_names_synset_folders(tmp_path):
    for wnid in ("n01443537", "n01440764"):
        save_png(tmp_path / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG", rgb())
    folder, names = zeroshot_folder("imagenet", tmp_path)
    assert folder.endswith("val") and names == ["tench", "goldfish"]  # sorted synset order
    (tmp_path / "val" / "cats").mkdir()
    with pytest.raises(ValueError, match="not a WordNet synset"):
        zeroshot_folder("imagenet", tmp_path)
    with pytest.raises(FileNotFoundError):
        zeroshot_folder("imagenet", tmp_path / "missing")
