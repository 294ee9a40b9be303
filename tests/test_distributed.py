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
