"""The sigmoid loss of SigLIP (dinotxt/train/loss.py, ``loss.kind=sigmoid``): the dense and the blocked loss equal a
naive pair-by-pair reference with their gradients (float64), stay fp32 under autocast, equal one process on
the global batch under DDP (2 gloo processes), and train through gradient caching; the bias is a model
parameter that checkpoints and exports carry, and the config fills SigLIP's -10 when it is left unset."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_MODEL, tiny_batch
from multiproc import init_gloo, run_ranks
from numerics import FP32_U, assert_close, assert_float64_equal, assert_grads_float64_equal

from dinotxt.train.loss import ClipLoss, SigLipLoss, build_loss, sigmoid_loss


def naive_sigmoid_loss(img, txt, scale, bias):
    """SigLIP's loss written out pair by pair in float64: ``-sum_ij log sigmoid(z_ij (s x_i.y_j + b)) / n``."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (scale.double() * img[i] @ txt[j] + bias.double()))
    return total / n


def _leaves(n=8, dim=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, dim, generator=g, dtype=dtype).requires_grad_()
    txt = torch.randn(n, dim, generator=g, dtype=dtype).requires_grad_()
    scale = torch.tensor(10.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-2.5, dtype=dtype, requires_grad=True)  # near the data's logits: no term saturates
    return img, txt, scale, bias


def _grads(loss, leaves):
    return dict(zip(("img", "txt", "scale", "bias"), torch.autograd.grad(loss, leaves)))


@pytest.mark.parametrize("block_size", [None, 3, 8, 64])
def test_sigmoid_loss_and_its_gradients_are_the_naive_pairwise_reference(block_size):
    """Dense, and blocked with a tile that does not divide the batch, one tile, and a tile larger than it."""
    leaves = _leaves()
    ref = naive_sigmoid_loss(*leaves)
    expected = _grads(ref, leaves)
    loss = sigmoid_loss(*leaves, block_size=block_size)
    assert_float64_equal(loss, ref, f"loss, block {block_size}")
    assert_grads_float64_equal(_grads(loss, leaves), expected)
    assert_float64_equal(SigLipLoss(block_size)(*leaves), ref, "SigLipLoss")


def test_blocked_sigmoid_backward_passes_gradcheck():
    from dinotxt.train.loss import _BlockedSigmoid

    img, txt, scale, bias = _leaves(5, 4)
    assert torch.autograd.gradcheck(lambda q, k, s, b: _BlockedSigmoid.apply(q, k, s, b, 0, 2), (img, txt, scale, bias))
    # the rows of one rank against more texts (the DDP case): positives at an offset
    k = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, s, b: _BlockedSigmoid.apply(q, k, s, b, 4, 2), (img, k, scale, bias))


def test_the_positives_are_the_pairs_and_the_bias_counts():
    """Not a symmetric formula by accident: swapping the captions of two images changes the loss, and the bias
    enters every term (its gradient is sum(sigmoid(L)) - n, zero only where the loss is balanced)."""
    img, txt, scale, bias = _leaves()
    base = sigmoid_loss(img, txt, scale, bias)
    assert abs(float(sigmoid_loss(img, txt[[1, 0, *range(2, 8)]], scale, bias) - base)) > 1e-3
    assert abs(float(sigmoid_loss(img, txt, scale, bias + 1.0) - base)) > 1e-3
    with pytest.raises(ValueError, match="init_logit_bias"):
        sigmoid_loss(img, txt, scale, None)


def test_fp32_sigmoid_loss_is_within_fp32_roundoff_and_stays_fp32_under_autocast():
    img, txt, scale, bias = (t.detach().float() for t in _leaves())
    ref = naive_sigmoid_loss(img, txt, scale, bias)
    # n terms per row, each with logits of size <= 10 + 2.5 carrying ~12.5 * dim * u: bounded by n x that
    assert_close(sigmoid_loss(img, txt, scale, bias).double(), ref, 8 * 13 * 16 * FP32_U, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for block in (None, 3):
            loss = sigmoid_loss(img, txt, scale, bias, block_size=block)
            assert loss.dtype == torch.float32
            assert_close(loss.double(), ref, 8 * 13 * 16 * FP32_U, f"under autocast, block {block}")


def _model(bias=-10.0):
    import dinotxt

    torch.manual_seed(0)
    return dinotxt.create_model("dinotxt_demo", **TINY_MODEL, init_logit_bias=bias).double()


def test_the_open_clip_idiom_is_the_training_loss_and_the_bias_is_a_trained_parameter():
    from dinotxt.train.step import contrastive_loss

    model = _model()
    images, ids = tiny_batch()
    out = model(images, ids)
    assert set(out) == {"logit_scale", "logit_bias", "image_features", "text_features"}
    idiom = SigLipLoss()(**out)
    trained = contrastive_loss(model, SigLipLoss(), {"image": images, "text": ids})
    assert_float64_equal(idiom, trained, "SigLipLoss()(**model(images, ids))")
    trained.backward()
    assert model.logit_bias.grad is not None and float(model.logit_bias.grad.abs()) > 0
    # at b = -10 nearly every negative pair costs nothing and each positive ~10: the loss starts near 10
    assert 5 < float(trained) < 15
    # the InfoNCE does not depend on a bias (softmax rows shift alike): a biased model scores the same
    plain = _model(bias=None)
    assert plain.logit_bias is None and "logit_bias" not in plain(images, ids)
    assert_float64_equal(ClipLoss()(**out), ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"]),
                         "ClipLoss ignores the bias")
    logits, _ = model.get_logits(images, ids)
    assert_float64_equal(logits, out["logit_scale"] * out["image_features"] @ out["text_features"].t() - 10.0, "get_logits")
    assert isinstance(build_loss("sigmoid", 4), SigLipLoss) and build_loss("sigmoid", 4).block_size == 4
    with pytest.raises(ValueError, match="unknown loss kind 'softmax'"):
        build_loss("softmax")


class LossModule(nn.Module):
    def __init__(self, model, block_size):
        super().__init__()
        self.model, self.loss_fn = model, SigLipLoss(block_size)

    def forward(self, batch):
        from dinotxt.train.step import contrastive_loss

        return contrastive_loss(self.model, self.loss_fn, batch)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, world, port)
    try:
        images, ids = tiny_batch()
        n = images.shape[0] // world
        local = {"image": images[rank * n:(rank + 1) * n], "text": ids[rank * n:(rank + 1) * n]}
        results = {}
        for block in (None, 3):
            ddp = DDP(LossModule(_model(), block))
            loss = ddp(local)
            loss.backward()  # DDP averages the ranks' gradients
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[str(block)] = (total.item() / world,
                                   {k: p.grad.tolist() for k, p in ddp.module.model.named_parameters() if p.grad is not None})
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sigmoid_loss_and_gradients_equal_one_process_on_the_global_batch():
    """Each rank scores its 4 images against the 8 gathered texts; the mean of the ranks' losses and the
    averaged gradients (the bias's included) are the single-process loss of the 8 x 8 pairs, dense and blocked."""
    model = _model()
    images, ids = tiny_batch()
    ref = LossModule(model, None)({"image": images, "text": ids})
    ref.backward()
    expected = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert "logit_bias" in expected and "logit_scale" in expected
    results = run_ranks(_ddp_worker, 2, timeout=240)
    for block in ("None", "3"):
        for rank in (0, 1):
            loss, grads = results[rank][block]
            assert_float64_equal(torch.tensor(loss, dtype=torch.float64), ref.detach(), f"loss, block {block}")
            assert_grads_float64_equal({k: torch.tensor(g, dtype=torch.float64) for k, g in grads.items()}, expected)


def test_gradient_caching_with_the_sigmoid_loss_equals_one_pass():
    from dinotxt.train.gradcache import gradcache_backward
    from dinotxt.train.step import contrastive_loss

    images, ids = tiny_batch(12)
    for block in (None, 5):
        one, cached = _model(), _model()
        loss_fn = SigLipLoss(block)
        ref = contrastive_loss(one, loss_fn, {"image": images, "text": ids})
        ref.backward()
        micro = [{"image": images[i:i + 4], "text": ids[i:i + 4]} for i in range(0, 12, 4)]
        loss = gradcache_backward(cached, loss_fn, micro, seeds=[0, 1, 2])
        assert_float64_equal(loss, ref.detach(), f"loss, block {block}")
        assert_grads_float64_equal({k: p.grad for k, p in cached.named_parameters() if p.grad is not None},
                                   {k: p.grad for k, p in one.named_parameters() if p.grad is not None})


def test_gradient_caching_of_the_infonce_on_a_model_with_a_bias_leaves_the_bias_alone():
    """The InfoNCE does not depend on a bias: a biased model trains with it, the bias gets no gradient."""
    from dinotxt.train.gradcache import gradcache_backward

    images, ids = tiny_batch(8)
    model = _model()
    gradcache_backward(model, ClipLoss(), [{"image": images[:4], "text": ids[:4]}, {"image": images[4:], "text": ids[4:]}],
                       seeds=[0, 1])
    assert model.logit_bias.grad is None and model.logit_scale.grad is not None


def test_config_fills_siglips_bias_and_refuses_a_bias_the_infonce_would_ignore():
    from dinotxt.config import ConfigError, load_train_config

    cfg = load_train_config("debug", ["loss.kind=sigmoid"])
    assert cfg.model.init_logit_bias == -10.0
    assert load_train_config("debug", ["loss.kind=sigmoid", "model.init_logit_bias=-5"]).model.init_logit_bias == -5.0
    assert load_train_config("debug").model.init_logit_bias is None
    with pytest.raises(ConfigError, match="set loss.kind=sigmoid, or model.init_logit_bias=null"):
        load_train_config("debug", ["model.init_logit_bias=-10"])
    with pytest.raises(ConfigError, match="loss.kind"):
        load_train_config("debug", ["loss.kind=softmax"])
    siglip = load_train_config("siglip_demo")
    assert siglip.loss.kind == "sigmoid" and math.isclose(siglip.model.init_logit_scale, math.log(10), rel_tol=1e-6)
    assert math.isclose(siglip.model.init_logit_bias, -math.log(siglip.data.batch_size - 1), rel_tol=1e-4)


def test_the_bias_survives_checkpoint_single_file_and_official_export(tmp_path):
    import json

    import dinotxt
    from dinotxt.checkpoint import save_checkpoint
    from dinotxt.checkpoint.export import export_official, export_safetensors

    model = _model(-7.5).float()
    with torch.no_grad():
        model.logit_bias.fill_(-6.25)
    tok = dinotxt.train_tokenizer(["a red circle", "a blue square", "a green star"] * 20, vocab_size=60,
                                  context_length=16)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok)
    loaded, _, _ = dinotxt.load(ckpt)
    assert float(loaded.logit_bias) == -6.25 and loaded.init_logit_bias == -7.5
    single = export_safetensors(ckpt)["out"]
    assert float(dinotxt.load(single)[0].logit_bias) == -6.25
    report = export_official(ckpt, tmp_path / "official")
    assert report["logit_bias"] == -6.25
    assert any("sigmoid loss" in note for note in report["notes"])
    assert json.loads((tmp_path / "official" / "export.json").read_text())["logit_bias"] == -6.25
    from dinotxt.checkpoint import read_checkpoint
    from dinotxt.checkpoint.push import backbone_provenance, model_card

    cfg, state, _ = read_checkpoint(ckpt)
    card = model_card("me/siglip", cfg, state, {}, {}, None, backbone_provenance(cfg.model.backbone), False,
                      {"license": "apache-2.0"})
    assert "SigLIP's sigmoid loss" in card and "`model.logit_bias`" in card
