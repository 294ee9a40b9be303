"""dinotxt's own CLIP BPE agrees with open_clip's SimpleTokenizer (the reference) id for id."""
import gzip

import pytest
import torch

from dinotxt.text.clip_bpe import BPE_FILENAME, ClipTokenizer, default_bpe_path

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

TEXTS = [
    "a photo of a cat.", "", "   ", "A PHOTO OF A DOG!!", "don't stop; we'll see what they've done",
    "I’m a “quoted” café — naïve façade", "日本語のテキストと中文", "emoji 😀🎉 and ♥ symbols", "&amp;lt;b&amp;gt; html &quot;x&quot;",
    "  lots   of\t\nwhite\r\nspace  ", "numbers 12345, 3.14 and 1,000,000", "x" * 300, " ".join(["word"] * 100),
    "Ünïcödé ÀÉÎ ÕÜ", "mojibake: cafÃ©", "a_b-c/d\\e|f@g#h$i%j^k&l*m(n)o", "İstanbul ǅ ß ﬁ ligature",
    "Здравствуй мир", "مرحبا بالعالم", "tab\tseparated\tvalues", "CamelCaseWordsAndAcronymsLikeNASA",
    "a red circle on a blue square next to a green star",
]


@pytest.fixture(scope="module")
def pair():
    return ClipTokenizer(), open_clip_tokenizer.SimpleTokenizer()


def test_ids_agree_with_open_clip_simple_tokenizer(pair):
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text), text
    assert torch.equal(ours(TEXTS), ref(TEXTS))
    assert torch.equal(ours(TEXTS, context_length=16), ref(TEXTS, context_length=16))


def test_layout_sot_eot_padding_and_truncation(pair):
    ours, _ = pair
    assert (ours.vocab_size, ours.sot_id, ours.eot_id, ours.pad_id) == (49408, 49406, 49407, 0)
    ids = ours(["a cat", "y " * 200])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, 0] == 49406 and ids[0, 3] == 49407 and ids[0, 4:].eq(0).all()
    assert ids[1, -1] == 49407 and ids.argmax(-1).tolist() == [3, 76]  # EOT is the largest id: the pooling position
    assert ours.decode(ids[0]) == "a cat"


def test_vocabulary_from_a_path_and_clear_errors(pair, tmp_path):
    ours, _ = pair
    path = tmp_path / BPE_FILENAME
    path.write_bytes(default_bpe_path().read_bytes())
    assert torch.equal(ClipTokenizer(str(path))(TEXTS[:4]), ours(TEXTS[:4]))
    with pytest.raises(FileNotFoundError, match="CLIP BPE vocabulary not found"):
        ClipTokenizer(str(tmp_path / "missing.txt.gz"))
    with pytest.raises(ValueError, match="not a gzipped CLIP BPE vocabulary"):
        ClipTokenizer(b"plain text")
    with pytest.raises(ValueError, match="valid merge lines"):
        ClipTokenizer(gzip.compress(b"header\na b\n"))
