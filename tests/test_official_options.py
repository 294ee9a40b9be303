"""The official trainer's protocol and options (issue 26): the evaluation transform belongs to the model."""
import pytest
import torch
from PIL import Image

import dinotxt
from dinotxt.config import model_config
from dinotxt.models.transforms import model_eval_transform


def _size_after(transform, w=640, h=480):
    return tuple(transform(Image.new("RGB", (w, h))).shape[1:])


def test_the_zero_shot_transform_belongs_to_the_model():
    """The DINOv2 release (the paper): resize 256 / crop 224; the DINOv3 release's notebook: 512 / crop fraction 1."""
    v2, v3 = model_config("dinotxt_vitl14_reg4"), model_config("dinotxt_vitl16_dinov3")
    assert _size_after(model_eval_transform(v2)) == (224, 224)
    assert _size_after(model_eval_transform(v3)) == (512, 512)
    resize = lambda cfg, **kw: next(op for op in model_eval_transform(cfg, **kw).transforms  # noqa: E731
                                    if type(op).__name__ == "Resize").size
    assert resize(v2) == 256 and resize(v3) == 512
    assert resize(v2, image_size=336, crop_fraction=1.0) == 336  # the command line's override
    with pytest.raises(ValueError, match="crop fraction 1.5 must lie in"):
        model_eval_transform(v2, crop_fraction=1.5)


def test_a_checkpoint_records_its_protocol_and_load_returns_it(tmp_path):
    from test_checkpoint import CAPTIONS, hand_built

    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=16)
    model = hand_built(tok)
    model.zeroshot = {"image_size": 64, "crop_fraction": 1.0}
    folder = dinotxt.save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded, transform, _ = dinotxt.load(folder)
    assert loaded.zeroshot == {"image_size": 64, "crop_fraction": 1.0}
    assert _size_after(transform) == (64, 64)
    _, other, _ = dinotxt.load(folder, image_size=48, crop_fraction=0.5)
    assert _size_after(other) == (48, 48)


def test_whole_mode_is_the_notebooks_one_upsample_of_the_patch_cosines(tiny_model):
    """DINOv3 notebook, whole mode: raw patch cosines, ONE bilinear upsample to the label size, argmax (no
    softmax between two resizes): labels equal a float64 reference of exactly that."""
    import torch.nn.functional as F

    from dinotxt.inference.dense import segment_batch
    from dinotxt.inference.settings import DenseSettings
    from test_segmentation import random_classifier, random_image

    model = tiny_model.double().eval()
    clf = random_classifier(model, 5).double()
    image = random_image(56, 84, seed=3)
    label_size = (97, 131)  # not a multiple of the patch grid: the one resize matters
    res = segment_batch(model, [image], clf, [str(i) for i in range(5)],
                        DenseSettings(mode="whole", short_side=None), output_sizes=[label_size])[0]
    from dinotxt.inference.dense import prepare_image

    x, _ = prepare_image(image, None)
    with torch.no_grad():
        patches = model.encode_patches(x.double(), normalize=True)  # (1, h', w', D)
        cos = torch.einsum("bhwd,cd->bchw", patches, clf)
        reference = F.interpolate(cos, size=label_size, mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(res.labels, reference)
    assert torch.allclose(res.scores.sum(0), torch.ones(label_size, dtype=res.scores.dtype))


def test_the_head_takes_the_backbones_head_count():
    """The official head is built with backbone.num_heads; width // 64 differs for a ViT-7B (4096 wide, 32
    heads of 128): here a 256-wide backbone with 2 heads gives a head of 2 heads, not 4."""
    model = dinotxt.create_model("dinotxt_demo", backbone={"img_size": 56, "kwargs": {
        "embed_dim": 256, "depth": 1, "num_heads": 2}}, text={"width": 64, "depth": 1, "heads": 2})
    assert model.backbone.num_heads == 2
    assert model.vision_head.config_dict()["num_heads"] == 2
    assert model.vision_head.block_list[0].attn.num_heads == 2


def test_warmup_longer_than_training_is_refused():
    from dinotxt.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match=r"optim.warmup_steps=50 is longer than the run \(optim.max_steps=10\)"):
        load_train_config("debug", ["optim.warmup_steps=50", "optim.max_steps=10"])
    assert load_train_config("debug", ["optim.warmup_steps=10", "optim.max_steps=10"]).optim.warmup_steps == 10


def _official_text(tower, ids, pooler):
    """The official text tower's forward (dinov3/eval/text: text_transformer.py, text_tower.py,
    layers/block.py CausalSelfAttentionBlock), written out in float64 from the module's weights: the whole
    context (padding too), LayerScale on both branches, then the pooled token projected."""
    import torch.nn.functional as F

    bb = tower.backbone
    x = bb.token_embedding.weight[ids] + bb.positional_embedding[: ids.shape[1]]
    L, C = ids.shape[1], x.shape[-1]
    mask = torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1)
    for blk in bb.blocks:
        h = F.layer_norm(x, (C,), blk.attention_norm.weight, blk.attention_norm.bias, 1e-5)
        q, k, v = (h @ blk.attention.qkv.weight.t()).chunk(3, dim=-1)
        heads = blk.attention.num_heads
        split = lambda t: t.reshape(t.shape[0], L, heads, C // heads).transpose(1, 2)  # noqa: E731
        att = ((split(q) @ split(k).transpose(-1, -2)) / (C // heads) ** 0.5 + mask).softmax(-1) @ split(v)
        a = att.transpose(1, 2).reshape(x.shape) @ blk.attention.proj.weight.t() + blk.attention.proj.bias
        x = x + (a * blk.ls1.gamma if hasattr(blk.ls1, "gamma") else a)
        h = F.layer_norm(x, (C,), blk.ffn_norm.weight, blk.ffn_norm.bias, 1e-5)
        f = F.gelu(h @ blk.feed_forward.fc1.weight.t() + blk.feed_forward.fc1.bias) @ blk.feed_forward.fc2.weight.t() \
            + blk.feed_forward.fc2.bias
        x = x + (f * blk.ls2.gamma if hasattr(blk.ls2, "gamma") else f)
    x = F.layer_norm(x, (C,), bb.ln_final.weight, bb.ln_final.bias, 1e-5)
    pooled = {"first": x[:, 0], "last": x[:, -1], "argmax": x[torch.arange(len(ids)), ids.argmax(-1)]}[pooler]
    proj = tower.head.linear_projection
    return pooled @ proj.weight.t() if isinstance(proj, torch.nn.Linear) else pooled  # Identity: no projection


def test_the_text_tower_without_its_projection_equals_the_official_tower():
    """text_model_use_linear_projection=false where the width is the embedding width: no projection weight at all,
    the embedding is the pooled final-normed token; another width projects whatever the setting says."""
    from dinotxt.models.text_tower import TextTower

    torch.manual_seed(0)
    tower = TextTower(vocab_size=50, context_length=12, width=32, depth=2, heads=4, output_dim=32,
                      linear_projection=False).double().eval()
    assert not any("linear_projection" in k for k in tower.state_dict())
    assert tower.config_dict()["linear_projection"] is False
    ids = torch.tensor([[48, 5, 7, 49, 0, 0], [48, 9, 3, 4, 6, 49]])
    with torch.no_grad():
        torch.testing.assert_close(tower(ids), _official_text(tower, ids, "argmax"), rtol=1e-12, atol=1e-12)
    wider = TextTower(vocab_size=50, context_length=12, width=32, depth=1, heads=4, output_dim=48, linear_projection=False)
    assert wider.head.linear_projection.weight.shape == (48, 32)


@pytest.mark.parametrize("pooler", ["argmax", "first", "last"])
def test_text_pooler_dropout_and_layerscale_equal_the_official_tower(pooler):
    from dinotxt.models.text_tower import TextTower

    torch.manual_seed(0)
    tower = TextTower(vocab_size=50, context_length=12, width=32, depth=2, heads=4, output_dim=16, pooler=pooler,
                      dropout=0.1, ls_init=0.5).double().eval()  # eval: dropout off, as at inference
    with torch.no_grad():
        for blk in tower.backbone.blocks:  # LayerScale away from its init, so the test sees it
            blk.ls1.gamma.uniform_(0.2, 2.0)
            blk.ls2.gamma.uniform_(0.2, 2.0)
    ids = torch.tensor([[48, 5, 7, 49, 0, 0, 0, 0], [48, 9, 3, 4, 6, 2, 49, 0]])  # EOT = 49, then padding
    with torch.no_grad():
        ours, theirs = tower(ids), _official_text(tower, ids, pooler)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)  # float64: exact up to rounding
    tower.train()
    assert not torch.equal(tower(ids), tower(ids))  # dropout is on in training
    assert tower.config_dict()["pooler"] == pooler and tower.config_dict()["ls_init"] == 0.5


def test_sequential_order_reads_the_data_as_stored(tmp_path):
    """data.order=sequential: the official sampler's order (no shard shuffle, no shuffle buffer)."""
    from collections import Counter

    from dinotxt.data.sources import iter_tar_samples
    from dinotxt.data.stream import ImageTextStream
    from dinotxt.data.world import write_split

    shards = write_split(tmp_path / "w", 40, seed=0, size=32, samples_per_shard=10)
    stored = [s["__key__"] for shard in shards for s in iter_tar_samples(shard, Counter())]
    stream = iter(ImageTextStream(shards=shards, seed=5, shuffle_buffer=64, shuffle=False, rank=0, world_size=1))
    assert [next(stream)["key"] for _ in range(40)] == stored
    shuffled = iter(ImageTextStream(shards=shards, seed=5, shuffle_buffer=64, rank=0, world_size=1))
    assert [next(shuffled)["key"] for _ in range(40)] != stored


@pytest.mark.slow
def test_frozen_temperature_kept_checkpoints_and_automatic_resume(tmp_path):
    """optim.freeze_logit_scale keeps the temperature; trainer.keep_last_checkpoints keeps the newest N step
    checkpoints; trainer.auto_resume continues a run folder that holds a checkpoint without --resume."""
    from dinotxt.cli import main

    args = ["-q", "train", "debug", f"output_dir={tmp_path}", f"data.world.root={tmp_path / 'world'}",
            "data.world.num_train=64", "data.world.num_eval=24", "trainer.val_every_n_steps=0", "eval.diagnostics=null",
            "data.num_workers=0", "optim.freeze_logit_scale=true", "trainer.keep_last_checkpoints=2",
            "trainer.checkpoint_every_n_steps=1", "trainer.auto_resume=true"]
    assert main([*args, "optim.max_steps=4"]) == 0
    run = tmp_path / "debug"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*.ckpt")) == ["step_0000003.ckpt",
                                                                                  "step_0000004.ckpt"]
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)  # exp(init_logit_scale = ln(1/0.07))
    assert main([*args, "optim.max_steps=6"]) == 0  # the same command, a longer schedule: it continues
    assert __import__("json").loads((run / "metrics.json").read_text())["steps"] == 6


def _official_gram(backbone_patch_tokens, patch_tokens, idx, normalize):
    """dinov3/eval/text/gram_loss.py's formula, written out in float64 with the step's subset ``idx``."""
    import torch.nn.functional as F

    p, b = patch_tokens[:, idx, :], backbone_patch_tokens[:, idx, :]
    if normalize:
        p, b = F.normalize(p, dim=-1), F.normalize(b, dim=-1)
    return ((p @ p.transpose(-2, -1) - b @ b.transpose(-2, -1)) ** 2).mean()


@pytest.mark.parametrize("normalize", [True, False])
def test_gram_loss_value_and_gradient_equal_the_official_formula(normalize):
    from dinotxt.train.gram import gram_loss, gram_subset

    g = torch.Generator().manual_seed(0)
    head = torch.randn(3, 20, 8, dtype=torch.float64, generator=g, requires_grad=True)
    frozen = torch.randn(3, 20, 12, dtype=torch.float64, generator=g)
    subset = gram_subset(20, 0.5, generator=torch.Generator().manual_seed(1))
    assert len(subset) == 10 and len(set(subset.tolist())) == 10
    ours = gram_loss(head.double(), frozen, subset, normalize)
    # gram_loss computes in float32 (the training dtype); compare against float64 within float32's rounding
    ref = _official_gram(frozen, head, subset, normalize)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, head)
    (g_ref,) = torch.autograd.grad(_official_gram(frozen, head, subset, normalize), head)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-7)


def test_gram_loss_settings_are_checked(tmp_path):
    from dinotxt.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match="the head needs blocks"):
        load_train_config("debug", ["loss.gram.enabled=true", "model.vision_head.num_blocks=0"])
    with pytest.raises(ConfigError, match="must lie in"):
        load_train_config("debug", ["loss.gram.enabled=true", "loss.gram.patch_sampling_rate=0"])


def test_a_training_step_with_the_gram_loss_adds_it_and_counts_its_flops(tiny_model):
    from omegaconf import OmegaConf

    from dinotxt.train.flops import train_step_flops
    from dinotxt.train.loss import build_loss
    from dinotxt.train.step import contrastive_and_gram_loss, contrastive_loss
    from conftest import tiny_batch

    model = tiny_model.train()
    images, ids = tiny_batch(4, dtype=torch.float32)
    batch = {"image": images, "text": ids}
    gram = OmegaConf.create({"enabled": True, "weight": 2.0, "patch_sampling_rate": 0.5, "normalize_patch_tokens": True})
    torch.manual_seed(0)  # drop path: the same masks in both passes
    total, extra = contrastive_and_gram_loss(model, build_loss(), batch, gram)
    torch.manual_seed(0)
    plain = contrastive_loss(model, build_loss(), batch)
    torch.testing.assert_close(total, plain + 2.0 * extra, rtol=1e-5, atol=1e-6)
    total.backward()
    assert model.vision_head.block_list[0].attn.qkv.weight.grad is not None
    n = 16  # 56 px at patch 14: 16 patches; rate 0.5: 8
    with_gram = train_step_flops(model, 4, 17, 10, gram_patches=n // 2)["loss"]
    assert with_gram > train_step_flops(model, 4, 17, 10)["loss"]


def test_a_head_trained_on_another_backbone_width_is_one_line_naming_both(tmp_path, tiny_model):
    from omegaconf import OmegaConf

    from test_checkpoint import CAPTIONS

    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=100, context_length=16)
    folder = dinotxt.save_checkpoint(tmp_path / "ckpt", tiny_model, tok)
    cfg = OmegaConf.load(folder / "config.yaml")
    width = int(cfg.model.backbone.kwargs.embed_dim)
    cfg.model.backbone.kwargs.embed_dim = width * 2  # the config now names a wider backbone than the head saw
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ValueError, match=rf"trained on a {width}-wide backbone, but model.backbone .* is {2 * width} wide"):
        dinotxt.load(folder)


def _loss_and_grads(model, batch, seed=0):
    from dinotxt.train.loss import build_loss
    from dinotxt.train.step import contrastive_loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path and dropout draw the same masks in every variant
    loss = contrastive_loss(model, build_loss(), batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_equals_the_plain_path(mode):
    """Full and selective (the official policy) checkpointing recompute exactly what the plain pass computed:
    the same loss and gradients in float64 (dropout and drop path replayed)."""
    from omegaconf import OmegaConf

    from conftest import TINY_MODEL, tiny_batch
    from dinotxt.models.layers.checkpointing import saved_ops
    from dinotxt.train.run import apply_speed_options

    assert torch.ops.aten.mm.default in saved_ops()
    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", **{**TINY_MODEL, "text": {**TINY_MODEL["text"], "dropout": 0.1},
                                                   "vision_head": {**TINY_MODEL["vision_head"], "drop_path": 0.2}})
    model = model.double().train()
    images, ids = tiny_batch(6)
    batch = {"image": images, "text": ids}
    plain = _loss_and_grads(model, batch)
    apply_speed_options(model, OmegaConf.create({"activation_checkpointing": mode, "compile": False}))
    assert model.vision_head.grad_checkpointing == mode and model.text.backbone.grad_checkpointing == mode
    again = _loss_and_grads(model, batch)
    torch.testing.assert_close(again[0], plain[0], rtol=1e-12, atol=1e-12)
    assert again[1].keys() == plain[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(again[1][name], plain[1][name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.slow
def test_compiling_each_block_keeps_the_loss_gradients_and_state_dict_keys():
    """trainer.compile=blocks (torch.compile per block, inductor on CPU): fp32 loss and gradients equal the
    eager pass within fp32 re-association (fused kernels sum in another order: 1e-5 relative)."""
    from omegaconf import OmegaConf

    from conftest import TINY_MODEL, tiny_batch
    from dinotxt.train.run import apply_speed_options

    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", **{**TINY_MODEL, "vision_head": {**TINY_MODEL["vision_head"],
                                                                                  "drop_path": 0.0}}).train()
    keys = list(model.state_dict())
    images, ids = tiny_batch(4, dtype=torch.float32)
    batch = {"image": images, "text": ids}
    eager = _loss_and_grads(model, batch)
    apply_speed_options(model, OmegaConf.create({"activation_checkpointing": None, "compile": "blocks"}))
    compiled = _loss_and_grads(model, batch)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_patch_tokens_from_the_nth_last_layer():
    """model.backbone.patch_token_layer=n: the [CLS] token of the last layer, registers and patches of the
    n-th last, each final-normed (the official get_intermediate_layers(n, norm=True) split), written out
    block by block in float64; n=1 is the plain output."""
    torch.manual_seed(0)
    spec = {"img_size": 56, "kwargs": {"depth": 3, "embed_dim": 96, "num_heads": 2}}
    text = {"width": 64, "depth": 1, "heads": 2, "vocab_size": 100, "context_length": 16}
    model = dinotxt.create_model("dinotxt_demo", backbone={**spec, "patch_token_layer": 2}, text=text).double()
    enc = model.backbone.encoder
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64)
    with torch.no_grad():
        h = enc.norm_pre(enc._pos_embed(enc.patch_embed(x)))
        states = []
        for blk in enc.blocks:
            h = blk(h)
            states.append(enc.norm(h))
        expected = torch.cat([states[-1][:, :1], states[-2][:, 1:]], dim=1)  # CLS last; the rest 2nd last
        got = model.backbone(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert model.config.backbone.patch_token_layer == 2
    plain = dinotxt.create_model("dinotxt_demo", backbone=spec, text=text).double()
    plain.backbone.load_state_dict(model.backbone.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.backbone(x), states[-1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="patch_token_layer=5 but the backbone has 3 blocks"):
        dinotxt.create_model("dinotxt_demo", backbone={**spec, "patch_token_layer": 5}, text=text).backbone(x.float())


def _official_head_embedding(head, tokens):
    """The official VisionHead + VisionTower.forward (dinov3/eval/text/vision_tower.py) written out in float64
    for a head of no blocks: ln_final on every token, the bias-free linear projection on every token, then
    [CLS] || mean of the projected patch tokens (registers dropped)."""
    import torch.nn.functional as F

    x = tokens
    if isinstance(head.ln_final, torch.nn.LayerNorm):
        x = F.layer_norm(x, (x.shape[-1],), head.ln_final.weight, head.ln_final.bias, 1e-5)
    x = x @ head.linear_projection.weight.t()
    cls, patches = x[:, 0], x[:, head.num_prefix_tokens:]
    return torch.cat([cls, patches.mean(1)], -1) if head.use_patch_tokens else cls


@pytest.mark.parametrize("use_patch_tokens", [True, False])
def test_the_linear_projection_equals_the_official_head_and_sets_the_embedding_width(use_patch_tokens):
    """vision_head.embed_dim / linear_projection (the official embed_dim and use_linear_projection): a bias-free
    D -> E/2 (or E) map on every token after ln_final, initialised N(0, 1/D); the embedding, the dense tokens,
    the text width and the pooled-cache path all follow it."""
    from dinotxt.models.vision_head import VisionHead

    torch.manual_seed(0)
    D, E = 32, 24
    head = VisionHead(D, num_prefix_tokens=3, num_blocks=0, use_patch_tokens=use_patch_tokens, final_norm=False,
                      embed_dim=E).double()
    P = E // 2 if use_patch_tokens else E
    assert head.linear_projection.weight.shape == (P, D) and head.output_dim == E and head.token_dim == P
    tokens = torch.randn(4, 3 + 9, D, dtype=torch.float64)
    torch.testing.assert_close(head(tokens), _official_head_embedding(head, tokens), rtol=1e-12, atol=1e-12)
    # the pooled cache ([CLS, mean of patches]) gives the same embedding: the mean commutes with the linear map
    torch.testing.assert_close(head.forward_pooled(head.pool_frozen_tokens(tokens)), head(tokens), rtol=1e-12, atol=1e-12)
    cfg = head.config_dict()
    assert cfg["embed_dim"] == E and cfg["linear_projection"] is True
    # the official init: std 1/sqrt(D) (a 512 x 1024 map: the sample std within 3% of it)
    big = VisionHead(1024, num_blocks=0, final_norm=False, use_patch_tokens=True, linear_projection=True)
    assert big.output_dim == 2048 and abs(big.linear_projection.weight.std().item() * 1024 ** 0.5 - 1) < 0.03
    # without either setting there is no projection (the release's layout, no extra key)
    assert not VisionHead(D, num_blocks=0).has_projection


def test_a_projected_model_trains_saves_loads_and_segments(tmp_path):
    """A whole model with vision_head.embed_dim: the text tower follows the width, encode_patches returns projected
    tokens that pair with dense_text's half, and a checkpoint reloads the projection strictly."""
    from conftest import TINY_MODEL
    from test_checkpoint import CAPTIONS

    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", **dict(TINY_MODEL, vision_head=dict(TINY_MODEL["vision_head"],
                                                                                      embed_dim=48))).eval()
    assert model.embed_dim == 48 and model.text.output_dim == 48
    images = torch.randn(2, 3, 56, 56)
    patches = model.encode_patches(images)
    assert patches.shape == (2, 4, 4, 24)
    text = model.encode_text(torch.tensor([[5, 6, 99, 0]]))
    assert model.dense_text(text).shape == (1, 24)
    # the embedding's patch half is the mean of the dense tokens
    torch.testing.assert_close(model.encode_image(images)[:, 24:], patches.flatten(1, 2).mean(1), rtol=1e-5, atol=1e-5)
    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=100, context_length=16)
    folder = dinotxt.save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded, _, _ = dinotxt.load(folder)
    assert torch.equal(loaded.vision_head.linear_projection.weight, model.vision_head.linear_projection.weight)
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))


def test_embedding_widths_the_head_cannot_make_are_one_line():
    from dinotxt.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match=r"vision_head.embed_dim=47 must be a positive multiple of 2"):
        load_train_config("debug", ["model.vision_head.embed_dim=47"])
    from dinotxt.data.feature_cache import cache_spec

    cfg = load_train_config("debug", ["model.vision_head.num_blocks=0", "model.vision_head.final_norm=false",
                                      "model.vision_head.linear_projection=true", "model.vision_head.pooling=max",
                                      "cache.tokens=pooled"])
    with pytest.raises(ConfigError, match="projects each patch token before max pooling"):
        cache_spec(cfg)
