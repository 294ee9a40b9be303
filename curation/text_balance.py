"""MetaCLIP-style text balancing (Xu et al., "Demystifying CLIP Data", ICLR 2024; METHOD.md section 7).

A metadata vocabulary of entries (words, phrases) comes from a user file (MetaCLIP uses
WordNet synsets and Wikipedia uni/bi-grams and titles) or is mined from the pool's own
captions: word n-grams found in at least ``mine_min_count`` captions, without n-grams
that start or end with a stop word. A caption matches entry ``e`` when ``" e "`` is a
substring of its padded, punctuation-spaced, lower-cased form; ``EntryMatcher`` finds
the same matches by looking every word n-gram of the caption up in a dictionary (the
tests check it against the substring definition).

``count(e)`` is the number of pool captions matching e. A pair is kept when ANY of its
entries passes ``u < t / max(count(e), t)``: entries rarer than t keep all their pairs
(the tail), frequent ones are capped at about t pairs (the head is flattened). Captions
matching no entry are dropped, as in MetaCLIP. ``u`` is a hash of (seed, sample uid,
entry), so the draw of a pair does not depend on reading order or on the other pairs.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from .captions import caption_words, padded, word_ngrams

# A short English stop-word list: mined entries must carry content, not "of the".
STOPWORDS = frozenset("""a an the and or but if of at by for with about against between into through during before
after above below to from up down in out on off over under again further then once here there when where why how all
any both each few more most other some such no nor not only own same so than too very s t can will just don should now
is are was were be been being have has had having do does did doing i me my we our you your he him his she her it its
they them their what which who whom this that these those am as until while""".split())


def read_metadata(path: str) -> List[str]:
    """Entries of a vocabulary file (one per line, ``#`` comments allowed), normalised like captions, unique."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metadata file not found: {p} (text_balance.metadata); or set it to null to mine "
                                "entries from the captions")
    entries, seen = [], set()
    for line in p.read_text(encoding="utf-8").splitlines():
        entry = " ".join(caption_words(line.split("#", 1)[0]))
        if entry and entry not in seen:
            seen.add(entry)
            entries.append(entry)
    if not entries:
        raise ValueError(f"metadata file {p} has no entries")
    return entries


def mine_metadata(captions: Iterable[str], max_ngram: int = 2, min_count: int = 5, max_entries: int = 100_000,
                  keep_stopwords: bool = False) -> List[str]:
    """Word n-grams occurring in at least ``min_count`` captions, most frequent first (ties alphabetical)."""
    df: Counter = Counter()
    for caption in captions:
        df.update(set(word_ngrams(caption_words(caption), max_ngram)))
    def content(gram: Tuple[str, ...]) -> bool:
        return keep_stopwords or (gram[0] not in STOPWORDS and gram[-1] not in STOPWORDS)
    ranked = sorted((g for g, c in df.items() if c >= min_count and content(g)), key=lambda g: (-df[g], g))
    return [" ".join(g) for g in ranked[:max_entries]]


class EntryMatcher:
    """Entry ids matched by a caption, via dictionary lookups of its word n-grams.

    Args:
        entries: normalised entries (``read_metadata`` / ``mine_metadata``).
    """

    def __init__(self, entries: Sequence[str]):
        self.entries = list(entries)
        self.ids: Dict[Tuple[str, ...], int] = {}
        for i, e in enumerate(self.entries):
            self.ids.setdefault(tuple(e.split()), i)
        self.max_len = max((len(k) for k in self.ids), default=1)

    def __call__(self, caption: str) -> List[int]:
        found = {self.ids[g] for g in word_ngrams(caption_words(caption), self.max_len) if g in self.ids}
        return sorted(found)


def substring_matches(caption: str, entries: Sequence[str]) -> List[int]:
    """The definition, entry by entry: ``" e "`` in the padded caption (slow; the tests' reference)."""
    text = padded(caption)
    return [i for i, e in enumerate(entries) if f" {e} " in text]


def uniform_hash(uids: np.ndarray, entries: np.ndarray, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per (uid, entry) pair from a splitmix64 finaliser: a pure function of its inputs."""
    with np.errstate(over="ignore"):
        z = (uids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ (entries.astype(np.uint64) + np.uint64(1)) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x165667B19E3779F9))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def balance(matches: Sequence[Sequence[int]], uids: np.ndarray, num_entries: int, t: int, seed: int = 0,
            keep_unmatched: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(keep mask over the pairs, count per entry).

    Args:
        matches: entry ids of every pair's caption.
        uids: the pairs' sample ids (for the draws).
        num_entries: vocabulary size.
        t: per-entry cap.
        seed: draws are a hash of (seed, uid, entry).
        keep_unmatched: keep captions matching no entry (MetaCLIP drops them).
    """
    lengths = np.fromiter((len(m) for m in matches), dtype=np.int64, count=len(matches))
    pair_row = np.repeat(np.arange(len(matches)), lengths)
    pair_entry = np.fromiter((e for m in matches for e in m), dtype=np.int64, count=int(lengths.sum()))
    counts = np.bincount(pair_entry, minlength=num_entries)
    prob = t / np.maximum(counts[pair_entry], t)
    passed = uniform_hash(np.asarray(uids)[pair_row], pair_entry, seed) < prob
    keep = np.bincount(pair_row[passed], minlength=len(matches)) > 0
    if keep_unmatched:
        keep |= lengths == 0
    return keep, counts
