import pytest
import torch
import torch.nn.functional as F

from dinotxt.loss import ClipLoss, clip_loss


def naive_clip_loss(img, txt, logit_scale):
    """Full-batch reference written out row by row."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    s = logit_scale.double().exp()
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([s * img[i] @ txt[j] for j in range(n)])
        col = torch.stack([s * txt[i] @ img[j] for j in range(n)])
        total = total + (torch.logsumexp(row, 0) - row[i]) + (torch.logsumexp(col, 0) - col[i])
    return total / (2 * n)


def test_clip_loss_matches_naive_reference():
    torch.manual_seed(0)
    img, txt = torch.randn(8, 16), torch.randn(8, 16)
    scale = torch.tensor(2.6593)
    assert torch.allclose(clip_loss(img, txt, scale).double(), naive_clip_loss(img, txt, scale), atol=1e-5)
    assert torch.allclose(ClipLoss()(img, txt, scale).double(), naive_clip_loss(img, txt, scale), atol=1e-5)


def test_clip_loss_is_fp32_under_low_precision_inputs():
    torch.manual_seed(0)
    img, txt = torch.randn(8, 16), torch.randn(8, 16)
    loss = clip_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(2.0))
    assert loss.dtype == torch.float32
    ref = naive_clip_loss(img.bfloat16().float(), txt.bfloat16().float(), torch.tensor(2.0))
    assert torch.allclose(loss.double(), ref, atol=1e-5)


def test_clip_loss_symmetric_and_perfect_alignment_low():
    x = F.normalize(torch.eye(4) * 10, dim=-1)
    assert clip_loss(x, x, torch.tensor(4.6)) < 0.01
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert torch.allclose(clip_loss(a, b, torch.tensor(1.0)), clip_loss(b, a, torch.tensor(1.0)))


# The 2-process gloo check (loss AND the model's gradients under DDP against one process on
# the global batch) lives in tests/test_distributed.py.
