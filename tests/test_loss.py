"""The contrastive loss: against a naive row-by-row reference (float64), fp32 under every
autocast, and the temperature convention of the CLIP ecosystem (``ClipLoss()(**model(...))``)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinotxt.train.loss import ClipLoss, clip_loss
from numerics import FP32_U, assert_close, assert_float64_equal


def naive_clip_loss(img, txt, scale):
    """Full-batch reference written out row by row, in float64; ``scale`` is the multiplier exp(t)."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    s = scale.double()
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([s * img[i] @ txt[j] for j in range(n)])
        col = torch.stack([s * txt[i] @ img[j] for j in range(n)])
        total = total + (torch.logsumexp(row, 0) - row[i]) + (torch.logsumexp(col, 0) - col[i])
    return total / (2 * n)


def _features(n=8, dim=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, dim, generator=g, dtype=dtype), torch.randn(n, dim, generator=g, dtype=dtype)


def test_clip_loss_is_the_naive_reference_and_takes_the_exponentiated_scale():
    img, txt = _features(dtype=torch.float64)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)  # exp(ln(1/0.07)): the multiplier, as open_clip takes it
    ref = naive_clip_loss(img, txt, scale)
    assert_float64_equal(clip_loss(img, txt, scale), ref, "clip_loss")
    assert_float64_equal(ClipLoss()(img, txt, scale), ref, "ClipLoss")
    # the log temperature is NOT what it takes: passing ln(scale) is a different (much softer) loss
    assert abs(float(clip_loss(img, txt, scale.log())) - float(ref)) > 0.1


def test_fp32_loss_is_within_fp32_roundoff_of_the_float64_reference():
    img, txt = _features()
    scale = torch.tensor(100.0)
    # logits of size <= 100 carry an absolute error of ~100 * dim * u; the loss inherits it
    assert_close(clip_loss(img, txt, scale).double(), naive_clip_loss(img, txt, scale), 100 * 16 * FP32_U, "fp32")


def test_clip_loss_is_fp32_under_low_precision_inputs():
    img, txt = _features()
    loss = clip_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(7.0))
    assert loss.dtype == torch.float32
    ref = clip_loss(img.bfloat16().float(), txt.bfloat16().float(), torch.tensor(7.0))
    assert torch.equal(loss, ref)  # the inputs are upcast first: the same fp32 computation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_and_its_gradient_stay_fp32_under_autocast(dtype):
    """Under autocast a matmul returns low-precision logits; the loss switches autocast off inside."""
    img, txt = _features(64, 32)
    scale = torch.tensor(100.0)
    plain_img, plain_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    plain = clip_loss(plain_img, plain_txt, scale)
    plain.backward()
    cast_img, cast_txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        cast = clip_loss(cast_img, cast_txt, scale)
    cast.backward()
    assert cast.dtype == torch.float32 and cast_img.grad.dtype == torch.float32
    assert torch.equal(cast, plain)  # the same fp32 computation, not one of 8 (bf16) or 11 (fp16) bits
    assert torch.equal(cast_img.grad, plain_img.grad) and torch.equal(cast_txt.grad, plain_txt.grad)


def test_clip_loss_symmetric_and_perfect_alignment_low():
    x = F.normalize(torch.eye(4, dtype=torch.float64) * 10, dim=-1)
    assert clip_loss(x, x, torch.tensor(100.0)) < 0.01
    a, b = _features(6, 8, torch.float64)
    assert_float64_equal(clip_loss(a, b, torch.tensor(2.7)), clip_loss(b, a, torch.tensor(2.7)), "symmetric")


def test_clip_loss_of_model_forward_is_the_training_loss(tiny_model):
    """The open_clip idiom ``ClipLoss()(**model(images, ids))`` gives what training optimises."""
    from dinotxt.train.step import contrastive_loss

    model = tiny_model.double().eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 56, 56, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 98, (4, 16), generator=g)
    ids[:, 10] = 99  # EOT, the largest id
    out = model(images, ids)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07)  # the exponentiated temperature
    idiom = ClipLoss()(**out)
    trained = contrastive_loss(model, ClipLoss(), {"image": images, "text": ids})
    assert_float64_equal(idiom, trained, "ClipLoss()(**model(images, ids))")
    assert 0 < float(idiom.detach()) < 2 * math.log(4) + 1  # an InfoNCE at scale 14.3, not 1e5


# The 2-process gloo check (loss AND the model's gradients under DDP against one process on
# the global batch) lives in tests/test_distributed.py.


# ------------------------------------------------------------------ the blocked loss (loss.block_size)


def _grad_of(loss_fn, *inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("block", [1, 3, 4, 10, 64])  # tiles of one row, ragged tiles, exact tiles, one tile
def test_blocked_loss_and_its_gradients_equal_the_dense_loss_in_float64(block):
    from dinotxt.train.loss import blocked_clip_loss

    img, txt = _features(10, 16, torch.float64)
    scale = torch.tensor(14.3, dtype=torch.float64)
    dense, dense_grads = _grad_of(clip_loss, img, txt, scale)
    blocked, blocked_grads = _grad_of(lambda a, b, s: blocked_clip_loss(a, b, s, block_size=block), img, txt, scale)
    assert_float64_equal(blocked, dense, "loss")
    for name, a, b in zip(("image", "text", "scale"), blocked_grads, dense_grads):
        assert_float64_equal(a, b, name)
    assert_float64_equal(ClipLoss(block)(img, txt, scale), dense, "ClipLoss(block_size)")


@pytest.mark.parametrize("block", [2, 5])
def test_blocked_loss_of_each_rank_against_the_gathered_batch_equals_the_dense_one(block):
    """The DDP form (each rank's rows against all columns), here with the gathered tensors built in one
    process; tests/test_gradcache.py runs it on 2 gloo processes."""
    from dinotxt.train.loss import blocked_clip_loss

    img, txt = _features(12, 8, torch.float64)
    scale = torch.tensor(9.0, dtype=torch.float64)
    for rank in range(3):
        rows = slice(4 * rank, 4 * rank + 4)

        def loss(fn, a, b, s, all_a, all_b):
            return fn(a, b, s, rank, all_a, all_b)

        args = (img[rows], txt[rows], scale, img, txt)
        dense, dense_grads = _grad_of(lambda *x: loss(clip_loss, *x), *args)
        blocked, blocked_grads = _grad_of(lambda *x: loss(lambda *y: blocked_clip_loss(*y, block_size=block), *x), *args)
        assert_float64_equal(blocked, dense, f"rank {rank} loss")
        for i, (a, b) in enumerate(zip(blocked_grads, dense_grads)):
            assert_float64_equal(a, b, f"rank {rank} gradient {i}")


def test_blocked_loss_backward_passes_gradcheck():
    from dinotxt.train.loss import blocked_clip_loss

    img, txt = _features(7, 5, torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (img, txt, scale, img[2:5], txt[2:5])]
    assert torch.autograd.gradcheck(lambda a, b, s: blocked_clip_loss(a, b, s, block_size=3), leaves[:3])
    assert torch.autograd.gradcheck(lambda a, b, s, x, y: blocked_clip_loss(x, y, s, 1, a, b, block_size=2),
                                    [leaves[0], leaves[1], leaves[2], leaves[3], leaves[4]])


def test_blocked_fp32_loss_is_as_close_to_float64_as_the_dense_one():
    """Both fp32 paths carry the rounding of their logits, |logit| <= scale, each a dot product of E terms:
    an absolute error of about scale * E * u in the loss, and relative to the largest gradient component."""
    from dinotxt.train.loss import blocked_clip_loss

    img, txt = _features(96, 32)
    scale = torch.tensor(100.0)
    bound = 100 * 32 * FP32_U
    ref, ref_grads = _grad_of(clip_loss, img.double(), txt.double(), scale.double())
    for fn in (clip_loss, lambda a, b, s: blocked_clip_loss(a, b, s, block_size=40)):
        loss, grads = _grad_of(fn, img, txt, scale)
        assert loss.dtype == torch.float32
        assert_close(loss.double(), ref, bound, "fp32 loss")
        for name, a, b in zip(("image", "text", "scale"), grads, ref_grads):
            assert_close(a.double(), b, bound, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blocked_loss_and_its_gradient_stay_fp32_under_autocast(dtype):
    """Autocast is off inside the forward AND the hand-written backward (which runs in the caller's autocast)."""
    from dinotxt.train.loss import blocked_clip_loss

    img, txt = _features(64, 32)
    scale = torch.tensor(100.0)

    def blocked(a, b, s):
        return blocked_clip_loss(a, b, s, block_size=24)

    plain, plain_grads = _grad_of(blocked, img, txt, scale)
    leaves = [x.clone().requires_grad_() for x in (img, txt, scale)]
    with torch.autocast("cpu", dtype=dtype):
        cast = blocked(*leaves)
        cast_grads = torch.autograd.grad(cast, leaves)  # the backward pass inside the autocast region too
    assert cast.dtype == torch.float32 and all(g.dtype == torch.float32 for g in cast_grads)
    assert torch.equal(cast.detach(), plain)
    for a, b in zip(cast_grads, plain_grads):
        assert torch.equal(a, b)
    dense, _ = _grad_of(clip_loss, img, txt, scale)  # and it is the dense fp32 loss up to fp32 roundoff
    assert_close(cast.detach().double(), dense.double(), 100 * 32 * FP32_U, "blocked vs dense")
    low = (img.to(dtype), txt.to(dtype))  # features a head returned under autocast: both upcast them alike
    assert_close(blocked(*low, scale).double(), clip_loss(*low, scale).double(), 100 * 32 * FP32_U, "low precision in")


def test_blocked_loss_saves_features_not_logits_for_its_backward():
    """What the autograd graph holds between the passes: O(B x E) for the blocked loss, the (B, B) logit
    matrices (and their log-softmax) for the dense one."""
    from dinotxt.train.loss import blocked_clip_loss

    n, e = 512, 8
    img, txt = (x.requires_grad_() for x in _features(n, e))
    scale = torch.tensor(10.0, requires_grad=True)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(img, txt, scale)
        return sum(seen.values())

    dense = saved_bytes(clip_loss)
    blocked = saved_bytes(lambda a, b, s: blocked_clip_loss(a, b, s, block_size=64))
    assert dense >= 2 * n * n * 4  # two (B, B) fp32 matrices at least
    assert blocked <= 8 * n * e * 4 + 4 * n * 4  # a few copies of the features and one log-sum-exp per row
    with pytest.raises(ValueError, match="positive"):
        ClipLoss(-1)
