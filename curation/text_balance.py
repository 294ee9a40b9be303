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

Over several processes (``text_balance_stage``) the work items are the grid chunks of the
de-duplicated pool: each chunk's caption matches are a part file, the per-entry counts are
integer partial sums all-reduced exactly, and the keep test is per pair. Mining goes through
hash buckets: every chunk writes its n-gram document frequencies sorted by a hash bucket of the
n-gram, each bucket is summed by one process, and rank 0 ranks the survivors, so no process
holds the pool's n-grams.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import numpy as np

from .captions import caption_words, padded, word_ngrams
from .ranks import Ranks
from .store import load_array

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


def gram_bucket(gram: str, buckets: int) -> int:
    """The hash bucket of an n-gram (blake2b: the same on every machine and run)."""
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little") % buckets


def mine_part(captions: Iterable[str], max_ngram: int, buckets: int) -> Dict:
    """Document frequency of every word n-gram (1..max_ngram) over ``captions``, as columns sorted by
    (bucket, n-gram): ``bucket`` int32, ``gram`` str, ``count`` int64."""
    df: Counter = Counter()
    for caption in captions:
        df.update(set(word_ngrams(caption_words(caption), max_ngram)))
    grams = sorted((gram_bucket(" ".join(g), buckets), " ".join(g)) for g in df)
    counts = [df[tuple(g.split(" "))] for _, g in grams]
    return {"bucket": np.array([b for b, _ in grams], dtype=np.int32), "gram": [g for _, g in grams],
            "count": np.array(counts, dtype=np.int64)}


def bucket_candidates(parts: Iterable[Dict], bucket: int, min_count: int, keep_stopwords: bool) -> Dict[str, int]:
    """{n-gram: pool document frequency} of one bucket's n-grams that occur in at least ``min_count`` captions and
    carry content (no stop word at either end), summed over the parts (integers: any order)."""
    df: Counter = Counter()
    for part in parts:
        rows = np.flatnonzero(np.asarray(part["bucket"]) == bucket)
        for i in rows.tolist():
            df[part["gram"][i]] += int(part["count"][i])

    def content(gram: str) -> bool:
        words = gram.split(" ")
        return keep_stopwords or (words[0] not in STOPWORDS and words[-1] not in STOPWORDS)
    return {g: c for g, c in df.items() if c >= min_count and content(g)}


def rank_entries(candidates: Dict[str, int], max_entries: int) -> List[str]:
    """The ``max_entries`` most frequent candidates (ties alphabetical)."""
    return sorted(candidates, key=lambda g: (-candidates[g], g))[:max_entries]


def mine_metadata(captions: Iterable[str], max_ngram: int = 2, min_count: int = 5, max_entries: int = 100_000,
                  keep_stopwords: bool = False) -> List[str]:
    """Word n-grams occurring in at least ``min_count`` captions, most frequent first (ties alphabetical)."""
    part = mine_part(captions, max_ngram, 1)
    return rank_entries(bucket_candidates([part], 0, min_count, keep_stopwords), max_entries)


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


def balance_matches(offsets: np.ndarray, entries: np.ndarray, uids: np.ndarray, counts: np.ndarray, t: int,
                    seed: int = 0, keep_unmatched: bool = False) -> np.ndarray:
    """Keep mask over pairs whose matches are ``entries[offsets[i]:offsets[i + 1]]``, given the POOL's count of
    every entry: a pair is kept when any of its entries passes ``hash(seed, uid, entry) < t / max(count, t)``."""
    lengths = np.diff(offsets)
    pair_row = np.repeat(np.arange(len(lengths)), lengths)
    prob = t / np.maximum(counts[entries], t)
    passed = uniform_hash(np.asarray(uids)[pair_row], entries, seed) < prob
    keep = np.bincount(pair_row[passed], minlength=len(lengths)) > 0
    if keep_unmatched:
        keep |= lengths == 0
    return keep


def balance(matches: Sequence[Sequence[int]], uids: np.ndarray, num_entries: int, t: int, seed: int = 0,
            keep_unmatched: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(keep mask over the pairs, count per entry), in one process.

    Args:
        matches: entry ids of every pair's caption.
        uids: the pairs' sample ids (for the draws).
        num_entries: vocabulary size.
        t: per-entry cap.
        seed: draws are a hash of (seed, uid, entry).
        keep_unmatched: keep captions matching no entry (MetaCLIP drops them).
    """
    lengths = np.fromiter((len(m) for m in matches), dtype=np.int64, count=len(matches))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    entries = np.fromiter((e for m in matches for e in m), dtype=np.int64, count=int(lengths.sum()))
    counts = np.bincount(entries, minlength=num_entries)
    return balance_matches(offsets, entries, uids, counts, t, seed, keep_unmatched), counts


def text_balance_stage(ranks: Ranks, folder: Path, num_chunks: int, chunk_rows: Callable[[int], np.ndarray],
                       columns: Callable[[np.ndarray, Tuple[str, ...]], Dict], t, seed: int, log=print) -> Dict:
    """MetaCLIP balancing of the de-duplicated pool by the processes, one grid chunk per work item.

    Args:
        ranks: the processes.
        folder: the stage folder: ``entries.txt``, ``counts.npy``, ``matches/`` and ``rows/`` (one part per
            chunk: the pool rows kept), ``mine/`` (mining's parts and buckets).
        num_chunks: the grid chunks of the de-duplicated pool; ``chunk_rows(j)``: the pool rows of chunk j.
        columns: ``columns(rows, names)`` reads the pool's metadata (``embed.PoolIndex.columns``).
        t: the ``text_balance`` recipe section.
        seed: the keep draws are a hash of (seed, uid, entry).
    Returns the stage's statistics (the same on every rank).
    """
    from dinotxt.utils.fileio import atomic_write_text

    from .store import part_path, save_npy, save_npz, load_table, save_table

    folder = Path(folder)

    def captions(j: int) -> List[str]:
        return columns(chunk_rows(j), ("caption",))["caption"]

    if t.metadata:
        entries, source = ranks.on_zero(read_metadata, t.metadata), t.metadata
    else:
        buckets = int(t.mine_buckets)
        for j in ranks.share(num_chunks, count=False):
            path = part_path(folder / "mine", j, ".parquet")
            if not path.is_file():
                save_table(path, mine_part(captions(j), t.mine_max_ngram, buckets))
        ranks.barrier()
        for b in ranks.share(buckets, count=False):
            path = folder / "mine" / f"bucket_{b:04d}.parquet"
            if not path.is_file():
                parts = (load_table(part_path(folder / "mine", j, ".parquet")) for j in range(num_chunks))
                found = bucket_candidates(parts, b, t.mine_min_count, t.mine_stopwords)
                names = sorted(found)
                save_table(path, {"gram": names, "count": np.array([found[g] for g in names], dtype=np.int64)})
        ranks.barrier()

        def ranked() -> List[str]:
            candidates: Dict[str, int] = {}
            for b in range(buckets):
                table = load_table(folder / "mine" / f"bucket_{b:04d}.parquet")
                candidates.update(zip(table["gram"], table["count"].tolist()))
            return rank_entries(candidates, t.mine_max_entries)
        entries, source = ranks.on_zero(ranked), "mined from the captions"
        if not entries:
            raise ValueError(f"no metadata entry occurs in {t.mine_min_count} or more captions; lower "
                             "text_balance.mine_min_count or give a vocabulary file (text_balance.metadata)")
    ranks.on_zero(atomic_write_text, folder / "entries.txt", "\n".join(entries) + "\n")
    match = EntryMatcher(entries)
    counts = np.zeros(len(entries), dtype=np.int64)
    unmatched = 0
    mine = list(ranks.share(num_chunks))
    for j in mine:  # the matches of every caption: a part per chunk, and this rank's share of the counts
        path = part_path(folder / "matches", j, ".npz")
        if not path.is_file():
            found = [match(c) for c in captions(j)]
            offsets = np.cumsum([0] + [len(m) for m in found]).astype(np.int64)
            save_npz(path, {"offsets": offsets,
                            "entries": np.fromiter((e for m in found for e in m), np.int64, int(offsets[-1]))})
        with load_array(path) as z:
            counts += np.bincount(z["entries"], minlength=len(entries))
            unmatched += int((np.diff(z["offsets"]) == 0).sum())
    counts = ranks.all_reduce(counts)
    unmatched = int(ranks.all_reduce(np.array([unmatched], np.int64))[0])
    ranks.on_zero(save_npy, folder / "counts.npy", counts)
    selected = 0
    for j in mine:
        path = part_path(folder / "rows", j)
        if not path.is_file():
            rows = chunk_rows(j)
            with load_array(part_path(folder / "matches", j, ".npz")) as z:
                offsets, found = z["offsets"], z["entries"]
            keep = balance_matches(offsets, found, columns(rows, ("uid",))["uid"], counts, t.t, seed,
                                   t.keep_unmatched)
            save_npy(path, rows[keep])
        selected += len(load_array(path, mmap_mode="r"))
    selected = int(ranks.all_reduce(np.array([selected], np.int64))[0])
    if ranks.is_zero:
        log(f"text_balance: {len(entries):,} entries ({source}); {unmatched:,} captions match none; "
            f"{selected:,} kept with t={t.t}")
    return {"entries": len(entries), "metadata": source, "unmatched": unmatched, "selected": selected,
            "capped_entries": int((counts > t.t).sum())}
