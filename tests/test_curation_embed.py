"""Curation, embedding (METHOD.md section 7): a damaged pool's bad samples skipped and counted, the embed
stage reading a pooled feature cache, and clear one-line errors for a text encoder of inconsistent width
and stored embeddings of the wrong width."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from curation_helpers import FAST, QUIET, RECIPE, _cli, _clone, _curate, _one_line_error, _pool_table
from curation_helpers import _one_thread, reference, world  # noqa: F401 (fixtures of this module)


def _damaged_pool(root: Path) -> Path:
    """3 shards of 20: shard 1 with a corrupt JPEG, an empty caption and a sample without image;
    shard 2 truncated inside its 11th sample."""
    from dinotxt.data.world import write_split

    shards = write_split(root, 60, seed=3, size=40, samples_per_shard=20)
    with tarfile.open(shards[1]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    with tarfile.open(shards[1], "w") as tar:
        for m, data in members:
            if m.name == f"{keys[3]}.jpg":
                data = data[:len(data) // 3]  # a truncated JPEG
            elif m.name == f"{keys[5]}.txt":
                data = b"   \n"  # an empty caption
            elif m.name == f"{keys[7]}.jpg":
                continue  # no image at all
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(shards[2]) as tar:
        cut = [m for m in tar.getmembers() if m.name.endswith(".seg.png")][10]
    data = Path(shards[2]).read_bytes()
    Path(shards[2]).write_bytes(data[:cut.offset_data + 50])  # inside the 11th sample's last member
    return root


def test_damaged_pool_skips_and_counts_bad_samples(tmp_path, capsys):
    pool = _damaged_pool(tmp_path / "pool")
    stats = _curate(tmp_path / "out", world=pool, until="embed")["embed"]
    out = capsys.readouterr().out
    assert "000002.tar is corrupt or truncated" in out  # reported, and the run went on
    assert stats["skipped"] == {"no_caption": 1, "no_image": 1, "bad_image": 1, "corrupt_shard": 1}
    assert stats["samples"] == 20 + 17 + 10  # the samples before the damage are kept
    table = _pool_table(tmp_path / "out" / "debug")
    keys = table["key"]
    assert len(set(keys)) == 47 and all(c.strip() for c in table["caption"])
    shard2 = sorted(k for k, u in zip(keys, table["unit"]) if u == 2)
    assert shard2 == [f"000002{i:07d}" for i in range(40, 50)]


def test_embed_stage_reads_a_pooled_feature_cache_instead_of_a_second_backbone_pass(reference, world, tmp_path):
    """One feature-extraction stage: a pooled cache (one eval crop, [CLS, mean(patches)]) of the same backbone and
    shards gives the embed stage's outputs without running the backbone again: the same ids, keys and captions,
    and embeddings equal to the fp16 rounding of the tokens (2**-11 relative, twice: tokens, then embeddings)."""
    from dinotxt.config import load_train_config
    from dinotxt.features.build_cache import build_cache

    train = load_train_config("debug", [f"data.train={world}", f"cache.path={tmp_path / 'cache'}", "data.world.generate=false",
                                        "data.num_workers=0", "cache.tokens=pooled", "cache.augment=false",
                                        "model.vision_head.num_blocks=0", "model.vision_head.final_norm=false",
                                        "model.backbone.img_size=56", "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}"])
    build_cache(train, log=QUIET)
    _curate(tmp_path / "runs", f"embed.from_cache={tmp_path / 'cache'}", *FAST, world=world, until="embed")
    ours, ref = tmp_path / "runs" / "debug" / "embed", reference[0] / "debug" / "embed"
    a, b = _pool_table(tmp_path / "runs" / "debug"), _pool_table(reference[0] / "debug")
    assert a["uid"].tolist() == b["uid"].tolist() and a["key"] == b["key"] and a["caption"] == b["caption"]
    for unit in ("000000", "000003"):
        cached, online = np.load(ours / "image" / f"{unit}.npy"), np.load(ref / "image" / f"{unit}.npy")
        assert cached.shape == online.shape and np.abs(cached.astype(np.float32) - online).max() < 4 * 2.0 ** -11
    # a cache of another kind is refused with the reason
    other = load_train_config("debug", [f"data.train={world}", f"cache.path={tmp_path / 'all'}", "data.world.generate=false",
                                        "data.num_workers=0", "model.backbone.img_size=56",
                                        "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}"])
    build_cache(other, log=QUIET)
    from dinotxt.config import ConfigError

    with pytest.raises(ConfigError, match="tokens='all'"):
        _curate(tmp_path / "runs2", f"embed.from_cache={tmp_path / 'all'}", *FAST, world=world, until="embed")


def test_text_encoder_of_inconsistent_width_is_a_clear_error(reference, world, tmp_path, monkeypatch, capsys):
    (tmp_path / "flaky_encoder.py").write_text(
        "import numpy as np\n"
        "class Encoder:\n"
        "    calls = 0\n"
        "    def encode(self, captions):\n"
        "        Encoder.calls += 1\n"
        "        return np.ones((len(captions), 8 if Encoder.calls == 1 else 16), np.float32)\n"
        "def make():\n"
        "    return Encoder()\n"
        "def nan():\n"
        "    class E:\n"
        "        def encode(self, captions):\n"
        "            return np.full((len(captions), 4), np.nan)\n"
        "    return E()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = _clone(reference[0], tmp_path / "runs", keep=["embed"])
    common = [RECIPE, f"pool.data={world}", f"output_dir={out}", "--until", "embed_text", "--trust-code"]
    rc, _, err = _cli(*common[:-1], "embed.text_encoder=flaky_encoder:make", capsys=capsys)  # no opt-in: refused
    assert "--trust-code" in _one_line_error(rc, err) and "Encoder.calls" not in err
    rc, _, err = _cli(*common, "embed.text_encoder=flaky_encoder:make", capsys=capsys)
    assert "returned embeddings of width 16, but 8 was expected" in _one_line_error(rc, err)
    rc, _, err = _cli(*common, "embed.text_encoder=flaky_encoder:nan", capsys=capsys)
    assert "returned NaN or infinite values" in _one_line_error(rc, err)
    rc, _, err = _cli(*common, "embed.text_encoder=flaky_encoder:missing", capsys=capsys)
    assert "has no attribute 'missing'" in _one_line_error(rc, err)


@pytest.mark.parametrize("bad", ["000001.npy", "000000.npy"])  # shard 0 too: the width recorded by embed is expected
def test_stored_embeddings_of_the_wrong_width_are_a_clear_error(reference, world, tmp_path, capsys, bad):
    out = _clone(reference[0], tmp_path, keep=["embed"])
    shard = out / "debug" / "embed" / "image" / bad
    np.save(shard, np.zeros((len(np.load(shard)), 10), np.float16))
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "--until", "dedup", capsys=capsys)
    line = _one_line_error(rc, err)
    assert f"{bad} has width 10 but 192 was expected" in line
