"""Curation, combine and its outputs (METHOD.md section 7): the combine modes, a finished run's outputs
(embeddings, selections, curated ids, manifest, shards the training stream reads back), and a manifest
(CSV) pool curated into a manifest training reads."""
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curation.combine import combine_selections, uid_key
from curation.store import load_table
from curation.text_balance import EntryMatcher
from curation_helpers import POOL_SIZE, STAGES, _clone, _curate, _kept, _parts, _pool_table
from curation_helpers import _one_thread, reference, world  # noqa: F401 (fixtures of this module)


def test_combine_selections_modes():
    image, text = np.array([1, 4, 5, 9]), np.array([0, 4, 9, 11])
    assert combine_selections(image, text, "intersection").tolist() == [4, 9]
    assert combine_selections(image, text, "union").tolist() == [0, 1, 4, 5, 9, 11]
    assert combine_selections(image, None, "image").tolist() == [1, 4, 5, 9]
    assert combine_selections(None, text, "text").tolist() == [0, 4, 9, 11]
    with pytest.raises(ValueError, match="unknown combine mode"):
        combine_selections(image, text, "xor")


def test_reference_outputs_are_consistent(reference, world):
    out, report = reference
    run = out / "debug"
    pool = _pool_table(run)
    assert len(pool["uid"]) == POOL_SIZE and report["pool"]["samples"] == POOL_SIZE
    # embeddings: float16, [CLS] || mean(patches) of the 96-wide backbone, L2-normalised
    emb = np.concatenate([np.load(p) for p in sorted((run / "embed" / "image").glob("*.npy"))])
    assert emb.dtype == np.float16 and emb.shape == (POOL_SIZE, 192)
    np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    text = np.concatenate([np.load(p) for p in sorted((run / "embed_text").glob("0*.npy"))])
    assert text.shape == (POOL_SIZE, 64)
    kept = _kept(run)
    image_rows, text_rows = _parts(run / "image_balance" / "rows"), _parts(run / "text_balance" / "rows")
    assert set(image_rows) <= set(kept) and set(text_rows) <= set(kept)
    assert len(image_rows) == round(0.5 * len(kept))  # target_size 0.5 of the de-duplicated pool, exactly
    uids = np.load(run / "curated" / "uids.npy")
    final_rows = np.intersect1d(image_rows, text_rows)  # combine.mode=intersection
    assert uids.tolist() == sorted(pool["uid"][final_rows].tolist())
    assert report["kept"] == {"pool": POOL_SIZE, "dedup": len(kept), "image_balance": len(image_rows),
                              "text_balance": len(text_rows), "curated": len(uids)}
    # manifest: one row per curated pair in pool order, with its key, caption and shard
    manifest = load_table(run / "curated" / "manifest.parquet")
    assert manifest["uid"].tolist() == pool["uid"][final_rows].tolist()
    assert manifest["caption"] == [pool["caption"][r] for r in final_rows]
    assert manifest["key"] == [pool["key"][r] for r in final_rows]
    for source, key, caption in zip(manifest["source"], manifest["key"], manifest["caption"]):
        assert Path(source).parent == Path(world)
        with tarfile.open(source) as tar:
            assert tar.extractfile(f"{key}.txt").read().decode() == caption
    # the text balancing only kept pairs matching a (mined) entry
    entries = (run / "text_balance" / "entries.txt").read_text().splitlines()
    match = EntryMatcher(entries)
    assert all(match(pool["caption"][r]) for r in text_rows)
    # image balancing took every leaf's points closest to its centroid first
    leaf = _parts(run / "cluster" / "level1" / "assignment")
    dist2 = _parts(run / "cluster" / "level1" / "dist2")
    picked = np.isin(kept, image_rows)
    for j in np.unique(leaf):
        inside = leaf == j
        if picked[inside].any() and (~picked[inside]).any():
            assert dist2[inside & picked].max() <= dist2[inside & ~picked].min()
    # the balancing made the top-level clusters more uniform
    clusters = report["clusters"]["level 2 (top)"]
    assert clusters["curated"]["normalized_entropy"] > clusters["pool"]["normalized_entropy"]


def test_curated_shards_are_read_back_by_the_training_stream(reference):
    from dinotxt.data import ImageTextStream, expand_shards

    run = reference[0] / "debug"
    uids = np.load(run / "curated" / "uids.npy")
    shards = expand_shards(str(run / "curated" / "shards"))
    assert len(shards) == -(-len(uids) // 32)  # samples_per_shard=32
    with tarfile.open(shards[0]) as tar:
        assert len({n.split(".")[0] for n in tar.getnames()}) == 32
    stream = iter(ImageTextStream(shards=shards, shuffle_buffer=0, rank=0, world_size=1))
    first_epoch = list(itertools.islice(stream, len(uids)))
    assert sorted(s["key"] for s in first_epoch) == sorted(uid_key(u) for u in uids)  # every pair once
    assert all(s["image"].size == (48, 48) and s["caption"] for s in first_epoch)
    assert next(stream)["key"] in {s["key"] for s in first_epoch}  # then the next epoch starts
    manifest = load_table(run / "curated" / "manifest.parquet")
    caption_of = {uid_key(u): c for u, c in zip(manifest["uid"], manifest["caption"])}
    assert all(s["caption"] == caption_of[s["key"]] for s in first_epoch)


@pytest.mark.parametrize("mode", ["union", "image", "text"])
def test_pipeline_combine_modes(reference, world, tmp_path, capsys, mode):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    report, actions = _curate(out, f"combine.mode={mode}", "combine.write_shards=false", "report.plots=false",
                              world=world, capsys=capsys)
    assert [s for s in STAGES if actions[s] == "running"] == ["combine", "report"]
    image_rows, text_rows = _parts(run / "image_balance" / "rows"), _parts(run / "text_balance" / "rows")
    rows = {"union": np.union1d(image_rows, text_rows), "image": image_rows, "text": text_rows}[mode]
    pool = _pool_table(run)
    uids = np.load(run / "curated" / "uids.npy")
    assert uids.tolist() == sorted(pool["uid"][rows].tolist()) and report["kept"]["curated"] == len(rows)
    assert load_table(run / "curated" / "manifest.parquet")["uid"].tolist() == pool["uid"][rows].tolist()
    assert not (run / "curated" / "shards").exists()


def test_manifest_pool_curates_into_a_manifest_training_reads(tmp_path, capsys):
    """A CSV pool (relative and absolute image paths, an identical repeated row) in units of 15 rows:
    the curated manifest carries absolute image paths, the shards the image files and captions."""
    import csv

    from dinotxt.data import read_manifest
    from dinotxt.data.world import render_sample

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(40):
        sample = render_sample(i, 40)
        sample.image.save(tmp_path / "img" / f"{i:03d}.jpg")
        rows.append((f"img/{i:03d}.jpg" if i % 2 else str(tmp_path / "img" / f"{i:03d}.jpg"), sample.caption))
    rows.append(rows[3])
    with open(tmp_path / "pool.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_path", "caption"])
        writer.writerows(rows)
    report = _curate(tmp_path / "out", "pool.manifest_rows_per_unit=15", "cluster.levels=[4,2]",
                     "text_balance.mine_min_count=2", "dedup.threshold=0.999", world=tmp_path / "pool.csv")
    assert report["pool"]["units"] == 3 and report["pool"]["samples"] == 41  # the repeat is its own sample
    run = tmp_path / "out" / "debug"
    manifest = load_table(run / "curated" / "manifest.parquet")
    assert len(manifest["uid"]) == report["kept"]["curated"] > 0
    pairs = read_manifest(str(run / "curated" / "manifest.parquet"))
    assert [p for p, _ in pairs] == manifest["image_path"] and all(Path(p).is_absolute() and Path(p).is_file()
                                                                   for p, _ in pairs)
    caption_of = {str((tmp_path / p).resolve()): c for p, c in rows}
    assert all(caption_of[p] == c for p, c in pairs)
    members = []
    for shard in sorted((run / "curated" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getnames()
    assert sorted(n for n in members if n.endswith(".jpg")) == sorted(f"{uid_key(u)}.jpg" for u in manifest["uid"])
    assert len(members) == 2 * len(manifest["uid"])
