"""The real-pairs benchmark data (bench/real_pairs_data.py): shard writing, the grouped and stratified
split, the zero-shot folder and the cache, on a few synthetic images (no packages needed); and, where
the Debian packages are installed, the real sources' counts."""
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import real_pairs_data as rpd  # noqa: E402

SPEC = dict(rpd.DEFAULTS, min_category=4, min_heldout_per_category=2, shard_size=8)


def _png(color, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    fill = color + (128,) if mode == "RGBA" else color
    Image.new(mode, size, fill).save(buf, format="PNG")
    return buf.getvalue()


def _pairs():
    pairs = []
    for i in range(12):  # two categories of 12 (captions never say the category), distinct images
        pairs.append(rpd.Pair("toy", f"red/{i}", f"a crimson item number {i}", ("bytes", _png((200, 10 * i, 0))),
                              "reds", "red thing"))
        pairs.append(rpd.Pair("toy", f"blue/{i}", f"an azure item number {i} blue thing", ("bytes", _png((0, 10 * i, 200))),
                              "blues", "blue thing"))
    for i in range(16):  # uncategorised pairs, RGBA ones composited on white
        pairs.append(rpd.Pair("toy", f"misc/{i}", f"something else {chr(97 + i)}",
                              ("bytes", _png((10 * i, 100, 100), mode="RGBA" if i % 2 else "RGB")), "misc"))
    pairs.append(rpd.Pair("toy", "bee1", "bee1", ("bytes", _png((1, 2, 3))), "misc"))  # near-duplicate captions:
    pairs.append(rpd.Pair("toy", "bee2", "bee2", ("bytes", _png((3, 2, 1))), "misc"))  # one group, one split
    pairs.append(rpd.Pair("toy", "big", "a big picture", ("bytes", _png((9, 9, 9), size=(900, 600))), "misc"))
    pairs.append(rpd.Pair("toy", "tiny", "a tiny picture", ("bytes", _png((5, 5, 5), size=(8, 8))), "misc"))
    pairs.append(rpd.Pair("other", "dup", "the same red picture", ("bytes", _png((200, 0, 0))), "x", None))
    return pairs


def _read(root, manifest, split):
    return {key: (jpeg, caption, meta) for shard in manifest["splits"][split]
            for key, jpeg, caption, meta in rpd.iter_shard(root / shard)}


def test_build_writes_shards_split_zeroshot_and_manifest(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return _pairs(), {"toy": {"licence": "CC0"}}, {}

    root = tmp_path / "rp"
    m = rpd.build_cached(root, SPEC, make)
    train, held = _read(root, m, "train"), _read(root, m, "heldout")
    assert not set(train) & set(held)
    # 45 candidates: the 8-px one is skipped, the repeated red picture is kept once
    assert len(train) + len(held) == m["counts"]["pairs"] == 43
    assert m["counts"]["skipped"] == {"other: duplicate image": 1, "toy: smaller than 24 px": 1}
    assert m["counts"]["train"] == len(train) and m["counts"]["heldout"] == len(held)
    assert len(m["splits"]["train"]) == (len(train) + 7) // 8  # shards of at most shard_size samples
    for key, (jpeg, caption, meta) in {**train, **held}.items():
        img = Image.open(io.BytesIO(jpeg))
        assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) <= 256
        assert meta["split"] in ("train", "heldout") and "." not in key
    big = next(v for v in {**train, **held}.values() if v[1] == "a big picture")
    assert Image.open(io.BytesIO(big[0])).size == (384, 256)  # short side to 256, aspect kept
    rgba = next(v for v in {**train, **held}.values() if v[1] == "something else b")
    assert Image.open(io.BytesIO(rgba[0])).getpixel((5, 5))[0] > 100  # composited on white, not black
    bees = [v[2]["split"] for v in {**train, **held}.values() if v[1].startswith("bee")]
    assert len(bees) == 2 and bees[0] == bees[1]
    # each category holds out at least min_heldout_per_category; the zero-shot folder is exactly those
    zs = root / "zeroshot" / "classes"
    assert sorted(d.name for d in zs.iterdir()) == ["blue thing", "red thing"]
    for cat in ("blue thing", "red thing"):
        files = {f.stem for f in (zs / cat).glob("*.jpg")}
        assert files == {k for k, v in held.items() if v[2]["category"] == cat}
        assert len(files) >= 2 and m["zeroshot"]["categories"][cat] == len(files)
        assert not files & set(train)
    assert m["zeroshot"]["caption_mentions_category"]["per_category"] == {"blue thing": 1.0, "red thing": 0.0}
    assert json.loads((root / "manifest.json").read_text())["splits"]["seed"] == 0
    # cached: a rerun reads nothing and rewrites nothing
    stamp = (root / m["splits"]["train"][0]).stat().st_mtime_ns
    assert rpd.build_cached(root, SPEC, make) == m and len(calls) == 1
    assert (root / m["splits"]["train"][0]).stat().st_mtime_ns == stamp
    # another seed is another build, with another split
    m2 = rpd.build_cached(root, dict(SPEC, seed=1), make)
    assert len(calls) == 2 and m2["spec"]["seed"] == 1
    assert set(_read(root, m2, "heldout")) != set(held)
    assert not list(root.glob(".partial-*"))


def test_interrupted_build_is_never_taken_for_complete(tmp_path, monkeypatch):
    root = tmp_path / "rp"
    rpd.build_cached(root, SPEC, lambda: (_pairs(), {}, {}))
    real = rpd._write_shards

    def broken(folder, prefix, samples, shard_size):
        if prefix == "heldout":
            raise OSError("disk full")
        return real(folder, prefix, samples, shard_size)

    monkeypatch.setattr(rpd, "_write_shards", broken)
    with pytest.raises(OSError):
        rpd.build_cached(root, dict(SPEC, seed=3), lambda: (_pairs(), {}, {}))
    assert not (root / "manifest.json").exists()  # the old build's marker went first
    assert rpd.cached_manifest(root, SPEC) is None and not list(root.glob(".partial-*"))
    monkeypatch.setattr(rpd, "_write_shards", real)
    m = rpd.build_cached(root, dict(SPEC, seed=3), lambda: (_pairs(), {}, {}))
    assert m["counts"]["pairs"] == 43 and rpd.cached_manifest(root, dict(SPEC, seed=3)) == m


def test_split_is_seeded_grouped_and_stratified():
    pairs = [rpd.Pair("s", str(i), f"thing {chr(97 + i // 26)}{chr(97 + i % 26)}", ("bytes", b""), "t",
                      "cat" if i < 40 else None) for i in range(200)]  # 200 groups of one
    train, held = rpd.split_pairs(pairs, seed=0, heldout_fraction=0.1, min_heldout_per_category=15)
    assert sorted(train + held) == list(range(200))
    assert rpd.split_pairs(pairs, seed=0, heldout_fraction=0.1, min_heldout_per_category=15) == (train, held)
    assert rpd.split_pairs(pairs, seed=1, heldout_fraction=0.1, min_heldout_per_category=15)[1] != held
    assert sum(1 for i in held if pairs[i].category == "cat") >= 15
    assert sum(1 for i in held if pairs[i].category is None) == 16  # 10% of 160


def test_conversion_skips_and_resizes():
    buf = io.BytesIO()
    Image.new("RGBA", (300, 200), (0, 0, 0, 0)).save(buf, format="PNG")
    png = ("bytes", buf.getvalue())
    assert rpd._convert((png, 256, 90, 24, 50_000))[3] == "larger than 0.05 Mpx"
    assert rpd._convert((("bytes", b"not an image"), 256, 90, 24, 10**8))[3] == "unreadable (UnidentifiedImageError)"
    jpeg, _, size, why = rpd._convert((png, 100, 90, 24, 10**8))
    assert why is None and size == (150, 100)
    assert Image.open(io.BytesIO(jpeg)).convert("RGB").getpixel((75, 50)) >= (250, 250, 250)  # transparent -> white
    img = Image.new("RGBA", (120, 120), (255, 0, 0, 255))
    _, size = rpd.to_rgb_jpeg(img, max_side=100, pad=8)  # the margin stays inside max_side
    assert size == (100, 100)


def test_caption_helpers():
    assert rpd.mentions("Two red Flags flying", "flag") and rpd.mentions("a body  parts chart", "body part")
    assert not rpd.mentions("a flagpole", "flag") and not rpd.mentions("A pelican.", "bird")
    assert rpd.group_key("Bee1") == rpd.group_key("bee 2") == "bee"
    assert rpd.group_key("woman farmer") == rpd.group_key("man farmer") == rpd.group_key("farmer")
    assert rpd.group_key("Apple (B and W)") == rpd.group_key("An apple")
    assert rpd.category_for("openclipart", "animals/birds/penguin") == "bird"
    assert rpd.category_for("openclipart", "buildings/furniture") == "furniture"  # the longest prefix wins
    assert rpd.category_for("openclipart", "buildings") == "building"
    assert rpd.category_for("emoji", "animal-bird") == "bird" and rpd.category_for("emoji", "animal") is None


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(rpd.PACKAGES, "no-such-pkg", {"marker": "usr/share/no-such-pkg-anywhere",
                                                       "licence": "x", "copyright_has": "x"})
    with pytest.raises(rpd.MissingPackages, match=r"no-such-pkg: run `apt-get install -y .*`"):
        rpd.locate_packages(cache=tmp_path, names=["no-such-pkg"])


def _have_packages() -> bool:
    try:
        rpd.locate_packages()
    except rpd.MissingPackages:
        return False
    return True


real = pytest.mark.skipif(not _have_packages(), reason=f"needs the Debian packages: {rpd.APT_INSTALL}")


@real
def test_real_sources_counts():
    packages = rpd.locate_packages()
    assert all(p.licence_checked for p in packages.values())
    pairs, _ = rpd.collect_pairs(packages)
    by_source = {s: sum(1 for p in pairs if p.source == s) for s in rpd.SOURCES}
    assert by_source["openclipart"] > 2000 and by_source["tuxpaint"] > 500 and by_source["emoji"] > 1200
    cats = {}
    for p in pairs:
        if p.category:
            cats.setdefault(p.category, []).append(p.caption)
    big = {c: caps for c, caps in cats.items() if len(caps) >= rpd.DEFAULTS["min_category"]}
    assert len(big) >= 20
    named = sum(rpd.mentions(cap, c) for c, caps in big.items() for cap in caps)
    assert named / sum(len(caps) for caps in big.values()) < 0.15  # the captions name their category rarely
    # every kind of image decodes; an emoji renders as one glyph, ZWJ sequences too
    for p in [pairs[0], next(p for p in pairs if p.source == "tuxpaint"),
              next(p for p in pairs if p.source == "emoji" and "\u200d" in p.image[2])]:
        jpeg, digest, size, error = rpd._convert((p.image, 256, 90, 24, 40_000_000))
        assert error is None and min(size) <= 256


@real
@pytest.mark.slow
def test_real_build_counts(tmp_path):
    import time

    root = tmp_path / "real_pairs"
    m = rpd.build_real_pairs(root)
    c = m["counts"]
    assert c["train"] >= 2000 and 0.1 <= c["heldout"] / c["pairs"] <= 0.25
    assert len(m["zeroshot"]["categories"]) >= 20 and min(m["zeroshot"]["categories"].values()) >= 10
    assert m["zeroshot"]["caption_mentions_category"]["zeroshot_fraction"] < 0.15
    assert set(m["sources"]) == {"openclipart", "tuxpaint", "emoji"}
    started = time.time()
    assert rpd.build_real_pairs(root) == m and time.time() - started < 5
