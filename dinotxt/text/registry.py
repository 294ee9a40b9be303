"""The tokenizers behind one registry, as open_clip's ``get_tokenizer``: a kind names a class, a
class names its file, and a tokenizer is rebuilt from (kind, file bytes, context length).

    kind            class                                  file
    sentencepiece   ``Tokenizer`` (trained on the captions)  tokenizer.model
    clip_bpe        ``ClipTokenizer`` (OpenAI CLIP BPE)      bpe_simple_vocab_16e6.txt.gz
    hf_tokenizer    ``HFTokenizer`` (a pretrained text model's own)  tokenizer.json

Every tokenizer maps a string or a list of strings to a ``LongTensor (B, context_length)`` and has
``kind``, ``filename``, ``file_bytes``, ``vocab_size``, ``pad_id``, ``encode``, ``decode`` and ``save``.
A recipe's ``tokenizer.kind`` says ``sentencepiece`` or ``clip`` (``RECIPE_KINDS``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

from .clip_bpe import ClipTokenizer
from .hf import HFTokenizer
from .sentencepiece import Tokenizer

TOKENIZERS: Dict[str, type] = {cls.kind: cls for cls in (Tokenizer, ClipTokenizer, HFTokenizer)}
TOKENIZER_FILES: Dict[str, str] = {kind: cls.filename for kind, cls in TOKENIZERS.items()}
RECIPE_KINDS = {"sentencepiece": "sentencepiece", "clip": "clip_bpe"}  # recipe's tokenizer.kind -> registry kind


def tokenizer_kind(tokenizer) -> str:
    """The registry kind of a tokenizer object."""
    kind = getattr(tokenizer, "kind", None)
    if kind not in TOKENIZERS:
        raise ValueError(f"cannot save a tokenizer of kind '{kind}' (known: {', '.join(TOKENIZERS)})")
    return kind


def build_tokenizer(kind: str, data: Union[bytes, str, Path], context_length: int):
    """Rebuild a tokenizer from its kind and its file (path or bytes)."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind '{kind}' (known: {', '.join(TOKENIZERS)}); written by a newer dinotxt?")
    return TOKENIZERS[kind](data, context_length=context_length)


def save_tokenizer(tokenizer, folder: Union[str, Path]) -> str:
    """Write the tokenizer's file into ``folder`` under its registry name; returns the name."""
    name = TOKENIZER_FILES[tokenizer_kind(tokenizer)]
    tokenizer.save(Path(folder) / name)
    return name


__all__ = ["TOKENIZERS", "TOKENIZER_FILES", "RECIPE_KINDS", "tokenizer_kind", "build_tokenizer", "save_tokenizer"]
