"""Curation, resumability (METHOD.md section 7): a finished run skips every stage, interrupted or killed
stages resume bit-identically, a changed setting recomputes only the stages downstream, ``--stage`` and
``--until``."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation_helpers import (RECIPE, STAGES, _actions, _assert_identical_runs, _cli, _clone, _curate, _one_line_error,
                              _subprocess_env)
from curation_helpers import _one_thread, reference, world  # noqa: F401 (fixtures of this module)


def test_rerun_of_a_finished_run_skips_every_stage(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    before = {p: p.stat().st_mtime_ns for p in (out / "debug").rglob("*") if p.is_file() and p.name != "config.yaml"}
    report, actions = _curate(out, world=world, capsys=capsys)
    assert actions == {s: "skipped" for s in STAGES}
    after = {p: p.stat().st_mtime_ns for p in (out / "debug").rglob("*") if p.is_file() and p.name != "config.yaml"}
    assert before == after  # nothing rewritten
    assert report["kept"] == reference[1]["kept"]


def test_until_then_rest_equals_an_uninterrupted_run(reference, world, tmp_path, capsys):
    stats, actions = _curate(tmp_path, world=world, until="cluster_level1", capsys=capsys)
    assert list(stats) == STAGES[:4] and list(actions) == STAGES[:4]
    assert not (tmp_path / "debug" / "cluster" / "level2").exists()
    report, actions = _curate(tmp_path, world=world, capsys=capsys)
    assert actions == {**{s: "skipped" for s in STAGES[:4]}, **{s: "running" for s in STAGES[4:]}}
    _assert_identical_runs(reference[0], tmp_path)


@pytest.mark.slow
def test_sigkill_during_embedding_then_resume_is_bit_identical(reference, world, tmp_path, capsys):
    """``dinotxt curate`` killed with SIGKILL while embedding unit 2, after its embeddings were written and
    before its metadata table (the unit's done marker): the rerun embeds units 2 and 3 only."""
    code = (
        "import os, signal, sys\n"
        "import curation.embed_pool as E\n"
        "write = E.write_unit\n"
        "def write_unit(out_dir, unit, emb, rows, skipped):\n"
        "    if unit == 2:\n"
        "        E.save_npy(out_dir / 'image' / '000002.npy', emb.astype('float16'))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    write(out_dir, unit, emb, rows, skipped)\n"
        "E.write_unit = write_unit\n"
        "from dinotxt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "curate", RECIPE, f"pool.data={world}",
                           f"output_dir={tmp_path}"], cwd=tmp_path, env=_subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    embed = tmp_path / "debug" / "embed"
    assert sorted(p.name for p in (embed / "meta").glob("*.parquet")) == ["000000.parquet", "000001.parquet"]
    assert (embed / "image" / "000002.npy").is_file() and not (embed / "done.json").exists()
    (embed / "image" / ".000003.npy.tmp999999").write_bytes(b"half a file")  # a write cut short
    report, actions = _curate(tmp_path, world=world, capsys=capsys)
    assert actions["embed"] == "resuming" and all(actions[s] == "running" for s in STAGES[1:])
    assert "[curate] embed: 2 of 4 units to embed" in _curate.stdout
    _assert_identical_runs(reference[0], tmp_path)


def test_interrupted_stages_resume_to_identical_outputs(reference, world, tmp_path, monkeypatch, capsys):
    """Interrupt embed_text after its 2nd shard, cluster_level1 after its k-means phase, combine after its
    first curated shard (and leave stale temporary files): every rerun continues, the end result is the
    uninterrupted run's, byte for byte."""
    import curation.combine as cb
    import curation.embed_pool as em
    import curation.kmeans as km

    class Interrupted(BaseException):
        pass

    def interrupt_after(module, name, when):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            if when(*args):
                raise Interrupted(name)
            return result
        monkeypatch.setattr(module, name, wrapped)
        return original

    out = _clone(reference[0], tmp_path, keep=["embed"])  # embedded, nothing else
    run = out / "debug"
    save = interrupt_after(em, "save_npy", lambda path, array: Path(path).name == "000001.npy")
    with pytest.raises(Interrupted):
        _curate(out, world=world)
    monkeypatch.setattr(em, "save_npy", save)
    assert sorted(p.name for p in (run / "embed_text").glob("0*.npy")) == ["000000.npy", "000001.npy"]

    phase = interrupt_after(km, "_save_phase", lambda path, *rest: path.name == "phase_000.npz")
    with pytest.raises(Interrupted):
        _curate(out, world=world, capsys=capsys)
    monkeypatch.setattr(km, "_save_phase", phase)
    assert _actions(capsys.readouterr().out)["embed_text"] == "resuming"
    assert (run / "cluster" / "level1" / "phase_000.npz").is_file()
    assert not (run / "cluster" / "level1" / "done.json").exists()

    calls = []
    real_kmeans = km.kmeans
    monkeypatch.setattr(km, "kmeans", lambda *a, **k: calls.append(len(a[0])) or real_kmeans(*a, **k))
    shard = interrupt_after(cb, "_write_shard", lambda path, *rest: path.name == "000000.tar")
    with pytest.raises(Interrupted):
        _curate(out, world=world, capsys=capsys)
    monkeypatch.setattr(cb, "_write_shard", shard)
    actions = _actions(capsys.readouterr().out)
    assert actions["cluster_level1"] == "resuming" and actions["combine"] == "running"
    assert len(calls) == 3  # level 1: only its resampling refit; level 2: k-means + refit
    first_shard = run / "curated" / "shards" / "000000.tar"
    written = first_shard.stat().st_mtime_ns
    (run / "curated" / "shards" / ".000001.tar.tmp999999").write_bytes(b"\0" * 100)
    (run / "embed_text" / ".000002.npy.tmp999999").write_bytes(b"junk")

    _, actions = _curate(out, world=world, capsys=capsys)
    assert actions["combine"] == "resuming" and actions["cluster_level1"] == "skipped"
    assert first_shard.stat().st_mtime_ns == written  # finished shards are not rewritten
    _assert_identical_runs(reference[0], out)


def test_a_changed_setting_recomputes_only_the_stages_downstream(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    run = out / "debug"
    image_rows = [p.read_bytes() for p in sorted((run / "image_balance" / "rows").glob("*.npy"))]
    report, actions = _curate(out, "text_balance.t=5", world=world, capsys=capsys)
    assert actions == {**{s: "skipped" for s in STAGES[:6]}, "text_balance": "running", "combine": "running",
                       "report": "running"}
    assert [p.read_bytes() for p in sorted((run / "image_balance" / "rows").glob("*.npy"))] == image_rows
    assert report["kept"]["text_balance"] < reference[1]["kept"]["text_balance"]  # a smaller cap keeps fewer
    assert json.loads((run / "text_balance" / "done.json").read_text())["stats"]["capped_entries"] > 0

    report, actions = _curate(out, "text_balance.t=5", "cluster.levels=[10,3]", world=world, capsys=capsys)
    assert [s for s in STAGES if actions[s] == "running"] == ["cluster_level1", "cluster_level2", "image_balance",
                                                              "combine", "report"]
    assert len(np.load(run / "cluster" / "level1" / "centroids.npy")) == 10

    # back to the recipe's settings: the result is the reference's again
    _, actions = _curate(out, world=world, capsys=capsys)
    assert actions["embed"] == actions["dedup"] == "skipped"
    _assert_identical_runs(reference[0], out)


def test_stage_option_runs_one_stage_whose_inputs_are_done(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path, keep=["embed", "embed_text", "dedup"])
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "--stage", "cluster_level2", capsys=capsys)
    assert "stage 'cluster_level2' needs 'cluster_level1', which is not done" in _one_line_error(rc, err)
    stats = _curate(out, world=world, stage="cluster_level1")
    assert list(stats) == ["cluster_level1"] and stats["cluster_level1"]["items"] == reference[1]["kept"]["dedup"]
    assert not (out / "debug" / "cluster" / "level2").exists()
    # clustering the caption embeddings instead
    stats = _curate(out, "cluster.embeddings=text", world=world, stage="cluster_level1")
    assert stats["cluster_level1"]["dim"] == 64


def test_changed_embedding_settings_do_not_silently_discard_the_embeddings(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path, keep=["embed"])
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "embed.backbone.init_seed=1",
                      capsys=capsys)
    assert "holds 'embed' outputs made with different settings" in _one_line_error(rc, err)
    assert len(list((out / "debug" / "embed" / "image").glob("*.npy"))) == 4  # untouched
