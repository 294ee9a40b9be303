import io
import json
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image

from dinotxt.data.sources import _brace_expand, expand_shards, read_manifest
from dinotxt.data.stream import ImageTextStream, collate_image_text


def _jpeg(color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_shard(path, keys, bad=(), empty=(), json_caption=(), png=()):
    with tarfile.open(path, "w") as tar:
        for k in keys:
            img = b"\xff\xd8\xff\xe0 not really a jpeg" if k in bad else _jpeg()
            ext = "png" if k in png else "jpg"
            if k in png:
                buf = io.BytesIO()
                Image.new("RGB", (8, 8)).save(buf, format="PNG")
                img = buf.getvalue()
            _add(tar, f"{k}.{ext}", img)
            if k in json_caption:
                _add(tar, f"{k}.json", json.dumps({"caption": f"caption {k}"}).encode())
            else:
                _add(tar, f"{k}.txt", b"" if k in empty else f"caption {k}".encode())
    return str(path)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_brace_expansion_and_missing_shard(tmp_path):
    assert _brace_expand("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    make_shard(tmp_path / "000.tar", ["a"])
    with pytest.raises(FileNotFoundError, match=r"shard not found: .*001.tar"):
        expand_shards(str(tmp_path / "{000..001}.tar"))
    assert expand_shards(str(tmp_path)) == [str(tmp_path / "000.tar")]


def test_corrupt_image_and_empty_caption_are_skipped_and_counted(tmp_path, capsys):
    shard = make_shard(tmp_path / "s.tar", [f"k{i}" for i in range(6)], bad={"k1"}, empty={"k3"}, json_caption={"k4"},
                       png={"k5"})
    stream = ImageTextStream(shards=[shard], shuffle_buffer=0, rank=0, world_size=1)
    samples = take(stream, 4)
    assert [s["caption"] for s in samples] == ["caption k0", "caption k2", "caption k4", "caption k5"]
    skipped = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    assert skipped["bad_image"] == 1 and skipped["no_caption"] == 1
    out = capsys.readouterr().out
    assert "k1" in out and "bad_image" in out and "no_caption" in out


@pytest.mark.parametrize("cut", [0.5, 0.31])  # at a member boundary, and inside a member's data
def test_truncated_shard_is_counted_not_fatal(tmp_path, cut):
    good = make_shard(tmp_path / "a.tar", ["a0", "a1"])
    data = open(make_shard(tmp_path / "b.tar", ["b0", "b1", "b2"]), "rb").read()
    (tmp_path / "b.tar").write_bytes(data[: int(len(data) * cut)])
    stream = ImageTextStream(shards=[good, str(tmp_path / "b.tar")], shuffle_buffer=0, rank=0, world_size=1)
    samples = take(stream, 6)
    assert {s["caption"] for s in samples} >= {"caption a0", "caption a1"}
    assert sum(s["skipped"].get("corrupt_shard", 0) for s in samples) >= 1


def _keys_for(shards, rank, world, workers, n):
    """Captions each (rank, worker) reader yields in its first epoch."""
    out = {}
    for wid in range(workers):
        stream = ImageTextStream(shards=shards, shuffle_buffer=4, rank=rank * workers + wid,
                                 world_size=world * workers, seed=3)
        out[(rank, wid)] = [s["caption"] for s in take(stream, n)]
    return out


@pytest.mark.parametrize("num_shards", [8, 2])  # more shards than readers, and fewer
def test_readers_split_data_without_duplicates_or_gaps(tmp_path, num_shards):
    per = 24 // num_shards
    shards = [make_shard(tmp_path / f"{s}.tar", [f"s{s}_{i}" for i in range(per)]) for s in range(num_shards)]
    seen = []
    for rank in range(2):
        for _, caps in _keys_for(shards, rank, 2, 2, 6).items():
            seen.extend(caps)
    assert len(seen) == 24 and len(set(seen)) == 24


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    shards = [make_shard(tmp_path / f"{s}.tar", [f"s{s}_{i}" for i in range(10)]) for s in range(3)]
    kw = dict(shards=shards, shuffle_buffer=7, rank=0, world_size=1, seed=1)
    full = [s["caption"] for s in take(ImageTextStream(**kw), 45)]  # crosses epoch boundaries
    assert full == [s["caption"] for s in take(ImageTextStream(**kw), 45)]
    assert sorted(full[:30]) == sorted(f"caption s{s}_{i}" for s in range(3) for i in range(10))
    first = take(ImageTextStream(**kw), 17)
    resumed = take(ImageTextStream(**kw, start_positions={0: first[-1]["position"]}), 28)
    assert [s["caption"] for s in resumed] == full[17:]


def test_manifest_csv_and_parquet(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("image_path,caption\n0.png,zero\n1.png,one\nmissing.png,gone\n2.png,\n")
    rows = read_manifest(str(tmp_path / "m.csv"))
    assert rows[0] == (str(tmp_path / "0.png"), "zero")
    stream = ImageTextStream(manifest=rows, shuffle_buffer=0, rank=0, world_size=1)
    caps = sorted(s["caption"] for s in take(stream, 4))
    assert caps == ["one", "one", "zero", "zero"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_path": ["0.png"], "caption": ["zero"]}), tmp_path / "m.parquet")
    assert read_manifest(str(tmp_path / "m.parquet")) == [(str(tmp_path / "0.png"), "zero")]
    (tmp_path / "bad.csv").write_text("path,text\na,b\n")
    with pytest.raises(ValueError, match="no column 'image_path'"):
        read_manifest(str(tmp_path / "bad.csv"))


def test_collate(tmp_path):
    shard = make_shard(tmp_path / "s.tar", ["a", "b", "c"])
    from dinotxt.models.transforms import train_transform

    stream = ImageTextStream(shards=[shard], transform=train_transform(14, (0.5, 1.0)),
                             tokenizer=lambda caps: torch.ones(len(caps), 5, dtype=torch.long),
                             shuffle_buffer=0, rank=0, world_size=1)
    batch = collate_image_text(take(stream, 3))
    assert batch["image"].shape == (3, 3, 14, 14) and batch["text"].shape == (3, 5)
    assert batch["positions"] == {0: 3}


def test_truncation_inside_a_sample_keeps_every_complete_sample_before_it(tmp_path):
    import tarfile

    from dinotxt.data.sources import iter_tar_samples

    path = make_shard(tmp_path / "c.tar", [f"c{i}" for i in range(5)])
    with tarfile.open(path) as tar:  # cut in the middle of the FIRST member of sample c3
        first_of_c3 = next(m for m in tar.getmembers() if m.name.startswith("c3"))
    data = open(path, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: first_of_c3.offset_data + first_of_c3.size // 2])
    errors = {}
    keys = [s["__key__"] for s in iter_tar_samples(str(tmp_path / "cut.tar"), errors)]
    assert keys == ["c0", "c1", "c2"] and errors == {"corrupt_shard": 1}
