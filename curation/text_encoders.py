"""Caption encoders for the embed stage: a download-free hashed TF-IDF, or any plug-in.

``HashedTfidfEncoder`` is the feature-hashing trick (Weinberger et al., ICML 2009) over
word n-grams with TF-IDF weights: every n-gram is hashed (blake2b, stable across runs and
machines, unlike Python's ``hash``) to one of 2**20 feature ids; document frequencies are
counted per feature id over the pool; a feature lands in bucket ``id % dim`` with a sign
from another bit of its hash, so collisions cancel on average instead of piling up. Rows
are L2-normalised. It needs nothing downloaded and captures which words a caption uses.

A plug-in is ``package.module:factory`` (``embed.text_encoder``); the factory is called with
``embed.text_kwargs`` and must return an object with ``encode(list_of_captions)`` giving an
``(n, dim)`` array, e.g. a wrapper around a sentence-transformers model you have locally.
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from .captions import caption_words, word_ngrams

FEATURE_BITS = 20


class HashedTfidfEncoder:
    """Signed feature hashing of word n-grams with smoothed IDF weights.

    Args:
        dim: output width (buckets).
        ngrams: word n-grams 1..ngrams are features.
        idf: per-feature-id IDF weights (``2**20`` floats) from ``fit``; None = all ones.
    """

    def __init__(self, dim: int = 512, ngrams: int = 2, idf: Optional[np.ndarray] = None):
        if dim < 1 or ngrams < 1:
            raise ValueError(f"hashed TF-IDF needs dim >= 1 and ngrams >= 1 (got dim={dim}, ngrams={ngrams})")
        self.dim, self.ngrams = int(dim), int(ngrams)
        self.idf = idf
        self._cache: Dict[Tuple[str, ...], Tuple[int, int, float]] = {}

    def _hash(self, gram: Tuple[str, ...]) -> Tuple[int, int, float]:
        hit = self._cache.get(gram)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "little")
            feature = h & ((1 << FEATURE_BITS) - 1)
            hit = (feature, feature % self.dim, -1.0 if (h >> 40) & 1 else 1.0)
            if len(self._cache) > 2_000_000:  # bounded memory on huge vocabularies
                self._cache.clear()
            self._cache[gram] = hit
        return hit

    def features(self, caption: str) -> Dict[int, int]:
        """Feature id -> term count of one caption."""
        counts: Dict[int, int] = {}
        for gram in word_ngrams(caption_words(caption), self.ngrams):
            f = self._hash(gram)[0]
            counts[f] = counts.get(f, 0) + 1
        return counts

    def document_frequency(self, captions: Iterable[str]) -> Tuple[np.ndarray, np.ndarray, int]:
        """(feature ids, number of captions each occurs in, number of captions): integer counts, so the counts of
        several parts of a pool add up exactly to the pool's, in any order."""
        counts: Dict[int, int] = {}
        n = 0
        for caption in captions:
            n += 1
            for f in self.features(caption):
                counts[f] = counts.get(f, 0) + 1
        ids = np.fromiter(sorted(counts), dtype=np.int64, count=len(counts))
        return ids, np.array([counts[i] for i in ids.tolist()], dtype=np.int64), n

    def set_document_frequency(self, df: np.ndarray, n: int) -> "HashedTfidfEncoder":
        """Smoothed IDF ``ln((1 + n) / (1 + df)) + 1`` per feature id from the pool's document frequencies."""
        self.idf = (np.log((1.0 + n) / (1.0 + np.asarray(df))) + 1.0).astype(np.float32)
        return self

    def fit(self, captions: Iterable[str]) -> "HashedTfidfEncoder":
        """The IDF weights over ``captions`` (one process)."""
        ids, counts, n = self.document_frequency(captions)
        df = np.zeros(1 << FEATURE_BITS, dtype=np.int64)
        df[ids] = counts
        return self.set_document_frequency(df, n)

    def encode(self, captions: List[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised (an empty caption gives a zero row)."""
        out = np.zeros((len(captions), self.dim), dtype=np.float32)
        idf = self.idf
        for row, caption in enumerate(captions):
            for gram in word_ngrams(caption_words(caption), self.ngrams):  # a repeated n-gram adds up to tf * idf
                feature, bucket, sign = self._hash(gram)
                out[row, bucket] += sign * (float(idf[feature]) if idf is not None else 1.0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def load_text_encoder(spec: str, dim: int = 512, ngrams: int = 2, kwargs: Optional[Dict[str, Any]] = None,
                      trust_code: bool = False):
    """``"tfidf"`` -> ``HashedTfidfEncoder(dim, ngrams)``; ``"package.module:factory"`` -> ``factory(**kwargs)``
    (only with ``trust_code=True``: the recipe names that code, see ``dinotxt.utils.plugins``)."""
    from dinotxt.utils.plugins import import_object, is_import_path

    if spec == "tfidf":
        return HashedTfidfEncoder(dim, ngrams)
    if not is_import_path(spec):
        raise ValueError(f"embed.text_encoder={spec!r}: use 'tfidf' or 'package.module:factory'")
    encoder = import_object(spec, trust_code=trust_code, setting="embed.text_encoder")(**dict(kwargs or {}))
    if not callable(getattr(encoder, "encode", None)):
        raise ValueError(f"text encoder {spec} returned {type(encoder).__name__}, which has no encode(captions) method")
    return encoder


def encode_checked(encoder, captions: List[str], name: str, expect_dim: Optional[int] = None) -> np.ndarray:
    """``encoder.encode`` with its output checked: one finite row per caption, the same width every call."""
    out = encoder.encode(list(captions))
    if hasattr(out, "detach"):  # a torch tensor from a plug-in
        out = out.detach().float().cpu().numpy()
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != len(captions):
        raise ValueError(f"text encoder {name} returned shape {out.shape} for {len(captions)} captions; "
                         "expected (num_captions, dim)")
    if expect_dim is not None and out.shape[1] != expect_dim:
        raise ValueError(f"text encoder {name} returned embeddings of width {out.shape[1]}, but {expect_dim} "
                         "was expected (earlier shards of this run used that width)")
    if not np.isfinite(out).all():
        raise ValueError(f"text encoder {name} returned NaN or infinite values")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)
