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


@pytest.mark.parametrize("override, message", [
    ("model.vision_head.pooling=median", "model.vision_head.pooling='median' is not one of mean, max, gem"),
    ("cache.dtype=float8", "cache.dtype='float8' is not one of float16, bfloat16"),
    ("trainer.backbone_autocast=float16", "trainer.backbone_autocast='float16' is not one of null, bfloat16"),
    ("model.vision_head.attn_impl=flash", "attn_impl='flash' is not one of sdpa, xformers"),
])
def test_choice_fields_fail_at_load_with_their_choices(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_train_config("debug", [override])


def test_each_default_is_written_once_in_the_schema():
    """No defaults file restates the dataclasses: the resolved defaults are the schema's own."""
    from omegaconf import OmegaConf

    from dinotxt.config import CONFIG_DIR, TrainConfig

    assert not (CONFIG_DIR / "defaults.yaml").exists()
    cfg = load_train_config(None)
    schema = OmegaConf.structured(TrainConfig)
    schema.model = model_config(schema.model.arch)
    assert OmegaConf.to_container(cfg) == {**OmegaConf.to_container(schema), "name": "run"}


def test_one_loader_for_training_curation_and_the_eval_suite():
    from curation.config import load_curation_config
    from dinotxt.evaluation.suite import load_suite_config

    with pytest.raises(ConfigError, match="did you mean 'cluster.iters'"):
        load_curation_config("curation/debug", ["cluster.iter=3"])
    with pytest.raises(ConfigError, match="combine.mode='xor' is not one of"):
        load_curation_config("curation/debug", ["combine.mode=xor"])
    with pytest.raises(ConfigError, match=r"tasks\[0\]: mode='tiles' is not one of slide, whole"):
        load_suite_config("eval/demo_suite", ["tasks=[{task: segmentation, dataset: demo, root: x, mode: tiles}]"])
