"""Curation, the ``dinotxt curate`` command (METHOD.md section 7): clear one-line errors on bad input (a
target larger than the pool, unknown keys and stages, a missing pool) and the command end to end on a tiny
pool (recipes/curation/debug.yaml, 1-block backbone) giving the in-process run's curated subset."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation_helpers import RECIPE, _cli, _clone, _one_line_error, _subprocess_env
from curation_helpers import _one_thread, reference, world  # noqa: F401 (fixtures of this module)


def test_target_size_larger_than_the_pool_is_a_clear_error(reference, world, tmp_path, capsys):
    out = _clone(reference[0], tmp_path)
    kept = reference[1]["kept"]["dedup"]
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "image_balance.target_size=5000",
                      capsys=capsys)
    line = _one_line_error(rc, err)
    assert f"asks for 5,000 samples, but the pool has {kept:,} after de-duplication" in line
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "cluster.levels=[500,3]", capsys=capsys)
    assert f"level 1 asks for 500 clusters of only {kept} items" in _one_line_error(rc, err)
    # a fraction must lie in (0, 1]; 2.5 is neither a fraction nor a sample count
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={out}", "image_balance.target_size=2.5",
                      capsys=capsys)
    assert "image_balance.target_size" in _one_line_error(rc, err)


def test_unknown_recipe_key_names_the_closest_valid_key(world, tmp_path, capsys):
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={tmp_path}", "text_balance.tt=5", capsys=capsys)
    assert "unknown config key 'text_balance.tt' in command line; did you mean 'text_balance.t'?" in \
        _one_line_error(rc, err)
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"pool:\n  data: {world}\ncluster:\n  level: [4, 2]\n")
    rc, _, err = _cli(recipe, f"output_dir={tmp_path}", capsys=capsys)
    assert "unknown config key 'cluster.level'" in _one_line_error(rc, err) and "'cluster.levels'" in err
    rc, _, err = _cli(RECIPE, f"pool.data={world}", "combine.mode=xor", capsys=capsys)
    assert "combine.mode='xor' is not one of intersection, union, image, text" in _one_line_error(rc, err)
    rc, _, err = _cli(RECIPE, f"pool.data={world}", "cluster.levels=[3,12]", capsys=capsys)
    assert "must not grow" in _one_line_error(rc, err)
    assert not (tmp_path / "debug").exists() and not (tmp_path / "typo").exists()


def test_unknown_stage_name_is_a_clear_error(world, tmp_path, capsys):
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={tmp_path}", "--stage", "cluster", capsys=capsys)
    line = _one_line_error(rc, err)
    assert "unknown stage 'cluster'" in line and "cluster_level1" in line
    rc, _, err = _cli(RECIPE, f"pool.data={world}", f"output_dir={tmp_path}", "--until", "dedupe", capsys=capsys)
    assert "unknown stage 'dedupe'" in _one_line_error(rc, err)
    assert not (tmp_path / "debug" / "embed").exists()


@pytest.mark.slow
def test_cli_curate_end_to_end(reference, world, tmp_path):
    exe = Path(sys.executable).with_name("dinotxt")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "dinotxt.cli"]
    proc = subprocess.run([*cmd, "curate", RECIPE, f"pool.data={world}", f"output_dir={tmp_path / 'runs'}"],
                          cwd=tmp_path, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "debug"
    report = json.loads((run / "report" / "report.json").read_text())
    summary = proc.stdout[proc.stdout.index("curation 'debug' (intersection)"):]
    for name, count in report["kept"].items():
        assert re.search(rf"^{name}\s+{count:,}\s", summary, re.M), name
    assert "cluster entropy" in summary and "metadata entry entropy" in summary
    assert f"{run}/curated/uids.npy" in summary and "report.json" in summary
    assert report["plots"] == ["stages.png", "cluster_sizes.png", "concepts.png", "duplicates.png"]
    for name in report["plots"]:
        assert (run / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "config.yaml").is_file() and "text_balance" in (run / "config.yaml").read_text()
    # a separate process gives the same curated subset as the in-process reference run
    reference_uids = np.load(reference[0] / "debug" / "curated" / "uids.npy")
    assert np.array_equal(np.load(run / "curated" / "uids.npy"), reference_uids)
    assert report["kept"] == reference[1]["kept"]


def test_a_missing_pool_names_the_pool_key(tmp_path, capsys):
    from dinotxt.cli import main

    assert main(["curate", RECIPE, f"pool.data={tmp_path / 'nowhere' / '{0..3}.tar'}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinotxt: error: shard not found") and err.endswith("check pool.data") and "\n" not in err
