"""Every fast path against the plain one on the same input: padding trimmed from the token
batch, EOT-only projection, the frozen backbone under inference mode, bf16 autocast for the
backbone (NOT exact: a tolerance), pooled LiT tokens, activation checkpointing, and the
FLOP count used for MFU against torch's own FLOP counter."""
import copy

import pytest
import torch
import torch.nn.functional as F

import dinotxt
from conftest import TINY_BACKBONE, TINY_TEXT
from dinotxt.train.loss import ClipLoss
from dinotxt.models.text_tower import trim_padding
from dinotxt.models.backbone import frozen_tokens
from dinotxt.train.step import contrastive_loss
from numerics import assert_float64_equal, assert_grads_float64_equal


def _ids(batch, length, vocab=100, lengths=(3, 5, 9, 4)):
    """Token batches ``[SOT] pieces [EOT] 0 ...`` with EOT = vocab - 1 (the largest id)."""
    g = torch.Generator().manual_seed(batch * 7 + length)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = lengths[i % len(lengths)]
        ids[i, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
        ids[i, n] = vocab - 1
    return ids


def _untrimmed_text_features(text, ids):
    """The reference: every column through the tower, all tokens projected, pooled at EOT."""
    tokens = text.head.linear_projection(text.backbone(ids))
    return tokens[torch.arange(ids.shape[0]), ids.argmax(-1)]


def test_trimming_padding_and_eot_projection_equal_the_full_context(tiny_model):
    """Exact claims (causal attention makes the padding inert; the projection commutes with the
    pooling), so both paths run in float64."""
    text = copy.deepcopy(tiny_model.text).double()
    ids = _ids(6, 16)
    assert trim_padding(ids).shape == (6, 10)  # longest caption: 9 pieces + EOT
    assert_float64_equal(text(ids), _untrimmed_text_features(text, ids), "trimmed text features")
    ids[2] = torch.randint(1, 97, (16,))
    ids[2, -1] = 99  # a caption that fills the context: nothing to trim
    assert torch.equal(trim_padding(ids), ids)
    ids = _ids(6, 16)
    # gradients too
    text.zero_grad()
    text(ids).pow(2).sum().backward()
    fast = {k: p.grad.clone() for k, p in text.named_parameters() if p.grad is not None}
    text.zero_grad()
    _untrimmed_text_features(text, ids).pow(2).sum().backward()
    slow = {k: p.grad for k, p in text.named_parameters() if p.grad is not None}
    # rows of unused positions get no gradient on the fast path, exactly zero on the slow one
    assert_grads_float64_equal(fast, slow)
    assert torch.equal(slow["backbone.positional_embedding"][10:], torch.zeros_like(slow["backbone.positional_embedding"][10:]))


def test_frozen_backbone_under_inference_mode_equals_plain_and_head_still_trains(tiny_model):
    images = torch.randn(3, 3, 56, 56)
    tokens = frozen_tokens(tiny_model.backbone, images)
    with torch.no_grad():
        assert torch.equal(tokens, tiny_model.backbone(images))
    assert not tokens.is_inference() and not tokens.requires_grad
    loss = tiny_model.encode_image_tokens(tokens).pow(2).sum()
    loss.backward()  # an inference tensor saved for backward would raise here
    assert tiny_model.vision_head.block_list[0].attn.qkv.weight.grad is not None


def test_bf16_autocast_backbone_is_close_not_exact():
    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone={"img_size": 112}, text=TINY_TEXT)  # the demo backbone
    images = torch.randn(4, 3, 112, 112)
    exact = frozen_tokens(model.backbone, images)
    fast = frozen_tokens(model.backbone, images, "bfloat16")
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    rel = ((fast - exact).norm() / exact.norm()).item()
    assert 0 < rel < 2e-2, rel  # bf16 has an 8-bit mantissa: close, never bit-exact
    cos = F.cosine_similarity(model.encode_image_tokens(fast), model.encode_image_tokens(exact), dim=-1)
    assert cos.min().item() > 0.999
    with pytest.raises(ValueError, match="backbone_autocast"):
        frozen_tokens(model.backbone, images, "float8")


@pytest.mark.parametrize("head", [
    {"num_blocks": 0, "use_patch_tokens": False, "final_norm": False},  # LiT
    {"num_blocks": 0, "use_patch_tokens": False, "final_norm": True},
    {"num_blocks": 0, "final_norm": False, "pooling": "max"},
])
def test_pooled_tokens_equal_the_full_head(head):
    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT, vision_head=head)
    tokens = frozen_tokens(model.backbone, torch.randn(3, 3, 56, 56))
    pooled = model.vision_head.pool_frozen_tokens(tokens)
    assert pooled.shape == (3, 2, 96)
    model, tokens = model.double(), tokens.double()  # mathematically equal: compare in float64
    assert_float64_equal(model.vision_head.forward_pooled(model.vision_head.pool_frozen_tokens(tokens)), model.vision_head(tokens))


def test_pooled_tokens_refused_where_inexact(tiny_model):
    with pytest.raises(ValueError, match="num_blocks=0"):
        tiny_model.vision_head.forward_pooled(torch.zeros(1, 2, 96))


def test_activation_checkpointing_gives_the_same_gradients():
    """Recompute in the backward pass replays the same drop-path masks: the same gradients (float64)."""
    torch.manual_seed(0)
    plain = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                                 vision_head={"num_blocks": 2, "drop_path": 0.3}).double()
    ckpt = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=dict(TINY_TEXT, grad_checkpointing=True),
                                vision_head={"num_blocks": 2, "drop_path": 0.3, "grad_checkpointing": True}).double()
    ckpt.load_trainable_state_dict(plain.trainable_state_dict())
    assert ckpt.vision_head.grad_checkpointing and ckpt.text.backbone.grad_checkpointing
    batch = {"image": torch.randn(4, 3, 56, 56, dtype=torch.float64), "text": _ids(4, 16)}
    grads = []
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(3)  # drop path draws the same masks; checkpointing replays them in the recompute
        contrastive_loss(m, ClipLoss(), batch).backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
    assert_grads_float64_equal(grads[0], grads[1])


@pytest.mark.parametrize("cached, unlocked", [(False, 0), (True, 0), (False, 1)])
def test_flop_count_matches_torch_flop_counter(cached, unlocked):
    from torch.utils.flop_counter import FlopCounterMode

    from dinotxt.train.flops import attention_flops, train_step_flops

    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone={**TINY_BACKBONE, "trainable_blocks": unlocked},
                                 text=TINY_TEXT, vision_head={"num_blocks": 2, "drop_path": 0.3}).train()
    images, ids = torch.randn(4, 3, 56, 56), _ids(4, 16)
    tokens = frozen_tokens(model.backbone, images)
    batch = {"tokens": tokens, "text": ids} if cached else {"image": images, "text": ids}
    with FlopCounterMode(display=False) as counter:
        contrastive_loss(model, ClipLoss(), batch).backward()
    text_len = trim_padding(ids).shape[1]
    ours = train_step_flops(model, 4, tokens.shape[1], text_len, cached=cached)
    # attention (forward) of the trained blocks and of the frozen backbone (forward only); the head's
    # branches run on floor(0.7 * 4) = 2 rows (batch-subset stochastic depth at the default 0.3)
    head_rows = 2
    assert model.vision_head.drop_path == 0.3 and model.vision_head.training
    depth = TINY_BACKBONE["kwargs"]["depth"]
    trained = (head_rows * len(model.vision_head.block_list) * attention_flops(tokens.shape[1], 96)
               + 4 * len(model.text.backbone.blocks) * attention_flops(text_len, 64)
               + 4 * unlocked * attention_flops(tokens.shape[1], 96))
    frozen = 0 if cached else 4 * (depth - unlocked) * attention_flops(tokens.shape[1], 96)
    counts = counter.get_flop_counts()["Global"]
    sdpa = sum(v for op, v in counts.items() if "scaled_dot_product" in str(op))
    # every matmul outside attention, exactly (unlocked blocks: 3x, as their first op, a LayerNorm with
    # trained weights, makes every matmul after it need its input gradient)
    assert counter.get_total_flops() - sdpa == ours["total"] - 3 * trained - frozen
    if sdpa:  # torch versions that count the CPU SDPA kernel: its backward is 2.5x the forward
        # (it recomputes the scores) where model FLOPs count 2x
        assert sdpa == 3 * trained + frozen + trained // 2
    assert (ours["backbone"] == 0) == cached
