"""SentencePiece tokenizer trained on the caption corpus (dinotxt's default).

Ids: 0 = padding, 1 = unknown, 2 .. n-1 = SentencePiece pieces, then
``sot = n`` and ``eot = n + 1``: end-of-text is the LARGEST id, so the text tower can
pool at ``ids.argmax(-1)`` exactly as with the CLIP BPE (METHOD.md section 2).
Every sequence is ``[SOT] pieces [EOT] 0 0 ...`` of fixed ``context_length``;
too-long captions are truncated with EOT forced into the last position.
The model file is saved with every checkpoint (``tokenizer.model``).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import torch

from ..utils.fileio import atomic_write_bytes


def pack_ids(sequences: Sequence[List[int]], context_length: int, eot_id: int) -> torch.Tensor:
    """(B, context_length) ids, padded with 0; a sequence that is too long is cut and keeps EOT as
    its last token (the text tower pools at EOT), as OpenAI's CLIP tokenizer does."""
    out = torch.zeros(len(sequences), context_length, dtype=torch.long)
    for i, ids in enumerate(sequences):
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot_id
        out[i, : len(ids)] = torch.tensor(ids)
    return out


class Tokenizer:
    """Wraps a SentencePiece model. ``tokenizer(texts) -> LongTensor (B, context_length)``."""

    kind = "sentencepiece"
    filename = "tokenizer.model"

    def __init__(self, model: Union[str, Path, bytes], context_length: int = 77):
        import sentencepiece as spm

        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer model not found: {path}")
            model = path.read_bytes()
        self.model_bytes = bytes(model)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.context_length = context_length
        self.pad_id = 0
        self.sot_id = self.sp.get_piece_size()
        self.eot_id = self.sot_id + 1

    @property
    def vocab_size(self) -> int:
        return self.eot_id + 1

    def encode(self, text: str) -> List[int]:
        return [self.sot_id] + self.sp.encode(text or "") + [self.eot_id]

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return pack_ids([self.encode(t) for t in texts], context_length or self.context_length, self.eot_id)

    def decode(self, ids: Sequence[int]) -> str:
        pieces = [int(i) for i in ids if 1 < int(i) < self.sot_id]
        return self.sp.decode(pieces)

    @property
    def file_bytes(self) -> bytes:
        """The SentencePiece model file that rebuilds this tokenizer."""
        return self.model_bytes

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_bytes(Path(path), self.model_bytes)


def train_tokenizer(captions: Iterable[str], vocab_size: int = 32000, context_length: int = 77,
                    model_type: str = "unigram") -> Tokenizer:
    """Train a SentencePiece model on captions; ``vocab_size`` counts the SOT/EOT ids too.

    Small corpora cannot fill a large vocabulary; the limit is then soft (fewer pieces).
    """
    import sentencepiece as spm

    captions = [c.strip() for c in captions if c and c.strip()]
    if not captions:
        raise ValueError("no non-empty captions to train the tokenizer on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=buf,
        vocab_size=max(8, vocab_size - 2),
        model_type=model_type,
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
        normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding: captions are case-insensitive
        character_coverage=0.9995,
        hard_vocab_limit=False,
        byte_fallback=False,
        input_sentence_size=0,  # 0 = every sentence given (SentencePiece rejects values of 1..100)
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return Tokenizer(buf.getvalue(), context_length)
