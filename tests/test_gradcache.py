"""Exact large-batch contrastive training by gradient caching (dinotxt/train/gradcache.py, data.global_batch):
the loss and every gradient of K micro-batches (x 2 gloo processes) equal one pass over the whole global
batch (float64), drop path is replayed in the second pass, the frozen backbone runs once per image, a run
with global_batch=64 from micro-batches of 16 ends with the weights of batch_size=64, and a run killed
inside an accumulation cycle resumes to the same weights."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import TINY_BACKBONE, TINY_HEAD, TINY_TEXT, Batches
from multiproc import run_ranks
from numerics import assert_close, assert_float64_equal, assert_grads_float64_equal

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "debug.yaml")
HEADS = {  # the dino.txt head over all tokens, and the LiT head that trains on pooled cached tokens
    "blocks": TINY_HEAD,
    "pooled": {"num_blocks": 0, "final_norm": False, "drop_path": 0.0},
}


def _model(head="blocks", **vision_head):
    import dinotxt

    torch.manual_seed(0)
    model = dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                                 vision_head={**HEADS[head], **vision_head}).double()
    return model.train()  # drop path (when on) draws, as in training; the backbone stays in eval mode


def _global_batch(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 56, 56, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 99, (n, 12), generator=g)
    for i in range(n):  # captions of different lengths: each micro-batch trims its own padding
        end = 3 + (5 * i) % 8
        ids[i, end], ids[i, end + 1:] = 99, 0
    return images, ids


def _inputs(model, kind, images, ids):
    """The batch as the loader gives it: images, cached tokens or cached pooled tokens."""
    from dinotxt.models.backbone import frozen_tokens

    if kind == "image":
        return {"image": images, "text": ids}
    tokens = frozen_tokens(model.backbone, images)
    if kind == "tokens":
        return {"tokens": tokens, "text": ids}
    return {"pooled": model.vision_head.pool_frozen_tokens(tokens), "text": ids}


def _split(batch, size):
    n = batch["text"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items() if torch.is_tensor(v)} for i in range(0, n, size)]


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, head", [("image", "blocks"), ("tokens", "blocks"), ("pooled", "pooled")])
@pytest.mark.parametrize("block_size", [None, 5])
def test_micro_batches_give_the_loss_and_gradients_of_one_pass_over_the_global_batch(kind, head, block_size):
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.gradcache import gradcache_backward
    from dinotxt.train.step import contrastive_loss

    model = _model(head)
    images, ids = _global_batch()
    batch = _inputs(model, kind, images, ids)
    ref = contrastive_loss(model, ClipLoss(), batch)  # the dense loss, one pass with a graph
    ref.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    calls, text_calls = [], []
    model.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model.text.register_forward_hook(lambda m, args, out: text_calls.append(torch.is_grad_enabled()))
    loss = gradcache_backward(model, ClipLoss(block_size), _split(batch, 4), seeds=[7, 8, 9])
    # pass 1 without a graph for the first two micro-batches, with one for the last (kept, not embedded again)
    assert text_calls == [False, False, True, True, True]
    assert_float64_equal(loss, ref.detach(), "loss")
    got = _grads(model)
    assert "logit_scale" in got and "text.head.linear_projection.weight" in got
    assert_grads_float64_equal(got, expected)
    assert calls == ([4, 4, 4] if kind == "image" else [])  # the backbone ran once per image, in pass 1 only


@pytest.mark.parametrize("mode", ["batch_subset", "per_sample"])
def test_the_second_pass_replays_the_drop_path_of_the_first(mode):
    """With drop path on, the reference keeps every micro-batch's graph, each embedded under its own seed:
    pass 2 must draw the very subsets / masks pass 1 drew, or the cached gradients belong to other embeddings."""
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.gradcache import embed, gradcache_backward

    model = _model(drop_path=0.5, drop_path_mode=mode)
    images, ids = _global_batch()
    micro = _split(_inputs(model, "tokens", images, ids), 4)
    seeds = [11, 12, 13]
    embedded = [embed(model, mb, s) for mb, s in zip(micro, seeds)]
    ref = ClipLoss()(torch.cat([e[0] for e in embedded]), torch.cat([e[1] for e in embedded]), model.logit_scale.exp())
    ref.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss = gradcache_backward(model, ClipLoss(), micro, seeds)
    assert_float64_equal(loss, ref.detach(), "loss")
    assert_grads_float64_equal(_grads(model), expected)
    # and the draws matter: other seeds give another loss
    model.zero_grad(set_to_none=True)
    assert abs(float(gradcache_backward(model, ClipLoss(), micro, [1, 2, 3])) - float(ref.detach())) > 1e-6


def test_batch_settings_that_would_not_train_the_asked_batch_are_refused():
    from dinotxt.config import ConfigError, load_train_config
    from dinotxt.train.gradcache import check_batch_config, micro_batches_per_step

    with pytest.raises(ConfigError, match="only its own negatives; set data.global_batch"):
        check_batch_config(load_train_config(RECIPE, ["trainer.accumulate_grad_batches=4"]))
    with pytest.raises(ConfigError, match="data.global_batch=40 must be a multiple of data.batch_size=16"):
        check_batch_config(load_train_config(RECIPE, ["data.global_batch=40"]))
    check_batch_config(load_train_config(RECIPE, ["data.global_batch=64"]))
    assert micro_batches_per_step(64, 16, 2) == 2 and micro_batches_per_step(64, 16, 1) == 4
    with pytest.raises(ConfigError, match=r"multiple of data.batch_size x devices = 16 x 3 = 48"):
        micro_batches_per_step(64, 16, 3)


def test_accumulate_grad_batches_is_a_one_line_error_pointing_at_global_batch(tmp_path, capsys, monkeypatch):
    from dinotxt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", RECIPE, "trainer.accumulate_grad_batches=2"]) == 2
    err = capsys.readouterr().err
    assert "data.global_batch" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_step_batches_group_micro_batches_and_record_every_loader_batch():
    from dinotxt.train.datamodule import ImageTextDataModule, StepBatches, batch_samples

    loader = [{"text": torch.zeros(2, 3), "positions": {i % 2: i + 1}, "skipped": {"bad_image": i % 2}}
              for i in range(7)]
    steps = list(StepBatches(loader, 3))
    assert len(steps) == 2  # the incomplete last group is not a step
    assert steps[1]["positions"] == {1: 6, 0: 5} and steps[1]["skipped"] == {"bad_image": 2}
    assert batch_samples(steps[0]) == 6 and steps[0]["loader_batches"] == 3
    dm = ImageTextDataModule.__new__(ImageTextDataModule)
    dm.positions, dm.batches, dm.skipped = {}, 0, __import__("collections").Counter()
    for step in steps:
        dm.record(step)
    assert dm.batches == 6 and dm.positions == {0: 5, 1: 6} and dm.skipped == {"bad_image": 3}  # the readers' turn order survives a resume


# ------------------------------------------------------------------ the Lightning system


def _step_batch(micro_batches):
    from dinotxt.train.gradcache import merge_micro_batches

    return merge_micro_batches([dict(mb, positions={}, skipped={}) for mb in micro_batches])


class _Capture:
    """Lightning callback: the gradients the optimizer is about to apply, and the step losses."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class Capture(Callback):
            def __init__(self):
                self.grads, self.losses = [], []

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                self.grads.append({k: p.grad.detach().clone() for k, p in pl_module.model.named_parameters()
                                   if p.grad is not None})

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss))

        return Capture()


def _optim():
    from omegaconf import OmegaConf

    from dinotxt.config import OptimConfig

    return OmegaConf.merge(OmegaConf.structured(OptimConfig), {"lr": 1e-2, "warmup_steps": 1, "max_steps": 10})


def _fit(system, batches, steps, **trainer):
    import lightning as L

    capture = _Capture()
    t = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, precision="64-true", callbacks=[capture],
                  **{"devices": 1, **trainer})
    t.fit(system, train_dataloaders=DataLoader(Batches(batches), batch_size=None))
    return capture


def _ddp_system_worker(rank, world, port, out):
    """One rank of a real Lightning DDP run of the system: 2 micro-batches of 3 per rank, dense and blocked."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from dinotxt.train.strategy import build_strategy
    from dinotxt.train.system import DinoTxtSystem

    images, ids = _global_batch()
    n = images.shape[0] // world
    local = {"image": images[rank * n:(rank + 1) * n], "text": ids[rank * n:(rank + 1) * n]}
    results = {}
    for block_size in (None, 2):
        system = DinoTxtSystem(_model(), _optim(), seed=3, grad_cache=True, loss_block_size=block_size)
        capture = _fit(system, [_step_batch(_split(local, 3))], 1, devices=world, strategy=build_strategy("ddp"))
        results[str(block_size)] = (capture.losses[0], {k: g.tolist() for k, g in capture.grads[0].items()})
    out.put((rank, results))


@pytest.mark.slow
def test_system_under_ddp_two_ranks_of_micro_batches_equal_one_pass_over_the_global_batch():
    from dinotxt.train.loss import ClipLoss
    from dinotxt.train.step import contrastive_loss

    model = _model()
    images, ids = _global_batch()
    ref = contrastive_loss(model, ClipLoss(), {"image": images, "text": ids})
    ref.backward()
    expected = _grads(model)
    results = run_ranks(_ddp_system_worker, 2, timeout=400)
    for block_size in ("None", "2"):
        # each rank's loss is its own rows of the global loss; their mean is the global loss (as DDP averages)
        losses = [results[r][block_size][0] for r in range(2)]
        assert_float64_equal(torch.tensor(sum(losses) / 2, dtype=torch.float64), ref.detach(), f"loss {block_size}")
        for r in range(2):  # the all-reduced gradients, on both ranks
            got = {k: torch.tensor(g, dtype=torch.float64) for k, g in results[r][block_size][1].items()}
            assert_grads_float64_equal(got, expected)


def test_system_steps_once_per_global_batch_with_schedule_clipping_and_logged_loss():
    """The manual step: one optimizer and scheduler step per global batch, the clipped gradients the
    automatic one-pass step applies, the loss it logs (float64, 2 steps)."""
    from dinotxt.train.system import DinoTxtSystem

    optim = _optim()
    optim.grad_clip = 0.01  # far below these gradients' norm: clipping is active
    batches = []
    for seed in (1, 2):
        images, ids = _global_batch(8, seed)
        batches.append({"image": images, "text": ids, "positions": {}, "skipped": {}})
    plain = DinoTxtSystem(_model(), optim)
    one_pass = _fit(plain, batches, 2, gradient_clip_val=optim.grad_clip)
    cached = DinoTxtSystem(_model(), optim, grad_cache=True)
    gc = _fit(cached, [_step_batch(_split(b, 2)) for b in batches], 2)
    assert cached.trainer.global_step == 2 and cached.micro_batches == 8 and plain.micro_batches == 2
    assert cached.lr_schedulers().last_epoch == plain.lr_schedulers().last_epoch == 2
    for a, b in zip(gc.losses, one_pass.losses):
        assert_float64_equal(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), "loss")
    for a, b in zip(gc.grads, one_pass.grads):  # before clipping (the hook runs first), then the weights after it
        assert_grads_float64_equal(a, b)
    for (k, a), b in zip(cached.model.trainable_state_dict().items(), plain.model.trainable_state_dict().values()):
        assert_close(a, b, 1e-10, k)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_stops_a_gradient_cache_step_before_the_weights_change(poison):
    from dinotxt.train.system import DinoTxtSystem

    images, ids = _global_batch(8)
    model = _model()
    tokens = _inputs(model, "tokens", images, ids)
    if poison == "loss":
        tokens["tokens"][5, 0, 0] = float("inf")  # an overflowed feature in the second micro-batch
        message = "loss is nan"
    else:
        model.text.head.linear_projection.weight.register_hook(lambda g: g * float("nan"))
        message = "non-finite gradient in text.head.linear_projection.weight"
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    system = DinoTxtSystem(model, _optim(), grad_cache=True)
    with pytest.raises(FloatingPointError, match=message):
        _fit(system, [_step_batch(_split(tokens, 4))], 1)
    assert system.trainer.global_step == 0
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ the command line, end to end


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def _metrics(run_dir):
    import csv

    rows = {}
    for f in sorted((run_dir / "logs").glob("csv/*/metrics.csv")):
        with open(f, newline="") as fh:
            rows.update({int(r["step"]): r for r in csv.DictReader(fh) if r.get("train/loss")})
    return rows


@pytest.mark.slow
def test_run_with_global_batch_64_of_micro_batches_16_ends_with_the_weights_of_batch_64(tmp_path, monkeypatch):
    """float64 (trainer.precision=64-true), no drop path (its subsets depend on the batch size), clipping on:
    the two runs differ only in the order of their sums."""
    from dinotxt.train.run import run_training

    monkeypatch.chdir(tmp_path)
    common = ["trainer.precision=64-true", "model.vision_head.drop_path=0", "optim.max_steps=4", "optim.warmup_steps=2",
              "optim.grad_clip=0.05", "data.num_workers=0", "trainer.val_every_n_steps=0", "eval.zeroshot_dir=null",
              "trainer.checkpoint_every_n_steps=0", "trainer.log_every_n_steps=1"]
    run_training(RECIPE, [*common, "data.batch_size=64", "name=one_pass"])
    run_training(RECIPE, [*common, "data.global_batch=64", "name=cached"])
    a, b = _weights(tmp_path / "runs" / "cached"), _weights(tmp_path / "runs" / "one_pass")
    assert a.keys() == b.keys()
    for k in a:
        # float64 sums in another order differ by ~1e-16 relative; four AdamW steps, whose normalised update
        # amplifies the relative error of a gradient component near zero, leave them ~1e-13 apart
        assert_close(a[k], b[k], 1e-10, k)
    ma, mb = _metrics(tmp_path / "runs" / "cached"), _metrics(tmp_path / "runs" / "one_pass")
    assert sorted(ma) == sorted(mb) == [0, 1, 2, 3]
    for step in ma:
        assert ma[step]["train/lr"] == mb[step]["train/lr"]
        assert abs(float(ma[step]["train/loss"]) - float(mb[step]["train/loss"])) < 1e-12 * float(mb[step]["train/loss"])


KILLER = """
import os, signal, sys
from dinotxt.models import text_tower
forward, calls = text_tower.TextTower.forward, [0]
def counted(self, ids):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_TEXT_CALL"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, ids)
text_tower.TextTower.forward = counted
from dinotxt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_inside_an_accumulation_cycle_then_resume_equals_uninterrupted_run(tmp_path):
    """K=3 micro-batches per step, drop path on, two loader workers; the run kills itself in the second pass of
    step 7's second micro-batch (each step embeds text 2K - 1 = 5 times: the last micro-batch keeps its
    pass-1 graph), after the checkpoint of step 6."""
    common = ["data.global_batch=48", "optim.max_steps=8", "trainer.checkpoint_every_n_steps=3",
              "trainer.val_every_n_steps=0", "data.num_workers=2", "model.vision_head.drop_path=0.2",
              "trainer.deterministic=true"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    ref = subprocess.run([sys.executable, "-m", "dinotxt.cli", "train", RECIPE, *common, "name=ref"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    kill_at = 6 * 5 + 3 + 2
    proc = subprocess.Popen([sys.executable, "-c", KILLER, "train", RECIPE, *common, "name=killed"], cwd=tmp_path,
                            env=dict(env, KILL_AT_TEXT_CALL=str(kill_at)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.wait(timeout=600) == -signal.SIGKILL
    finally:
        try:  # its dataloader workers
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    ckpt = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["dinotxt"]["micro_batches"] == 18
    resumed = subprocess.run([sys.executable, "-m", "dinotxt.cli", "train", RECIPE, "--resume", *common, "name=killed"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "runs" / "ref"), _weights(tmp_path / "runs" / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
