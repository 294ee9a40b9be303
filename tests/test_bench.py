"""The benchmarks still run (their figures are quoted in the README): each at its smallest size."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "bench"


def _run(*args):
    out = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout


@pytest.mark.slow
def test_train_throughput_bench_runs_its_rows():
    rows = "open_clip LiT (locked tower),dinotxt dino.txt head cached (fp16),dinotxt dino.txt head cached per-sample dp"
    out = _run("train_throughput.py", "--rows", rows, "--steps", "1", "--rounds", "1", "--warmup", "0", "--batch", "8",
               "--skip-memory", "--mfu", "no")
    assert "x open_clip" in out and "batch-subset drop path" in out


@pytest.mark.slow
def test_eval_speed_bench_runs():
    assert "images/s" in _run("eval_speed.py", "--quick")


@pytest.mark.slow
def test_curation_bench_runs():
    assert "dedup" in _run("curation_bench.py", "--quick")


@pytest.mark.slow
def test_large_batch_bench_runs_its_rows():
    out = _run("large_batch.py", "--sizes", "64,128", "--micro", "32", "--block", "48", "--cache-samples", "64",
               "--warmup", "0")
    assert "x one pass, dense loss" in out and "GradCache 32, blocked" in out and "dense logits MiB" in out
    assert "the time of 'one pass, blocked loss'" in out
