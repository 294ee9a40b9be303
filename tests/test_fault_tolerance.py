"""Fault tolerance: a run killed with SIGKILL mid-epoch and resumed ends with the same
trainable weights as an uninterrupted run; a non-finite loss or gradient stops the step
before the weights change; a resumed multi-worker loader continues the exact batch order."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import Batches

ROOT = Path(__file__).parents[1]
RECIPE = str(ROOT / "recipes" / "debug.yaml")
# 192 pairs at batch 16 = 12 steps per pass: 30 steps cross two epoch boundaries; two loader
# workers (reader rotation on resume), drop path on, no validation (it does not change weights)
COMMON = ["optim.max_steps=30", "trainer.checkpoint_every_n_steps=4", "trainer.val_every_n_steps=0",
          "data.num_workers=2", "model.vision_head.drop_path=0.2", "trainer.deterministic=true"]


def _cmd(*args):
    return [sys.executable, "-m", "dinotxt.cli", *args]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def _ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    ref = subprocess.run(_cmd("train", RECIPE, *COMMON, "name=ref"), cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    ckpt = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(_cmd("train", RECIPE, *COMMON, "name=killed"), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file() and _ckpt_step(ckpt) >= 8:  # a few checkpoints in, the run still going
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        try:  # the run and its dataloader workers, at once
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    step = _ckpt_step(ckpt)
    assert 8 <= step < 30 and step % 12 != 0  # mid-epoch
    resumed = subprocess.run(_cmd("train", RECIPE, "--resume", *COMMON, "name=killed"), cwd=tmp_path, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path / "runs" / "ref"), _weights(tmp_path / "runs" / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _system(tiny_cfg):
    import dinotxt
    from dinotxt.train.system import DinoTxtSystem

    torch.manual_seed(0)
    return DinoTxtSystem(dinotxt.create_model(tiny_cfg.model), tiny_cfg.optim, tiny_cfg.seed)


@pytest.fixture(scope="module")
def tiny_cfg():
    from dinotxt.config import load_train_config

    from conftest import TINY_BACKBONE, TINY_TEXT

    return load_train_config(None, [
        "model.arch=dinotxt_demo", f"model.backbone.img_size={TINY_BACKBONE['img_size']}",
        "model.backbone.kwargs={depth: 1, embed_dim: 96, num_heads: 2}",
        *[f"model.text.{k}={v}" for k, v in TINY_TEXT.items()], "optim.warmup_steps=1", "optim.lr=1e-2"])


@pytest.fixture(scope="module")
def batches():
    torch.manual_seed(0)
    return [_batch(torch.randn(4, 1 + 4 + 16, 96)) for _ in range(3)]


@pytest.fixture(scope="module")
def after_two_steps(tiny_cfg, batches):
    """Trainable weights and AdamW state after two good steps."""
    system = _system(tiny_cfg)
    _fit(system, batches[:2], 2)
    weights = {k: v.clone() for k, v in system.model.trainable_state_dict().items()}
    return weights, {k: v.clone() for k, v in system.trainer.optimizers[0].state_dict()["state"][0].items()}


def _batch(tokens, vocab=100):
    ids = torch.randint(1, vocab - 1, (tokens.shape[0], 8))
    ids[:, -1] = vocab - 1
    return {"tokens": tokens, "text": ids, "skipped": {}, "positions": {}}


def _fit(system, batches, steps):
    import lightning as L

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(system, train_dataloaders=DataLoader(Batches(batches), batch_size=None))


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_non_finite_loss_or_gradient_stops_the_step_before_the_weights_change(tiny_cfg, batches, after_two_steps, poison):
    weights, opt_state = after_two_steps
    bad = dict(batches[2], tokens=batches[2]["tokens"].clone())
    system = _system(tiny_cfg)
    if poison == "loss":
        bad["tokens"][1, 0, 0] = float("inf")  # an overflowed feature: the loss is NaN
        message = "loss is nan"
    else:  # a finite loss whose backward produces NaN on the third step
        calls = []

        def third_backward_is_nan(grad):
            calls.append(1)
            return grad * float("nan") if len(calls) == 3 else grad

        system.model.text.head.linear_projection.weight.register_hook(third_backward_is_nan)
        message = "non-finite gradient in text.head.linear_projection.weight"
    with pytest.raises(FloatingPointError, match=message):
        _fit(system, batches[:2] + [bad], 3)
    assert system.global_step == 2
    for k, v in system.model.trainable_state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in system.trainer.optimizers[0].state_dict()["state"][0].items():
        assert torch.equal(v, opt_state[k]), k


def test_resumed_multi_worker_loader_continues_the_exact_batch_order(tmp_path):
    """Batches come from the workers in turn; after resuming, the reader that was next still is."""
    from test_data import make_shard

    from dinotxt.data.stream import ImageTextStream, collate_image_text
    from dinotxt.models.transforms import train_transform

    shards = [make_shard(tmp_path / f"{s}.tar", [f"s{s}_{i}" for i in range(10)]) for s in range(4)]

    def loader(positions=None, batches=0):
        ds = ImageTextStream(shards=shards, shuffle_buffer=3, seed=5, rank=0, world_size=1, transform=train_transform(14),
                             start_positions=positions, reader_offset=batches % 2)
        return iter(DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_image_text))

    it = loader()
    full = [next(it) for _ in range(11)]
    positions = {}
    for batch in full[:5]:  # what the datamodule records while training
        for reader, pos in batch["positions"].items():
            positions[reader] = max(positions.get(reader, 0), pos)
    it = loader(positions, batches=5)
    resumed = [next(it) for _ in range(6)]
    assert [b["caption"] for b in resumed] == [b["caption"] for b in full[5:]]
    for a, b in zip(resumed, full[5:]):  # the same random crops too
        assert torch.equal(a["image"], b["image"])
    assert {r for b in full for r in b["positions"]} == {0, 1}
