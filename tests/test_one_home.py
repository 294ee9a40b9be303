"""One home per concept (issue 23): the command line declares each shared option once, the dense flags come
from ``DenseSettings``, a checkpoint is read once, the tokenizer registry rebuilds every kind, training reads
a resolved config that nothing mutates, and ``dinotxt tokenizer train`` runs on the core install."""
import argparse
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from dinotxt.cli import build_parser
from dinotxt.inference.settings import DEFAULTS, EXAMPLE_OVERLAYS, DenseSettings
from test_install import BLOCK_EXTRAS


def _subcommands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, prefix + (name,))
    if prefix:
        yield " ".join(prefix), parser


COMMANDS = dict(_subcommands(build_parser()))


def _option(parser, flag):
    return next((a for a in parser._actions if flag in a.option_strings), None)


@pytest.mark.parametrize("flag", ["--checkpoint", "--backbone-weights", "--trust-code", "--device"])
def test_a_shared_option_is_the_same_declaration_in_every_command(flag):
    """argparse parents copy the one declared action: every command that takes the option has the same object."""
    found = {name: _option(p, flag) for name, p in COMMANDS.items() if _option(p, flag) is not None}
    assert len(found) >= 3, found
    assert len({id(a) for a in found.values()}) == 1, {n: a.help for n, a in found.items()}


@pytest.mark.parametrize("command", ["segment", "eval segmentation"])
def test_dense_flags_come_from_dense_settings_with_its_defaults(command):
    parser = COMMANDS[command]
    for f in fields(DenseSettings):
        action = _option(parser, "--" + f.name.replace("_", "-"))
        assert action is not None and action.dest == f.name, f.name
        assert action.default == getattr(DEFAULTS, f.name), f.name
    args = parser.parse_args(["--checkpoint", "c"] + (["img.png", "--labels", "a"] if command == "segment"
                                                      else ["--dataset", "demo", "--root", "r"]))
    from dinotxt.cli import _dense_settings

    assert _dense_settings(args) == DEFAULTS


def test_the_number_of_example_overlays_has_one_default():
    from dinotxt.evaluation.suite import SuiteTaskConfig

    for command in ("eval segmentation", "eval grouping"):
        assert _option(COMMANDS[command], "--num-examples").default == EXAMPLE_OVERLAYS
    assert SuiteTaskConfig.num_examples == EXAMPLE_OVERLAYS


def test_a_checkpoint_is_read_once(tmp_path, monkeypatch):
    """load, the factory and get_tokenizer read a checkpoint through one record: its config and its weights
    are each read once per call (the factory used to read config.yaml a second time for the train section)."""
    import safetensors.torch
    from omegaconf import OmegaConf

    import dinotxt
    from test_checkpoint import CAPTIONS, hand_built

    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=16)
    folder = dinotxt.save_checkpoint(tmp_path / "ckpt", hand_built(tok), tok)
    reads = []
    load_yaml, load_file = OmegaConf.load, safetensors.torch.load_file
    monkeypatch.setattr(OmegaConf, "load", lambda f, *a, **k: reads.append(os.path.basename(f)) or load_yaml(f, *a, **k))
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda f, *a, **k: reads.append(os.path.basename(f)) or load_file(f, *a, **k))
    for call, expected in [(dinotxt.load, ["config.yaml", "model.safetensors"]),
                           (dinotxt.create_model_and_transforms, ["config.yaml", "model.safetensors"]),
                           (dinotxt.get_tokenizer, ["config.yaml"])]:
        reads.clear()
        call(str(folder))
        assert reads == expected, (call.__name__, reads)


@pytest.mark.parametrize("kind", ["sentencepiece", "hf_tokenizer"])
def test_the_registry_rebuilds_a_tokenizer_from_its_kind_and_file(tmp_path, kind):
    from dinotxt.text import TOKENIZER_FILES, build_tokenizer, save_tokenizer, train_tokenizer

    if kind == "sentencepiece":
        tok = train_tokenizer(["a red circle", "a blue star on stripes"] * 8, vocab_size=40, context_length=12)
    else:
        pytest.importorskip("tokenizers")
        from tokenizers import Tokenizer, models, pre_tokenizers

        inner = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "red": 2, "circle": 3}, unk_token="[UNK]"))
        inner.pre_tokenizer = pre_tokenizers.Whitespace()
        from dinotxt.text import HFTokenizer

        tok = HFTokenizer(inner.to_str().encode(), context_length=12)
    name = save_tokenizer(tok, tmp_path)
    assert name == TOKENIZER_FILES[kind] and (tmp_path / name).read_bytes() == tok.file_bytes
    again = build_tokenizer(kind, (tmp_path / name).read_bytes(), 12)
    assert type(again) is type(tok)
    assert torch.equal(again(["a red circle"]), tok(["a red circle"]))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        build_tokenizer("bpe", b"", 12)


def test_the_training_config_is_resolved_once_and_read_only(tmp_path):
    """``train`` fits the config to the tokenizer on a copy, then freezes it: nothing below may change it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ReadonlyConfigError

    from dinotxt.config import load_train_config
    from dinotxt.train.prepare import fit_config_to_tokenizer
    from dinotxt.text import train_tokenizer

    cfg = load_train_config("debug", [f"output_dir={tmp_path}"])
    tok = train_tokenizer(["a red circle", "a blue star on stripes"] * 8, vocab_size=40, context_length=12)
    fitted = fit_config_to_tokenizer(cfg, tok)
    assert fitted.model.text.vocab_size == tok.vocab_size != cfg.model.text.vocab_size  # the input is untouched
    OmegaConf.set_readonly(fitted, True)
    with pytest.raises(ReadonlyConfigError):
        fitted.model.text.vocab_size = 3


def test_tokenizer_train_runs_on_the_core_install(tmp_path):
    """No Lightning, faiss, matplotlib, pyarrow or tensorboard: `dinotxt tokenizer train` reads the captions of
    shards through the data layer and writes the model."""
    from dinotxt.data.world import write_split

    write_split(tmp_path / "world", 24, seed=0, size=32, samples_per_shard=12)
    out = tmp_path / "tok.model"
    code = BLOCK_EXTRAS + f'''
from dinotxt.cli import main
code = main(["tokenizer", "train", "--data", {str(tmp_path / "world")!r}, "--out", {str(out)!r}, "--vocab-size", "48"])
bad = [m for m in ("lightning", "faiss", "matplotlib", "pyarrow", "tensorboard") if m in sys.modules]
print("exit", code, bad)
'''
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert "exit 0 []" in run.stdout, run.stdout + run.stderr
    assert out.is_file() and "from 24 captions" in run.stdout


def test_lightning_tips_and_expected_warnings_stay_off_the_console(tmp_path, caplog, recwarn):
    """The litlogger advertisement and the warnings dinotxt causes on purpose (eval-mode backbone, Lightning's
    pytree call) are dropped, each for a stated reason; Lightning's other messages still show."""
    import logging
    import warnings

    import lightning as L

    from dinotxt.utils.log import LIGHTNING_TIPS, LIGHTNING_WARNINGS, quiet_lightning

    assert all(reason for _, reason in LIGHTNING_WARNINGS + LIGHTNING_TIPS)
    quiet_lightning()
    with caplog.at_level(logging.INFO):
        L.Trainer(logger=L.pytorch.loggers.CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    assert not [r for r in caplog.records if "litlogger" in r.getMessage()]
    assert [r for r in caplog.records if "GPU available" in r.getMessage()]  # the rest still shows
    warnings.warn("Found 35 module(s) in eval mode at the start of training.", UserWarning)
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning)
    assert not [w for w in recwarn if "eval mode" in str(w.message) or "LeafSpec" in str(w.message)]
