"""dinotxt in the CLIP tools: CLIP_benchmark's own command line scores a dinotxt checkpoint with the
numbers ``dinotxt eval`` gives on the same images, and ``dinotxt embed`` writes clip-retrieval's
embedding folders, which faiss indexes.

The checkpoint is the tiny trained run of conftest's ``trained_debug_run``; the images a held-out
split of the demo world (24 single-object images with 24 distinct captions, so no two texts tie:
CLIP_benchmark breaks ties by index, dinotxt counts them as hits)."""
import json
import os

import numpy as np
import pytest
import torch

from dinotxt.cli import main
from dinotxt.data.world import write_split

pytest.importorskip("clip_benchmark")  # the [benchmark] extra, in [dev]
TEMPLATES = ["a photo of a {}.", "a {} shape."]


@pytest.fixture(scope="module")
def checkpoint(trained_debug_run):
    work, _, _ = trained_debug_run
    return work / "runs" / "debug" / "checkpoint"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecosystem")
    write_split(root / "eval", 24, seed=3, size=64, samples_per_shard=10, max_objects=1, image_folder=True)
    (root / "templates.txt").write_text("".join(t + "\n" for t in TEMPLATES))
    return root


def run_cli(capsys, *args):
    capsys.readouterr()
    assert main(["-q", *[str(a) for a in args]]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def clip_benchmark(out_json, *args):
    """CLIP_benchmark's own command line (``clip_benchmark eval ...``) with ``--model_type dinotxt`` registered;
    ``--no_amp``: fp32 on CPU, as dinotxt eval runs."""
    from dinotxt.evaluation.clip_benchmark import main as clip_benchmark_main

    assert clip_benchmark_main(["eval", "--model_type", "dinotxt", "--no_amp", "--num_workers", "0", "--batch_size", "8",
                                "--output", str(out_json), "--quiet", *[str(a) for a in args]]) == 0
    return json.loads(out_json.read_text())["metrics"]


def test_clip_benchmark_zero_shot_equals_dinotxt_eval(checkpoint, world, tmp_path, capsys):
    from dinotxt.evaluation.clip_benchmark import write_wds_classification

    classes = world / "eval" / "classes"
    info = write_wds_classification(classes, tmp_path / "wds", TEMPLATES)
    assert info == {"root": str(tmp_path / "wds"), "images": 24, "classes": 24, "shards": 1}
    assert (tmp_path / "wds" / "zeroshot_classification_templates.txt").read_text().splitlines() == \
        ["a photo of a {c}.", "a {c} shape."]
    theirs = clip_benchmark(tmp_path / "zs.json", "--pretrained", checkpoint, "--dataset", "wds/dinotxt_world",
                            "--dataset_root", tmp_path / "wds")
    ours = run_cli(capsys, "eval", "zeroshot", "--checkpoint", checkpoint, "--data", classes, "--templates",
                   world / "templates.txt", "--num-workers", "0", "--json")
    assert ours["num_images"] == 24
    for cb, dt in (("acc1", "top1"), ("acc5", "top5"), ("mean_per_class_recall", "mean_per_class_recall")):
        assert theirs[cb] == pytest.approx(ours[dt], abs=1e-6), cb  # fractions of 24 (ours in fp32)
    assert 0 < ours["top5"]  # not a vacuous agreement on zeros


def test_clip_benchmark_retrieval_equals_dinotxt_eval(checkpoint, world, tmp_path, capsys):
    from dinotxt.evaluation.clip_benchmark import write_wds_retrieval

    shards = world / "eval"
    assert write_wds_retrieval(shards, tmp_path / "wds")["texts"] == 24
    theirs = clip_benchmark(tmp_path / "ret.json", "--pretrained", checkpoint, "--dataset", "wds/dinotxt_world",
                            "--dataset_root", tmp_path / "wds", "--task", "zeroshot_retrieval",
                            "--recall_k", "1", "5", "10")
    ours = run_cli(capsys, "eval", "retrieval", "--checkpoint", checkpoint, "--dataset", "shards", "--root", shards,
                   "--num-workers", "0", "--json")
    assert ours["num_texts"] == 24
    for k in (1, 5, 10):
        # CLIP_benchmark: "image retrieval" = text -> image, "text retrieval" = image -> text
        assert theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text_to_image_R@{k}"], abs=1e-6), k
        assert theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image_to_text_R@{k}"], abs=1e-6), k
    assert ours["text_to_image_R@10"] > 0


def test_clip_benchmark_without_a_checkpoint_is_one_line():
    from dinotxt.evaluation.clip_benchmark import load_dinotxt

    with pytest.raises(ValueError, match="pretrained"):
        load_dinotxt("dinotxt", pretrained=None)


# ---------------------------------------------------------------------------- dinotxt embed


def read_parts(out):
    from dinotxt.inference.clip_retrieval import read_embeddings

    return read_embeddings(out)


def test_embed_writes_clip_retrieval_parts_that_faiss_indexes(checkpoint, world, tmp_path, capsys):
    import faiss
    import pyarrow.parquet as pq

    from dinotxt.evaluation.datasets import retrieval_dataset

    out = tmp_path / "emb"
    assert main(["embed", str(checkpoint), "--data", str(world / "eval"), "--out", str(out), "--part-size", "10",
                 "--batch-size", "4", "--dtype", "float32", "--num-workers", "2"]) == 0
    assert "24 samples in 3 parts (3 written now" in capsys.readouterr().out
    # clip-retrieval's names: zero-padded to the digits of the number of parts (3 -> 1 digit)
    assert sorted(os.listdir(out / "img_emb")) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(os.listdir(out / "text_emb")) == ["text_emb_0.npy", "text_emb_1.npy", "text_emb_2.npy"]
    assert sorted(os.listdir(out / "metadata")) == ["metadata_0.parquet", "metadata_1.parquet", "metadata_2.parquet"]
    assert [np.load(out / "img_emb" / f"img_emb_{i}.npy").shape[0] for i in range(3)] == [10, 10, 4]
    table = pq.read_table(out / "metadata" / "metadata_0.parquet")
    assert table.column_names[:2] == ["image_path", "caption"]
    emb = read_parts(out)
    dataset = retrieval_dataset("shards", world / "eval")
    assert emb["metadata"]["caption"] == dataset.texts and emb["metadata"]["key"] == [i.name for i in dataset.items]
    assert emb["img"].dtype == np.float32 and np.allclose(np.linalg.norm(emb["img"], axis=1), 1, atol=1e-6)

    # a flat inner-product index over the captions, queried with every image
    index = faiss.IndexFlatIP(emb["text"].shape[1])
    index.add(emb["text"])
    _, nearest = index.search(emb["img"], 1)
    own_first = float(np.mean(nearest[:, 0] == np.arange(24)))
    ours = run_cli(capsys, "eval", "retrieval", "--checkpoint", checkpoint, "--dataset", "shards", "--root",
                   world / "eval", "--num-workers", "0", "--json")
    assert own_first == pytest.approx(ours["image_to_text_R@1"], abs=1e-9)  # the same ranking, from the files
    # and an index over the images finds each image itself first: rows and files line up
    images = faiss.IndexFlatIP(emb["img"].shape[1])
    images.add(emb["img"])
    assert (images.search(emb["img"], 1)[1][:, 0] == np.arange(24)).all()


def test_embed_resumes_per_part_and_refuses_other_settings(checkpoint, world, tmp_path, capsys):
    out = tmp_path / "emb"
    # parts of 7 over shards of 10: a part spans two shards, a shard holds finished and unfinished parts
    args = ["embed", str(checkpoint), "--data", str(world / "eval"), "--out", str(out), "--part-size", "7",
            "--batch-size", "8", "--num-workers", "0"]
    assert main(args) == 0
    first = read_parts(out)
    assert first["img"].dtype == np.float16  # clip-retrieval's storage
    kept = [(out / "img_emb" / f"img_emb_{i}.npy").stat().st_mtime_ns for i in (0, 2)]
    # an interrupted run: part 1's embeddings written, its metadata (the done marker) not; part 3 gone
    (out / "metadata" / "metadata_1.parquet").unlink()
    for sub in ("img_emb/img_emb_3.npy", "text_emb/text_emb_3.npy", "metadata/metadata_3.parquet"):
        (out / sub).unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "(2 written now" in capsys.readouterr().out
    assert [(out / "img_emb" / f"img_emb_{i}.npy").stat().st_mtime_ns for i in (0, 2)] == kept  # not rewritten
    again = read_parts(out)
    assert np.array_equal(again["img"], first["img"]) and np.array_equal(again["text"], first["text"])
    assert again["metadata"] == first["metadata"]
    assert main(args) == 0 and "(0 written now" in capsys.readouterr().out
    state = json.loads((out / "embed.json").read_text())
    assert sorted(state["parts"]) == ["0", "1", "2", "3"] and state["parts"]["3"]["rows"] == 3

    assert main(args[:-4] + ["--part-size", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds embeddings made with another part size (7 there, 12 now)" in err and len(err.splitlines()) == 1
    assert main(args + ["--dtype", "float32"]) == 2
    assert "another dtype" in capsys.readouterr().err


def test_embed_counts_what_it_cannot_embed(checkpoint, tmp_path):
    """A broken image and a missing caption are skipped and counted in their part; the rest line up."""
    import io
    import tarfile

    from dinotxt.inference.clip_retrieval import embed_dataset

    shard = tmp_path / "data" / "000000.tar"
    shard.parent.mkdir()
    from dinotxt.data.world import render_sample

    with tarfile.open(shard, "w") as tar:
        for i in range(6):
            sample = render_sample(i, 64)
            buf = io.BytesIO()
            sample.image.save(buf, format="JPEG")
            members = {"jpg": b"not a jpeg" if i == 2 else buf.getvalue()}
            if i != 4:
                members["txt"] = sample.caption.encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    report = embed_dataset(str(checkpoint), str(shard.parent), tmp_path / "out", batch_size=4, part_size=4, num_workers=0)
    assert report["samples"] == 4 and report["skipped"] == {"bad_image": 1, "no_caption": 1}
    emb = read_parts(tmp_path / "out")
    assert emb["metadata"]["key"] == ["k0", "k1", "k3", "k5"] and emb["img"].shape[0] == emb["text"].shape[0] == 4
    assert torch.tensor(emb["img"].astype(np.float32)).norm(dim=1).sub(1).abs().max() < 2 ** -9  # fp16 rows
