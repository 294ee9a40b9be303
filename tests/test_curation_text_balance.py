"""Curation, MetaCLIP text balancing (METHOD.md section 7): whole-word entry matching, metadata files and
mined metadata, the per-entry cap, and the text_balance stage with a vocabulary file in the pipeline."""
import numpy as np
import pytest

from curation.text_balance import (EntryMatcher, balance, mine_metadata, read_metadata, substring_matches,
                                   uniform_hash)
from curation_helpers import FAST, _clone, _curate, _kept, _parts, _pool_table
from curation_helpers import _one_thread, reference, world  # noqa: F401 (fixtures of this module)


ENTRIES = ["cat", "hot dog", "dog", "new york", "t shirt", "café", "red car"]


@pytest.mark.parametrize("caption,expected", [
    ("A cat sat.", ["cat"]),
    ("Category of concatenated cats", []),      # whole words only
    ("A Hot-Dog stand", ["hot dog", "dog"]),     # punctuation is a separator; a phrase and its word both match
    ("hot dogs and hotdogs", []),
    ("the dog's bowl", ["dog"]),
    ("New   York, NEW YORK!", ["new york"]),     # whitespace and case do not matter
    ("my T-shirt", ["t shirt"]),
    ("Café au lait", ["café"]),
    ("a red_car", ["red car"]),                  # "_" separates words
    ("red, car", ["red car"]),                   # punctuation between the words still matches (MetaCLIP)
    ("car red", []),                             # order matters
    ("", []),
])
def test_entry_matching_is_whole_word_and_phrase_matching(caption, expected):
    match = EntryMatcher(ENTRIES)
    assert [ENTRIES[i] for i in match(caption)] == sorted(expected, key=ENTRIES.index)
    assert match(caption) == substring_matches(caption, ENTRIES)  # the " e " substring definition


def test_entry_matcher_equals_the_substring_definition_on_random_captions():
    rng = np.random.default_rng(10)
    words = ["a", "red", "car", "on", "the", "road", "big", "dog", "hot", "cat", "new", "york"]
    entries = sorted({" ".join(rng.choice(words, size=int(rng.integers(1, 4)))) for _ in range(40)})
    match = EntryMatcher(entries)
    for _ in range(300):
        parts = rng.choice(words + [",", "!", "'s", "-", "  "], size=int(rng.integers(0, 12)))
        caption = "".join(p if p in ",!'s-  " else (" " + p.upper() if rng.random() < 0.2 else " " + p)
                          for p in parts)
        assert match(caption) == substring_matches(caption, entries), caption


def test_read_metadata_normalises_like_captions(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# a vocabulary\nHot-Dog\ncat   # pets\n\ncat\n  New York \n")
    assert read_metadata(str(path)) == ["hot dog", "cat", "new york"]
    with pytest.raises(FileNotFoundError, match="metadata file not found"):
        read_metadata(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no entries"):
        read_metadata(str(tmp_path / "empty.txt"))


def test_mine_metadata_counts_captions_drops_stopword_edges_and_ranks():
    captions = ["a red car on the road", "the red car", "Red cars and a red car red car!", "blue sky",
                "the blue sky of the city", "sky", "a car on fire"]
    # document frequency (a caption counts once): car 4; red, red car, sky 3; blue, blue sky 2;
    # stop-word edged: the, a 3; a red, on, car on 2 (starting or ENDING with a stop word); ties alphabetical
    assert mine_metadata(captions, 2, 2) == ["car", "red", "red car", "sky", "blue", "blue sky"]
    assert mine_metadata(captions, 2, 2, keep_stopwords=True) == \
        ["car", "a", "red", "red car", "sky", "the", "a red", "blue", "blue sky", "car on", "on"]
    assert mine_metadata(captions, 1, 2) == ["car", "red", "sky", "blue"]
    assert mine_metadata(captions, 2, 3) == ["car", "red", "red car", "sky"]
    assert mine_metadata(captions, 2, 2, max_entries=2) == ["car", "red"]
    assert mine_metadata(captions, 2, 8) == []


def test_balance_caps_frequent_entries_in_expectation_and_keeps_rare_ones_exactly():
    t = 1000
    matches = ([[0]] * 20000      # head entry: count 20100 > t
               + [[1]] * 300      # tail entry: count 400 <= t
               + [[2]] * 1000     # count exactly t: probability 1
               + [[0, 1]] * 100   # head AND tail: kept through the tail entry
               + [[]] * 50)       # match nothing
    n = len(matches)
    uids = np.random.default_rng(11).choice(2 ** 62, size=n, replace=False).astype(np.int64)
    keep, counts = balance(matches, uids, 3, t, seed=0)
    assert counts.tolist() == [20100, 400, 1000]
    head = keep[:20000]
    expected = 20000 * t / 20100
    assert abs(head.sum() - expected) < 5 * np.sqrt(expected * (1 - t / 20100))  # ~t pairs of the head
    assert keep[20000:21400].all()  # every pair of an entry at or under t, and every pair with a rare entry
    assert not keep[-50:].any()  # unmatched captions are dropped ...
    keep_all, _ = balance(matches, uids, 3, t, seed=0, keep_unmatched=True)
    assert keep_all[-50:].all() and np.array_equal(keep_all[:-50], keep[:-50])  # ... unless asked to keep them
    # the mean over seeds is t/count: the cap holds in expectation
    rates = [balance(matches[:20000], uids[:20000], 3, t, seed=s)[0].mean() for s in range(8)]
    assert abs(np.mean(rates) - t / 20000) < 0.005
    # draws do not depend on the order of the pairs, and differ between seeds
    perm = np.random.default_rng(12).permutation(n)
    keep_perm, _ = balance([matches[i] for i in perm], uids[perm], 3, t, seed=0)
    assert np.array_equal(keep_perm, keep[perm])
    assert not np.array_equal(balance(matches, uids, 3, t, seed=1)[0], keep)


def test_balance_keeps_a_pair_when_any_of_its_entries_passes():
    t = 1000
    matches = [[0, 1]] * 4000  # two entries of count 4000: each passes with p = 1/4, the pair with 1 - (3/4)^2
    uids = np.arange(4000, dtype=np.int64) * 7919 + 13
    keep, counts = balance(matches, uids, 2, t, seed=3)
    assert counts.tolist() == [4000, 4000]
    assert abs(keep.mean() - (1 - 0.75 ** 2)) < 0.035
    u = uniform_hash(np.repeat(uids, 2), np.tile([0, 1], 4000), 3).reshape(4000, 2)
    assert np.array_equal(keep, (u < 0.25).any(1))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02


def test_pipeline_text_balance_with_a_vocabulary_file(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("Red\nblue square\n# a comment\nzebra\n")
    kept = _kept(run)
    captions = _pool_table(run)["caption"]
    entries = ["red", "blue square", "zebra"]
    matching = [r for r in kept if substring_matches(captions[r], entries)]
    assert 0 < len(matching) < len(kept)
    report, actions = _curate(out, f"text_balance.metadata={vocab}", "text_balance.t=100000", *FAST, world=world,
                              capsys=capsys)
    assert actions["text_balance"] == "running" and actions["image_balance"] == "skipped"
    assert (run / "text_balance" / "entries.txt").read_text().splitlines() == entries
    assert _parts(run / "text_balance" / "rows").tolist() == matching  # t above every count: all matches
    counts = np.load(run / "text_balance" / "counts.npy")
    assert counts.tolist() == [sum(bool(e in substring_matches(captions[r], entries)) for r in kept)
                               for e in range(3)] and counts[2] == 0
    _, actions = _curate(out, f"text_balance.metadata={vocab}", "text_balance.t=100000", *FAST,
                         "text_balance.keep_unmatched=true", world=world, capsys=capsys)
    assert _parts(run / "text_balance" / "rows").tolist() == kept.tolist()
    vocab.write_text("red\n")  # an edited vocabulary file is a changed setting
    _, actions = _curate(out, f"text_balance.metadata={vocab}", "text_balance.t=100000", *FAST,
                         "text_balance.keep_unmatched=true", world=world, capsys=capsys)
    assert actions["text_balance"] == "running"
    assert (run / "text_balance" / "entries.txt").read_text().splitlines() == ["red"]
