"""Retrieval recall against brute force, and the caption layouts (Karpathy JSON, LAVIS list, shards)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinotxt.evaluation.datasets import retrieval_dataset
from dinotxt.evaluation.retrieval import evaluate_retrieval, retrieval_recall


def brute_force(img, txt, owner, ks):
    """Full argsort of every query's similarities."""
    sim = (img @ txt.t()).numpy()
    out = {}
    for k in ks:
        i2t = [bool(set(np.argsort(-sim[i])[:k]) & set(np.nonzero(owner == i)[0])) for i in range(len(img))]
        t2i = [owner[j] in np.argsort(-sim[:, j])[:k] for j in range(len(txt))]
        out[f"image_to_text_R@{k}"] = float(np.mean(i2t))
        out[f"text_to_image_R@{k}"] = float(np.mean(t2i))
    return out


def test_recall_matches_brute_force_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    n, dim = 40, 16
    captions_per_image = torch.randint(1, 6, (n,), generator=g)  # 1 to 5 captions each
    owner = torch.repeat_interleave(torch.arange(n), captions_per_image)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = F.normalize(img[owner] + 1.2 * torch.randn(len(owner), dim, generator=g), dim=-1)  # noisy captions
    ks = (1, 5, 10)
    got = retrieval_recall(img, txt, owner, ks, chunk=7)
    want = brute_force(img, txt, owner.numpy(), ks)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got["image_to_text_R@1"] < 1 and 0 < got["text_to_image_R@1"] < 1  # a non-trivial case
    assert got == retrieval_recall(img, txt, owner, ks, chunk=1000)
    perfect = retrieval_recall(img, img[owner], owner, ks)
    assert all(v == 1.0 for v in perfect.values())
    with pytest.raises(ValueError, match="outside"):
        retrieval_recall(img, txt, owner + n, ks)


def jpeg(seed=0, size=32):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_karpathy_and_lavis_layouts(tmp_path):
    (tmp_path / "val2014").mkdir()
    for i in range(3):
        (tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(jpeg(i))
    karpathy = {"images": [
        {"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "split": split,
         "sentences": [{"raw": f"image {i} caption {c}"} for c in range(5)]}
        for i, split in enumerate(["test", "test", "train"])]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    data = retrieval_dataset("coco", tmp_path)
    assert len(data) == 2 and len(data.texts) == 10 and data.text_to_image == [0] * 5 + [1] * 5
    lavis = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": [f"a {i}", f"b {i}"]} for i in range(3)]
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(lavis))
    data = retrieval_dataset("coco", tmp_path, annotations=tmp_path / "coco_karpathy_test.json")
    assert len(data) == 3 and data.texts[:2] == ["a 0", "b 0"]
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images"):
        retrieval_dataset("coco", tmp_path)
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        retrieval_dataset("flickr30k", tmp_path)


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def caption_shards(tmp_path):
    write_shard(tmp_path / "000000.tar", [
        ("a.jpg", jpeg(1)), ("a.txt", b"a red circle\na circle that is red\n"),
        ("b.jpg", jpeg(2)), ("b.json", json.dumps({"caption": ["a blue star", "blue star", " "]}).encode()),
        ("c.jpg", b"not a jpeg"), ("c.txt", b"broken image"),
        ("d.jpg", jpeg(3)), ("d.txt", b"   "),
        ("e.jpg", jpeg(4)), ("e.json", json.dumps({"caption": "a green square"}).encode()),
    ])
    return tmp_path


def test_shards_with_several_captions_skip_and_count_bad_samples(caption_shards):
    data = retrieval_dataset("shards", caption_shards)
    assert [i.name for i in data.items] == ["a", "b", "e"]
    assert data.texts == ["a red circle", "a circle that is red", "a blue star", "blue star", "a green square"]
    assert data.text_to_image == [0, 0, 1, 1, 2]
    assert data.skipped == {"bad_image": 1, "no_caption": 1}


def test_evaluate_retrieval_end_to_end(tiny_model, caption_shards):
    from test_segmentation import fake_tokenizer

    from dinotxt.models.transforms import eval_transform

    data = retrieval_dataset("shards", caption_shards)
    res = evaluate_retrieval(tiny_model.eval(), eval_transform(56), fake_tokenizer, data, batch_size=2)
    assert res["num_images"] == 3 and res["num_texts"] == 5
    assert res["image_to_text_R@5"] == 1.0 and res["text_to_image_R@5"] == 1.0  # only 3 images / 5 texts to rank
    assert 0.0 <= res["image_to_text_R@1"] <= 1.0 and res["chance_R@1"] == pytest.approx(1 / 3)
