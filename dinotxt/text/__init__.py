"""Tokenizers: SentencePiece (trained on the captions), OpenAI's CLIP BPE and Hugging Face
``tokenizer.json``, behind one registry (``registry.py``)."""
from .clip_bpe import BPE_FILENAME, ClipTokenizer
from .hf import HF_TOKENIZER_FILENAME, HFTokenizer
from .registry import RECIPE_KINDS, TOKENIZER_FILES, TOKENIZERS, build_tokenizer, save_tokenizer, tokenizer_kind
from .sentencepiece import Tokenizer, train_tokenizer

__all__ = ["BPE_FILENAME", "ClipTokenizer", "HF_TOKENIZER_FILENAME", "HFTokenizer", "RECIPE_KINDS", "TOKENIZER_FILES",
           "TOKENIZERS", "Tokenizer", "build_tokenizer", "save_tokenizer", "tokenizer_kind", "train_tokenizer"]
