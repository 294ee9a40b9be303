"""The validation split carved from the user's pairs (issue 25, data.holdout): a pure function of the sample
key, never trained on, measured during the run, the best checkpoint kept, and the parting of training and
validation loss reported."""
from collections import Counter
from pathlib import Path

import pytest
import torch

from dinotxt.data.holdout import holdout_fraction, in_holdout


def test_the_split_is_a_pure_function_of_the_key_and_holds_the_fraction():
    keys = [f"{i:09d}" for i in range(20000)]
    held = [k for k in keys if in_holdout(k, seed=3, fraction=0.05)]
    assert held == [k for k in keys if in_holdout(k, seed=3, fraction=0.05)]  # the same in every process
    assert abs(len(held) / len(keys) - 0.05) < 0.006  # binomial sd 0.0015: four sd
    assert set(held) <= {k for k in keys if in_holdout(k, seed=3, fraction=0.1)}  # nested in the fraction
    assert held != [k for k in keys if in_holdout(k, seed=4, fraction=0.05)]  # the seed picks another split
    assert not any(in_holdout(k, 3, 0.0) for k in keys[:100])


@pytest.mark.parametrize("setting,pairs,expected", [
    ("auto", 3000, 0.05), ("auto", 40000, 1000 / 40000), ("auto", 500, 0.0), ("auto", 200_000, 0.0),
    ("auto", None, 0.0), (0, 3000, 0.0), (0.2, 10, 0.2)])
def test_auto_holds_out_five_percent_of_small_data_only(setting, pairs, expected):
    assert holdout_fraction(setting, pairs) == pytest.approx(expected)


def test_a_fraction_outside_the_range_is_one_line():
    with pytest.raises(ValueError, match=r"data.holdout=0.7: give a fraction in \[0, 0.5\)"):
        holdout_fraction(0.7, 1000)


def test_held_out_pairs_are_never_trained_on_and_the_rest_all_are(tmp_path):
    from dinotxt.data.stream import ImageTextStream
    from dinotxt.data.world import write_split

    shards = write_split(tmp_path / "w", 96, seed=0, size=32, samples_per_shard=32)
    train = ImageTextStream(shards=shards, seed=1, shuffle_buffer=8, holdout=0.25, rank=0, world_size=1)
    first_pass = []
    for sample in train:
        first_pass.append(sample["key"])
        if len(first_pass) == 96 - len(train.held_out()):
            break
    held = [s["key"] for s in train.held_out()]
    assert 10 < len(held) < 40 and not set(held) & set(first_pass)
    assert sorted(set(held) | set(first_pass)) == sorted(_all_keys(shards))


def _all_keys(shards):
    from dinotxt.data.sources import iter_tar_samples

    return [s["__key__"] for shard in shards for s in iter_tar_samples(shard, Counter())]


def test_summary_says_when_training_and_validation_loss_part(tmp_path):
    from dinotxt.train.callbacks import HoldoutValidation

    v = HoldoutValidation([], tmp_path, 10, None, None)
    curve = [(10, 3.0, 3.1), (20, 2.0, 2.5), (30, 1.0, 2.4), (40, 0.5, 2.9), (50, 0.3, 3.3)]
    v.history = [{"step": s, "train_loss": t, "loss": val, "i2t_R@1": 0.1, "t2i_R@1": 0.1} for s, t, val in curve]
    assert v.summary()["parted"] == {"step": 30, "val_loss": [2.4, 3.3], "train_loss": [1.0, 0.3]}
    v.history = v.history[:3]  # still falling together
    assert v.summary()["parted"] is None


@pytest.mark.slow
def test_a_run_validates_on_its_held_out_pairs_and_keeps_the_best_checkpoint(tmp_path):
    import dinotxt
    from dinotxt.train.run import run_training

    metrics = run_training("debug", [f"output_dir={tmp_path}", f"data.world.root={tmp_path / 'world'}",
                                     "data.world.num_train=256", "data.world.num_eval=24", "data.holdout=0.2",
                                     "optim.max_steps=6", "trainer.val_every_n_steps=0", "eval.diagnostics=null",
                                     "data.num_workers=0"])
    held = metrics["holdout"]
    assert 30 < held["pairs"] < 80 and held["last"]["step"] == 6 and held["best"] is not None
    dinotxt.load(Path(metrics["run_dir"]) / "checkpoint_best")  # a complete checkpoint of the best step
