"""Every shipped recipe resolves (no unknown key, valid choices) and builds its model at reduced
depth (the recipe's widths, one block), found by name the way `dinotxt train NAME` finds it."""
import pytest
import yaml

import dinotxt
from dinotxt.config import ConfigError, find_recipe, load_train_config, shipped_recipes

RECIPES = shipped_recipes()


def kind(name):
    """What a recipe configures, from its top-level sections."""
    keys = set(yaml.safe_load(find_recipe(name).read_text()) or {})
    return "suite" if "tasks" in keys else "curation" if keys & {"pool", "embed", "cluster"} else "train"


KINDS = {name: kind(name) for name in RECIPES}


def test_the_shipped_recipes_are_found_by_name_and_as_paths():
    assert {"demo", "debug", "dinotxt_vitl14", "lit_vitl14", "curation/demo", "eval/demo_suite"} <= set(RECIPES)
    assert find_recipe("demo").resolve() == find_recipe("recipes/demo.yaml").resolve() == find_recipe("demo.yaml").resolve()
    with pytest.raises(ConfigError, match="did you mean 'demo'"):
        find_recipe("dem")


@pytest.mark.parametrize("name", [r for r, k in KINDS.items() if k == "train"])
def test_training_recipe_builds_its_model(name):
    cnn = load_train_config(name).model.backbone.name.startswith("cnn:")  # a CNN token source is small already
    cfg = load_train_config(name, [*([] if cnn else ["model.backbone.kwargs.depth=1"]), "model.text.depth=1",
                                   "model.backbone.weights=null"])
    model = dinotxt.create_model(cfg.model)
    assert cnn or len(model.backbone.encoder.blocks) == 1
    assert model.text.output_dim == model.embed_dim == model.vision_head.output_dim
    if cfg.model.text.pretrained:  # a pretrained text encoder keeps its own size (model.text.depth does not apply)
        assert model.text.freeze_layers == cfg.model.text.freeze_layers and model.text.depth > 1
        return
    assert len(model.text.backbone.blocks) == 1
    assert model.config.text.width == load_train_config(name).model.text.width  # its own widths


@pytest.mark.parametrize("name", [r for r, k in KINDS.items() if k == "curation"])
def test_curation_recipe_builds_its_embedding_backbone(name):
    from curation.config import load_curation_config
    from curation.embed_pool import backbone_config
    from dinotxt.models.factory import create_backbone

    cfg = load_curation_config(name, ["pool.data=/nowhere", "embed.backbone.weights=null"])
    bcfg = backbone_config(cfg.embed)
    if bcfg.name.startswith("cnn:"):  # a CNN token source (the demo's EfficientNet-Lite0): small already
        bcfg.img_size = 64
        backbone = create_backbone(bcfg)
        assert backbone.embed_dim > 0 and backbone.patch_size == 32
        return
    bcfg.kwargs = {**bcfg.kwargs, "depth": 1}
    backbone = create_backbone(bcfg)
    assert backbone.embed_dim > 0 and len(backbone.encoder.blocks) == 1


@pytest.mark.parametrize("name", [r for r, k in KINDS.items() if k == "suite"])
def test_eval_suite_recipe_resolves(name):
    from dinotxt.evaluation.suite import TASKS, load_suite_config

    cfg = load_suite_config(name)
    assert cfg.tasks and all(t.task in TASKS for t in cfg.tasks)
    assert sum(bool(cfg.model.get(k)) for k in ("checkpoint", "open_clip", "loader")) == 1


def test_every_kind_of_recipe_is_shipped():
    assert set(KINDS.values()) == {"train", "curation", "suite"} and KINDS["curation/demo_train"] == "train"


@pytest.mark.parametrize("name", [r for r, k in KINDS.items() if k == "train"])
def test_training_recipes_are_short_diffs_that_restate_no_default(name):
    """A recipe says only what differs from the defaults (the dataclasses) and its registry entry."""
    from omegaconf import OmegaConf

    from dinotxt.config import TrainConfig, model_config

    raw = OmegaConf.to_container(OmegaConf.load(find_recipe(name)), resolve=False)
    base = OmegaConf.structured(TrainConfig)
    base.model = model_config(raw.get("model", {}).get("arch", base.model.arch))

    def leaves(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict) and not k.endswith("kwargs"):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    restated = [k for k, v in leaves(raw) if k != "model.arch" and OmegaConf.select(base, k) == v]
    assert not restated, f"{name} restates defaults: {restated}"
