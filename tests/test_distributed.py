"""Exact multi-process training: under DDP (2 CPU processes, gloo) the global-batch loss and
the model's gradients equal one process on the same global batch; shards split across
ranks and dataloader workers without duplicates or gaps; strategies from the recipe."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from conftest import TINY_MODEL, tiny_batch
from multiproc import init_gloo, run_ranks
from numerics import assert_float64_equal, assert_grads_float64_equal


class LossModule(nn.Module):
    """What Lightning's DDP wrapper calls: the training step's loss as a forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        from dinotxt.train.loss import ClipLoss

        self.loss_fn = ClipLoss()

    def forward(self, batch):
        from dinotxt.train.step import contrastive_loss

        return contrastive_loss(self.model, self.loss_fn, batch)


def _model():
    """float64: the claim is mathematical equality (only the order of the sums differs between 1 and 2
    processes), so it is checked where reordering costs ~1e-16 (tests/numerics.py)."""
    import dinotxt

    torch.manual_seed(0)
    return dinotxt.create_model("dinotxt_demo", **TINY_MODEL).double()


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, world, port)
    try:
        ddp = DDP(LossModule(_model()))
        images, ids = tiny_batch()  # the global batch: 8 pairs
        n = images.shape[0] // world
        local = slice(rank * n, (rank + 1) * n)
        loss = ddp({"image": images[local], "text": ids[local]})
        loss.backward()  # DDP averages the gradients of the ranks
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {k: p.grad.tolist() for k, p in ddp.module.model.named_parameters() if p.grad is not None}

        # the datamodule's checkpoint state merges the reader positions of every rank
        from dinotxt.train.datamodule import ImageTextDataModule

        dm = ImageTextDataModule.__new__(ImageTextDataModule)
        dm.positions, dm.batches, dm.skipped = {2 * rank: 10 + rank, 2 * rank + 1: 20 + rank}, 7, {}
        state = dm.state_dict()
        out.put((rank, (total.item() / world, grads, state)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_loss_and_model_gradients_equal_single_process_global_batch():
    model = _model()
    images, ids = tiny_batch()  # the global batch: 8 pairs
    ref = LossModule(model)({"image": images, "text": ids})
    ref.backward()
    loss, grads, state = run_ranks(_ddp_worker, 2, timeout=240)[0]
    assert_float64_equal(torch.tensor(loss, dtype=torch.float64), ref.detach(), "loss")
    own = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(own) and "logit_scale" in own and any(k.startswith("vision_head.block_list.1") for k in own)
    assert_grads_float64_equal({k: torch.tensor(g, dtype=torch.float64) for k, g in grads.items()}, own)
    assert state == {"positions": {0: 10, 1: 20, 2: 11, 3: 21}, "batches": 7, "skipped": {}}


def test_shards_split_across_ranks_and_dataloader_workers_without_duplicates_or_gaps(tmp_path):
    from test_data import make_shard

    from dinotxt.data.stream import ImageTextStream, collate_image_text
    from dinotxt.models.transforms import train_transform

    for num_shards in (6, 3):  # more shards than the 4 readers, and fewer
        per = 24 // num_shards
        shards = [make_shard(tmp_path / f"{num_shards}_{s}.tar", [f"s{s}_{i}" for i in range(per)])
                  for s in range(num_shards)]
        seen = []
        for rank in range(2):
            ds = ImageTextStream(shards=shards, transform=train_transform(14), shuffle_buffer=4, seed=3,
                                 rank=rank, world_size=2)
            it = iter(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_image_text))
            for _ in range(6):  # 6 batches of 2 = one pass over this rank's 12 samples
                seen += next(it)["caption"]
        assert len(seen) == 24 and len(set(seen)) == 24, num_shards


def test_strategies_from_the_recipe():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from dinotxt.models.text_tower import TextBlock
    from dinotxt.models.vision_head import HeadBlock
    from dinotxt.train.strategy import build_strategy

    assert isinstance(build_strategy("ddp"), DDPStrategy)
    fsdp = build_strategy("fsdp")
    assert isinstance(fsdp, FSDPStrategy)
    assert {TextBlock, HeadBlock} <= set(fsdp.kwargs["auto_wrap_policy"]._module_classes)
    assert build_strategy("auto") == "auto" and build_strategy("ddp_spawn") == "ddp_spawn"
    from lightning.pytorch.strategies import ModelParallelStrategy

    fsdp2 = build_strategy("fsdp2", "bf16-mixed")
    assert isinstance(fsdp2, ModelParallelStrategy) and fsdp2.mp_precision == "bf16-mixed"
    from dinotxt.config import ConfigError, load_train_config

    with pytest.raises(ConfigError, match="use trainer.compile=blocks with trainer.strategy=fsdp2"):
        load_train_config("debug", ["trainer.strategy=fsdp2", "trainer.compile=true"])
    assert load_train_config("debug", ["trainer.strategy=fsdp2", "trainer.compile=blocks"]).trainer.compile == "blocks"


def _fsdp2_worker(rank, world, port, out, pooled):
    import torch.distributed as dist

    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.step import contrastive_loss
    from dinotxt.train.strategy import apply_fsdp2, sharded_full_state, sync_replicated_grads

    init_gloo(rank, world, port)
    try:
        model = apply_fsdp2(_fsdp2_model(pooled))
        batch = _fsdp2_batch(pooled)
        n = batch["text"].shape[0] // world
        local = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
        loss = contrastive_loss(model, ClipLoss(), local)
        loss.backward()  # FSDP2 reduce-scatters (averages) the sharded gradients
        sync_replicated_grads(model)  # ... and this averages the temperature's
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).tolist()
                 for k, p in model.named_parameters() if p.grad is not None}
        sharded = sum(hasattr(p, "full_tensor") for p in model.parameters())
        state = {k: v.tolist() for k, v in sharded_full_state(model).items() if k.startswith(("vision_head.", "logit"))}
        out.put((rank, (total.item() / world, grads, sharded, state)))
    finally:
        dist.destroy_process_group()


def _fsdp2_model(pooled):
    if not pooled:
        return _model()
    import dinotxt

    torch.manual_seed(0)  # a LiT head over the pooled feature cache, with the linear projection
    return dinotxt.create_model("dinotxt_demo", **dict(TINY_MODEL, vision_head={
        "num_blocks": 0, "final_norm": False, "embed_dim": 48})).double()


def _fsdp2_batch(pooled):
    images, ids = tiny_batch()  # the global batch: 8 pairs
    if not pooled:
        return {"image": images, "text": ids}
    g = torch.Generator().manual_seed(5)
    width = TINY_MODEL["backbone"]["kwargs"]["embed_dim"]
    return {"pooled": torch.randn(8, 2, width, generator=g, dtype=torch.float64), "text": ids}


@pytest.mark.slow
@pytest.mark.parametrize("pooled", [False, True])
def test_fsdp2_loss_and_model_gradients_equal_single_process_global_batch(pooled):
    """trainer.strategy=fsdp2 (the official trainer's FSDP2: fully_shard per block and per tower): on 2 gloo
    processes with half the batch each, the loss and every gradient (gathered from its shards) equal one
    unsharded process on the whole batch, in float64; the images path (the frozen backbone sharded too) and
    the pooled feature-cache path (a head of no blocks with the linear projection)."""
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.step import contrastive_loss

    model = _fsdp2_model(pooled)
    ref = contrastive_loss(model, ClipLoss(), _fsdp2_batch(pooled))
    ref.backward()
    results = run_ranks(_fsdp2_worker, 2, pooled, timeout=240)
    loss, grads, sharded, state = results[0]
    assert sharded > 10  # the parameters really are DTensor shards
    assert_float64_equal(torch.tensor(loss, dtype=torch.float64), ref.detach(), "loss")
    own = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(own) and "logit_scale" in own
    assert_grads_float64_equal({k: torch.tensor(g, dtype=torch.float64) for k, g in grads.items()}, own)
    assert results[1][1].keys() == grads.keys()
    # the full state dict every rank gathers for a checkpoint is the unsharded model's
    for k, v in state.items():
        assert torch.equal(torch.tensor(v, dtype=torch.float64), model.state_dict()[k]), k


@pytest.mark.slow
def test_fsdp2_training_by_the_command_line_equals_ddp_and_resumes(tmp_path):
    """`dinotxt train debug trainer.strategy=fsdp2 trainer.devices=2` on CPU (gloo): Lightning's
    ModelParallelStrategy, the system's configure_model, full checkpoints gathered from the shards, the final
    evaluation on rank 0, and --resume. After 4 steps its checkpoint equals the same run under DDP within float32
    rounding (the two reduce gradients in different orders: measured 9e-8 on AMD EPYC)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    recipe = str(Path(__file__).parents[1] / "recipes" / "debug.yaml")
    common = [recipe, "trainer.devices=2", "trainer.accelerator=cpu", f"output_dir={tmp_path}/runs",
              f"data.world.root={tmp_path}/world", "optim.max_steps=4", "eval.diagnostics=null", "data.num_workers=0"]

    def train(*args):
        out = subprocess.run([sys.executable, "-m", "dinotxt.cli", "train", *common, *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    train("trainer.strategy=ddp", "name=ddp", "eval.zeroshot_dir=null")
    train("trainer.strategy=fsdp2", "name=fsdp2")  # with the final zero-shot evaluation on rank 0
    ddp, fsdp2 = (load_file(str(tmp_path / "runs" / n / "checkpoint" / "model.safetensors")) for n in ("ddp", "fsdp2"))
    assert ddp.keys() == fsdp2.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp2[k], ddp[k], rtol=0, atol=1e-6, msg=k)  # |weights| ~ 1: a few float32 ulps
    assert not torch.equal(fsdp2["logit_scale"], torch.tensor(2.6592600))  # it trained (ln(1/0.07) at init)
    train("trainer.strategy=fsdp2", "name=fsdp2", "optim.max_steps=6", "--resume")
    import json

    assert json.loads((tmp_path / "runs" / "fsdp2" / "metrics.json").read_text())["steps"] == 6
