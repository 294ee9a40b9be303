"""bench/gpu_check.py runs its whole code path on a CPU at a tiny size (so the GPU check cannot rot), and the
paper-size model takes one optimizer step on a CPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_a_cpu():
    # the compiled variants run the same function with trainer.compile=blocks, whose parity with the eager
    # pass tests/test_official_options.py checks; here they are left out to keep the suite's time
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--variants",
                          "plain,selective AC,FSDP2"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    for variant in ("plain", "selective AC", "FSDP2"):
        assert f"\n{variant} " in table, table
    assert "DDP / FSDP2 on gloo" in table and "k-means" in table


@pytest.mark.slow
def test_the_paper_size_model_takes_one_optimizer_step_on_a_cpu():
    """ViT-L/14 reg4 frozen (random weights), 2 head blocks, the official 1280 x 24 text tower, batch 2."""
    import dinotxt
    from dinotxt.train.loss import build_loss
    from dinotxt.train.step import contrastive_loss

    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_vitl14_reg4").train()
    assert model.backbone.embed_dim == 1024 and model.text.width == 1280 and model.text.depth == 24
    images = torch.randn(2, 3, 224, 224)
    ids = torch.randint(1, 49406, (2, 12))
    ids[:, -1] = 49407
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = model.vision_head.block_list[0].attn.qkv.weight.detach().clone()
    loss = contrastive_loss(model, build_loss(), {"image": images, "text": ids})
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.vision_head.block_list[0].attn.qkv.weight)
