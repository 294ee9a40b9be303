import os
import socket

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, img, txt, w, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    weight = w.clone().requires_grad_(True)
    n = img.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    loss = ClipLoss()(img[sl] @ weight, txt[sl], torch.tensor(2.0))
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: average the gradients of all ranks
    grad /= world
    loss_avg = loss.detach().clone()
    dist.all_reduce(loss_avg)
    if rank == 0:
        out.put((loss_avg.item() / world, grad.tolist()))  # plain lists: no shared-memory handles
    dist.destroy_process_group()


def test_global_batch_loss_under_two_gloo_processes_equals_single_process():
    """DDP with gathered features (with gradients) == one process on the global batch, gradients included."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    img, txt, w = torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 6)
    weight = w.clone().requires_grad_(True)
    ref = clip_loss(img @ weight, txt, torch.tensor(2.0))
    ref.backward()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, img, txt, w, q)) for r in range(2)]
    for p in procs:
        p.start()
    loss, grad = q.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert loss == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(torch.tensor(grad), weight.grad, atol=1e-5)
