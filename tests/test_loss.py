"""The contrastive loss: against a naive row-by-row reference (float64), fp32 under every
autocast, and the temperature convention of the CLIP ecosystem (``ClipLoss()(**model(...))``)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinotxt.loss import ClipLoss, clip_loss
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
