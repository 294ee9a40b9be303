"""Caption normalisation shared by text balancing and the hashed TF-IDF encoder.

MetaCLIP (Xu et al., "Demystifying CLIP Data", ICLR 2024) matches a metadata entry ``e``
against a caption when ``" e "`` is a substring of the lower-cased caption with
punctuation turned into spaces and the whole padded with spaces. With whitespace
collapsed, that is exactly "the entry's words occur as consecutive words of the
caption", which ``word_ngrams`` enumerates; ``padded`` gives the substring form the
tests check the fast path against.
"""
from __future__ import annotations

import re
from typing import Iterator, List, Tuple

_NOT_WORD = re.compile(r"[\W_]+")  # punctuation and "_" (letters of every script stay words)


def caption_words(text: str) -> List[str]:
    """Lower-cased words of ``text`` with punctuation as separators ("Dog's toy!" -> ["dog", "s", "toy"])."""
    return _NOT_WORD.sub(" ", text.lower()).split()


def padded(text: str) -> str:
    """The space-padded, punctuation-spaced, lower-cased form MetaCLIP matches substrings in."""
    return " " + " ".join(caption_words(text)) + " "


def word_ngrams(words: List[str], max_n: int) -> Iterator[Tuple[str, ...]]:
    """All runs of 1..max_n consecutive words."""
    for n in range(1, max_n + 1):
        for i in range(len(words) - n + 1):
            yield tuple(words[i:i + n])
