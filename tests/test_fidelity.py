"""Training as the official dino.txt trainer does (dinov3/eval/text/ and dinov3/layers/), row by row,
each against a small reference written from the official behaviour:

1. stochastic depth 0.3 on EVERY head block;
2. batch-subset stochastic depth: each residual branch runs on exactly floor((1-p)B) rows, added back
   scaled by B / floor((1-p)B);
3. the loss in fp32 under autocast (tests/test_loss.py);
5. dense windows resized UP to a multiple of the patch;
6. FSDP under bf16: bf16 parameters, gradients reduced in fp32;
7. warmup from lr 0 at step 0 (tests/test_optim.py).
"""
import math

import pytest
import torch

import dinotxt
from conftest import TINY_BACKBONE, TINY_TEXT
from dinotxt.models.layers import StochasticResidual, subset_size
from dinotxt.models.vision_head import HeadBlock
from numerics import assert_float64_equal


def official_drop_add_residual(x, residual_func, p, generator_state):
    """dinov2/dinov3 ``drop_add_residual_stochastic_depth``, written from the official code."""
    torch.random.set_rng_state(generator_state)
    b = x.shape[0]
    sample_subset_size = max(int(b * (1 - p)), 1)
    brange = torch.randperm(b, device=x.device)[:sample_subset_size]
    residual = residual_func(x[brange])
    x_flat, residual = x.flatten(1), residual.flatten(1)
    return torch.index_add(x_flat, 0, brange, residual.to(dtype=x.dtype), alpha=b / sample_subset_size).view_as(x)


class Counting(torch.nn.Module):
    """A branch that records the rows it was computed on."""

    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim).double()
        self.rows = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.lin(x)


@pytest.mark.parametrize("batch, p", [(8, 0.3), (10, 0.3), (3, 0.5), (1, 0.3), (16, 0.1)])
def test_batch_subset_runs_the_branch_on_exactly_floor_of_the_kept_share_and_matches_the_official_code(batch, p):
    torch.manual_seed(0)
    x = torch.randn(batch, 5, 6, dtype=torch.float64)
    branch = Counting(6)
    residual = StochasticResidual(p).train()
    state = torch.random.get_rng_state()
    ours = residual(x, branch)
    assert branch.rows == [max(math.floor((1 - p) * batch), 1)] == [subset_size(batch, p)]
    official = official_drop_add_residual(x, branch, p, state)
    assert_float64_equal(ours, official, "batch-subset residual")
    changed = (ours != x).flatten(1).any(1)
    assert int(changed.sum()) == subset_size(batch, p)  # the other rows skip the branch entirely
    residual.eval()
    assert_float64_equal(residual(x, branch), x + branch(x), "eval: the plain residual")


def test_batch_subset_expectation_is_the_per_sample_expectation_and_the_plain_residual():
    """Every row is in the subset with probability k/B and then scaled by B/k: E[out] = x + f(x), the
    expectation of the per-sample form too. Over all C(4, 2) = 6 subsets of a batch of 4 at p = 0.5,
    each equally likely under randperm, the mean is exact."""
    import itertools

    torch.manual_seed(1)
    x = torch.randn(4, 3, dtype=torch.float64)
    lin = torch.nn.Linear(3, 3).double()
    k = subset_size(4, 0.5)
    outs = []
    for rows in itertools.combinations(range(4), k):
        rows = torch.tensor(rows)
        outs.append(torch.index_add(x, 0, rows, lin(x[rows]), alpha=4 / k))
    assert_float64_equal(torch.stack(outs).mean(0), x + lin(x), "expectation")
    # the per-sample form has the same expectation: E[mask / keep] = 1
    per_sample = StochasticResidual(0.5, "per_sample").train()
    draws = torch.stack([per_sample(x, lin) for _ in range(4000)]).mean(0)
    assert (draws - (x + lin(x))).abs().max() < 0.1  # Monte Carlo: 4000 draws, std ~ |f(x)| / 63


def test_every_head_block_has_the_same_rate_and_saves_the_compute():
    model = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                                 vision_head={"num_blocks": 3, "drop_path": 0.3})
    assert [b.residual1.p for b in model.vision_head.block_list] == [0.3, 0.3, 0.3]
    assert all(b.residual2.mode == "batch_subset" for b in model.vision_head.block_list)
    rows = []
    block = model.vision_head.block_list[0].train()
    block.mlp.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    block(torch.randn(10, 21, 96))
    assert rows == [7]  # floor(0.7 * 10): 30% of the MLP's compute is not spent
    old = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                               vision_head={"num_blocks": 2, "drop_path": 0.3, "drop_path_mode": "per_sample"})
    assert old.vision_head.block_list[0].residual1.mode == "per_sample"
    with pytest.raises(ValueError, match="drop path mode"):
        HeadBlock(96, 2, drop_path_mode="sometimes")


def test_dense_windows_are_resized_up_to_a_multiple_of_the_patch():
    from dinotxt.inference.dense import snap_to_patch

    assert snap_to_patch(384, 14) == 392 and snap_to_patch(384, 16) == 384  # the official 392 / 384
    assert snap_to_patch(378, 14) == 378 and snap_to_patch(379, 14) == 392 and snap_to_patch(5, 14) == 14


def test_fsdp_under_bf16_keeps_bf16_parameters_and_reduces_gradients_in_fp32():
    from dinotxt.train.strategy import build_strategy

    mp = build_strategy("fsdp", "bf16-mixed").mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    assert build_strategy("fsdp", "32-true").mixed_precision is None
    from dinotxt.train.strategy import fsdp2_mixed_precision

    mp2 = fsdp2_mixed_precision("bf16-mixed")  # FSDP2 (trainer.strategy=fsdp2): the same policy
    assert (mp2.param_dtype, mp2.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp2_mixed_precision("32-true").param_dtype is None


def test_resume_after_sigkill_still_replays_the_subsets():
    """The subsets come from the global RNG, which the training step reseeds from (seed, step, rank):
    the same step draws the same rows (exact resume, tests/test_fault_tolerance.py, runs with them)."""
    from dinotxt.data.stream import mix_seed

    x = torch.randn(8, 4, 6, dtype=torch.float64)
    branch = Counting(6)
    residual = StochasticResidual(0.3).train()
    outs = []
    for _ in range(2):
        torch.manual_seed(mix_seed(0, 5, 0))
        outs.append(residual(x, branch))
    assert torch.equal(outs[0], outs[1])
