"""OpenAI CLIP byte-level BPE tokenizer (Radford et al., "Learning Transferable Visual
Models From Natural Language Supervision", ICML 2021), as the official dino.txt
release uses it (METHOD.md section 2).

The official dino.txt text encoders (DINOv2 and DINOv3 releases) were trained on these
ids, so loading those weights needs exactly this tokenizer:

- vocabulary of 49,408 ids: 256 byte symbols, the same 256 with the end-of-word marker
  ``</w>``, the first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``, then
  ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407 (EOT is the largest id, so the
  text tower pools at ``ids.argmax(-1)``);
- text is cleaned as CLIP does (ftfy, HTML unescape twice, whitespace collapsed, lower
  case), split with CLIP's regular expression, mapped to byte symbols and merged by rank;
- every row is ``[SOT] tokens [EOT] 0 0 ...`` of ``context_length`` (77); longer texts are
  truncated with EOT forced into the last position.

The vocabulary file is the standard ``bpe_simple_vocab_16e6.txt.gz``; it ships inside the
open_clip_torch wheel (found without importing open_clip) or can be given as a path.
``ClipTokenizer`` has the call interface of ``dinotxt.Tokenizer``.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..utils.fileio import atomic_write_bytes
from .sentencepiece import pack_ids

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # merges CLIP keeps from the file (the rest of its 262k lines are unused)
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# CLIP's pre-tokenisation: the two special strings, English contractions, runs of letters,
# single digits, runs of other non-space symbols (needs the `regex` package for \p{..}).
_SPLIT_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def bytes_to_unicode() -> Dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode symbols.

    Printable Latin-1 bytes map to themselves; the others (whitespace, control bytes) are
    shifted to code points 256+, so BPE never sees whitespace inside a symbol.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table  # insertion order (printable bytes first) is the order of the first 256 vocabulary ids


def default_bpe_path() -> Optional[Path]:
    """The vocabulary file shipped in an installed open_clip_torch, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / BPE_FILENAME
        if path.is_file():
            return path
    return None


def _clean(text: str) -> str:
    """CLIP's text cleaning: ftfy repair, HTML unescape (twice), collapse whitespace, lower case."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """OpenAI CLIP BPE. ``tokenizer(texts) -> LongTensor (B, context_length)``.

    Args:
        bpe: path to ``bpe_simple_vocab_16e6.txt.gz`` or its bytes; None uses the copy in an
            installed open_clip_torch.
        context_length: tokens per row (77 for every CLIP-style text tower).
    """

    kind = "clip_bpe"
    filename = BPE_FILENAME

    def __init__(self, bpe: Union[str, Path, bytes, None] = None, context_length: int = 77):
        try:
            import ftfy  # noqa: F401  (CLIP's cleaning; imported here so a missing package fails at construction)
            import regex
        except ImportError as e:
            raise ImportError(f"the CLIP tokenizer needs the '{e.name}' package: pip install ftfy regex") from None
        if bpe is None:
            bpe = default_bpe_path()
            if bpe is None:
                raise FileNotFoundError(
                    f"no CLIP BPE vocabulary given and none found: pass the path of {BPE_FILENAME} "
                    "(it ships with open_clip_torch: pip install open_clip_torch)"
                )
        if isinstance(bpe, (str, Path)):
            path = Path(bpe)
            if not path.is_file():
                raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path} (expected {BPE_FILENAME})")
            bpe = path.read_bytes()
        self.bpe_bytes = bytes(bpe)
        try:
            lines = gzip.decompress(self.bpe_bytes).decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"not a gzipped CLIP BPE vocabulary ({BPE_FILENAME}): {e}") from None
        # line 0 is a version header; CLIP uses the next NUM_MERGES merges
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"CLIP BPE vocabulary has {len(merges)} valid merge lines; expected {NUM_MERGES} pairs")
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: Dict[str, int] = {piece: i for i, piece in enumerate(vocab)}
        self.decoder: Dict[int, str] = {i: piece for piece, i in self.encoder.items()}
        self.ranks: Dict[Tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.pattern = regex.compile(_SPLIT_PATTERN, regex.IGNORECASE)
        self.sot_id = self.encoder[SOT_TOKEN]
        self.eot_id = self.encoder[EOT_TOKEN]
        self.pad_id = 0
        self.context_length = context_length
        self._cache: Dict[str, List[str]] = {SOT_TOKEN: [SOT_TOKEN], EOT_TOKEN: [EOT_TOKEN]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _merge(self, word: str) -> List[str]:
        """Apply BPE merges to one pre-token (already mapped to byte symbols), lowest rank first."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks[p], p) for p in zip(parts, parts[1:]) if p in self.ranks]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged, i = [], 0
            while i < len(parts):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` without SOT/EOT."""
        ids: List[int] = []
        for piece in self.pattern.findall(_clean(text or "")):
            symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[p] for p in self._merge(symbols))
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return pack_ids([[self.sot_id] + self.encode(t) + [self.eot_id] for t in texts],
                        context_length or self.context_length, self.eot_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: SOT is dropped and decoding stops at EOT (padding follows it; id 0
        is also the symbol "!", so padding cannot be recognised by value)."""
        kept = []
        for i in (int(i) for i in ids):
            if i == self.eot_id:
                break
            if i != self.sot_id:
                kept.append(self.decoder[i])
        pieces = "".join(kept)
        text = bytearray(self.byte_decoder[c] for c in pieces).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    @property
    def file_bytes(self) -> bytes:
        """The gzipped BPE vocabulary that rebuilds this tokenizer."""
        return self.bpe_bytes

    def save(self, path: Union[str, Path]) -> None:
        """Write the vocabulary file (checkpoints carry their tokenizer)."""
        atomic_write_bytes(Path(path), self.bpe_bytes)
