from pathlib import Path

import pytest

import dinotxt
from dinotxt.config import ConfigError, load_train_config, model_config

RECIPES = sorted(str(p) for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_resolves(recipe):
    cfg = load_train_config(recipe)
    assert cfg.model.arch in dinotxt.list_models()


def test_paper_recipe_hyperparameters():
    cfg = load_train_config("recipes/dinotxt_vitl14.yaml")
    assert cfg.model.arch == "dinotxt_vitl14_reg4"
    assert (cfg.optim.lr, cfg.optim.weight_decay, list(cfg.optim.betas)) == (7e-4, 1e-4, [0.9, 0.99])
    assert (cfg.optim.warmup_steps, cfg.optim.max_steps, cfg.optim.grad_clip) == (2000, 50000, None)
    assert cfg.model.text.width == 1280 and cfg.model.vision_head.num_blocks == 2


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' in command line; did you mean 'optim.lr'"):
        load_train_config("recipes/debug.yaml", ["optim.lrr=3"])
    with pytest.raises(ConfigError, match="vision_head.num_blocks"):
        load_train_config("recipes/debug.yaml", ["model.vision_head.num_block=3"])


def test_unknown_key_in_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"'data.batch_sise' in .*bad.yaml; did you mean 'data.batch_size'"):
        load_train_config(str(bad))


def test_bad_value_type_and_override_syntax():
    with pytest.raises(ConfigError, match="invalid value"):
        load_train_config("recipes/debug.yaml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="key=value"):
        load_train_config("recipes/debug.yaml", ["optim.lr"])


def test_overrides_win_and_interpolations_resolve():
    cfg = load_train_config("recipes/debug.yaml", ["optim.lr=0.5", "data.world.root=/x"])
    assert cfg.optim.lr == 0.5 and cfg.data.train == "/x/train"


def test_unknown_model():
    with pytest.raises(ConfigError, match="did you mean 'dinotxt_vitl14_reg4'"):
        model_config("dinotxt_vitl14_reg")
