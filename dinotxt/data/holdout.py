"""A validation split carved from the user's own pairs (``data.holdout``).

With a few thousand pairs a text tower memorises captions; a held-out split of the same pairs shows it
(validation loss rising while training loss falls) and picks the best checkpoint. A pair belongs to the
split when a hash of ``(seed, sample key)`` falls below the held-out fraction: the same pairs for every
process, worker, resume and for the feature cache of the same data (it keeps the sample keys), and no
pair is ever both trained on and validated on.

``data.holdout``: a fraction in [0, 0.5), 0 for none, or ``auto``: 5% of the pairs (at most 1,000) when the
data holds 1,000 to ``AUTO_MAX_PAIRS`` pairs; none below (too few pairs to measure anything) or above (a large
pool needs no carving to show memorisation).
"""
from __future__ import annotations

import hashlib
import tarfile
from typing import Any, Optional, Sequence

AUTO_FRACTION = 0.05
AUTO_MAX_HELD_OUT = 1000
AUTO_MAX_PAIRS = 100_000
AUTO_MIN_HELD_OUT = 50  # fewer held-out pairs measure nothing: auto holds out none below 1,000 pairs


def in_holdout(key: str, seed: int, fraction: float) -> bool:
    """Whether the pair ``key`` is held out (a pure function of the key, the seed and the fraction)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2 ** 64


def holdout_fraction(setting: Any, pairs: Optional[int]) -> float:
    """The held-out fraction ``data.holdout`` asks for, given the number of training pairs (None: unknown)."""
    if setting in (None, 0, 0.0, False):
        return 0.0
    if setting == "auto":
        if not pairs or pairs > AUTO_MAX_PAIRS or pairs * AUTO_FRACTION < AUTO_MIN_HELD_OUT:
            return 0.0
        return min(AUTO_FRACTION, AUTO_MAX_HELD_OUT / pairs)
    fraction = float(setting)
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"data.holdout={setting}: give a fraction in [0, 0.5), 0 for none, or auto")
    return fraction


def estimate_pairs(shards: Sequence[str]) -> Optional[int]:
    """Samples in a list of local tar shards, estimated from the first one (None for pipes and URLs)."""
    from .sources import is_pipe, is_url

    if not shards or is_pipe(shards[0]) or is_url(shards[0]):
        return None
    try:
        with tarfile.open(shards[0]) as tar:
            keys = {m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError):
        return None
    return len(keys) * len(shards)


__all__ = ["in_holdout", "holdout_fraction", "estimate_pairs", "AUTO_FRACTION", "AUTO_MAX_HELD_OUT",
           "AUTO_MAX_PAIRS", "AUTO_MIN_HELD_OUT"]
