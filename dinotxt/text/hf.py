"""The own tokenizer of a pretrained transformers text encoder (``model.text.pretrained``).

It is the model folder's ``tokenizer.json`` (a Hugging Face *fast* tokenizer: normaliser,
pre-tokeniser, WordPiece/BPE vocabulary and the post-processor that adds ``[CLS] ... [SEP]``),
run by the ``tokenizers`` library, which reads it as data: nothing in the folder is imported or
executed. ``tokenizer(texts) -> LongTensor (B, context_length)``, padded with the model's pad id;
a too-long caption is truncated by the library, which keeps the closing special token.
The file travels with every checkpoint (``tokenizer.json``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Union

import torch

from ..utils.fileio import atomic_write_bytes

HF_TOKENIZER_FILENAME = "tokenizer.json"


class HFTokenizer:
    """Wraps ``tokenizers.Tokenizer`` from a ``tokenizer.json`` (path or bytes)."""

    kind = "hf_tokenizer"
    filename = HF_TOKENIZER_FILENAME

    def __init__(self, data: Union[str, Path, bytes], context_length: int = 77, pad_id: int = None):
        from tokenizers import Tokenizer as FastTokenizer

        if isinstance(data, (str, Path)):
            path = Path(data)
            if path.is_dir():
                path = path / HF_TOKENIZER_FILENAME
            if not path.is_file():
                raise FileNotFoundError(
                    f"no {HF_TOKENIZER_FILENAME} at {path}: a pretrained text model needs its fast tokenizer file "
                    "(save it with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
            data = path.read_bytes()
        self.json_bytes = bytes(data)
        try:
            self.tok = FastTokenizer.from_str(self.json_bytes.decode("utf-8"))
        except Exception as e:  # a corrupt or foreign file
            raise ValueError(f"not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
        self.context_length = int(context_length)
        if pad_id is None:
            padding = json.loads(self.json_bytes).get("padding") or {}
            pad_id = padding.get("pad_id")
            if pad_id is None:
                pad_id = self.tok.token_to_id("[PAD]") if self.tok.token_to_id("[PAD]") is not None else 0
        self.pad_id = int(pad_id)
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=self.context_length)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text or "").ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        if length != self.context_length:
            self.tok.enable_truncation(max_length=length)
        try:
            rows = [e.ids for e in self.tok.encode_batch([t or "" for t in texts])]
        finally:
            if length != self.context_length:
                self.tok.enable_truncation(max_length=self.context_length)
        out = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=True)

    @property
    def file_bytes(self) -> bytes:
        """The tokenizer.json that rebuilds this tokenizer."""
        return self.json_bytes

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_bytes(Path(path), self.json_bytes)
