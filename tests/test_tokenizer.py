import pytest
import torch

from dinotxt.text.sentencepiece import Tokenizer, train_tokenizer

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ["red", "green", "blue", "yellow"]
            for s in ["circle", "square", "star"] for b in ["striped", "plain", "dotted"]] * 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS, vocab_size=64, context_length=10)


def test_layout_sot_pieces_eot_pad(tok):
    ids = tok(["a red circle"])
    assert ids.shape == (1, 10)
    row = ids[0].tolist()
    assert row[0] == tok.sot_id
    eot = row.index(tok.eot_id)
    assert all(i == 0 for i in row[eot + 1:])
    assert ids.argmax(-1).item() == eot  # EOT is the largest id: the text tower pools there
    assert tok.eot_id == tok.vocab_size - 1
    assert tok.decode(tok(["a red circle"], context_length=40)[0].tolist()) == "a red circle"


def test_truncation_forces_eot_last(tok):
    ids = tok(["a red circle " * 20])[0]
    assert ids[-1].item() == tok.eot_id and (ids != 0).all()


def test_empty_and_case(tok):
    assert tok([""])[0, :2].tolist() == [tok.sot_id, tok.eot_id]
    assert torch.equal(tok(["A RED Circle"]), tok(["a red circle"]))  # case folded


def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path / "t.model")
    again = Tokenizer(tmp_path / "t.model", context_length=10)
    assert torch.equal(again(CAPTIONS[:5]), tok(CAPTIONS[:5]))
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")


def test_no_captions():
    with pytest.raises(ValueError, match="no non-empty captions"):
        train_tokenizer(["", "  "], vocab_size=32)


def test_trains_on_fewer_than_a_hundred_captions():
    # SentencePiece rejects input_sentence_size in 1..100; a tiny caption set must still train
    few = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "star", "square")]
    tok = train_tokenizer(few, vocab_size=40, context_length=8)
    ids = tok(["a red star"])
    assert ids.shape == (1, 8) and int(ids[0, 0]) == tok.sot_id
