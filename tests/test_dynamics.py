"""Training-dynamics diagnostics (dinotxt/evaluation/dynamics.py) and `dinotxt analyze`.

Each logged diagnostic is recomputed here from the embeddings the run saved, by a plain float64
implementation written from the definitions (loops over pairs, numpy's SVD, sums of squares), and
must agree to float64 precision; the saved embeddings must be the trained model's own.
"""
import csv
import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_overrides
from numerics import EXACT_F64, FP32_U, assert_close

from dinotxt.evaluation.dynamics import DIAGNOSTICS, dynamics_metrics, patch_areas

RECIPE = str(Path(__file__).parents[1] / "recipes" / "debug.yaml")


def direct(emb: dict, areas=None, has_map=None) -> dict:
    """Every diagnostic straight from its definition, in float64 numpy."""
    x = emb["image"].double().numpy()
    y = emb["text"].double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    n = len(x)

    def uniform(u):
        terms = [math.exp(-2 * float(np.sum((u[i] - u[j]) ** 2))) for i, j in itertools.combinations(range(n), 2)]
        return math.log(sum(terms) / len(terms))

    def erank(u):
        s = np.linalg.svd(u - u.mean(0), compute_uv=False)
        p = s / s.sum()
        return math.exp(-sum(float(q * math.log(q)) for q in p if q > 0))

    pooled = np.concatenate([x, y])
    m = pooled.mean(0)
    between = n * np.sum((x.mean(0) - m) ** 2) + n * np.sum((y.mean(0) - m) ** 2)
    out = {"temperature": 1.0 / math.exp(float(emb["logit_scale"])),
           "alignment": sum(float(np.sum((x[i] - y[i]) ** 2)) for i in range(n)) / n,
           "uniformity_image": uniform(x), "uniformity_text": uniform(y),
           "modality_gap": float(np.sqrt(np.sum((x.mean(0) - y.mean(0)) ** 2))),
           "gap_variance_share": float(between / np.sum((pooled - m) ** 2)),
           "effective_rank_image": erank(x), "effective_rank_text": erank(y)}
    if "patches" in emb and areas is not None:
        p = emb["patches"].double().numpy()
        d = p.shape[-1]
        t = emb["text"].double().numpy()[:, d:]
        shares, uniform_shares = [], []
        for i in range(n):
            a = areas[i].double().numpy()
            sims = [float(np.dot(p[i, k] / np.linalg.norm(p[i, k]), t[i] / np.linalg.norm(t[i]))) for k in range(len(a))]
            mass = np.maximum(np.array(sims), 0)
            if bool(has_map[i]) and a.sum() > 0 and mass.sum() > 0:
                shares.append(float(np.sum(mass * a) / mass.sum()))
                uniform_shares.append(float(a.mean()))
        out["localization"] = sum(shares) / len(shares)
        out["localization_uniform"] = sum(uniform_shares) / len(uniform_shares)
    return out


def assert_same(actual: dict, expected: dict, what: str) -> None:
    assert set(expected) <= set(actual), (what, sorted(set(expected) - set(actual)))
    for k, v in expected.items():
        assert abs(actual[k] - v) <= EXACT_F64 * max(1.0, abs(v)), f"{what} {k}: {actual[k]!r} vs direct {v!r}"


def test_diagnostics_equal_their_definitions_on_random_embeddings():
    g = torch.Generator().manual_seed(0)
    n, d = 20, 8
    emb = {"image": torch.randn(n, 2 * d, generator=g), "text": torch.randn(n, 2 * d, generator=g) + 0.5,
           "patches": torch.randn(n, 9, d, generator=g), "logit_scale": torch.tensor(2.3, dtype=torch.float64)}
    areas = torch.rand(n, 9, generator=g, dtype=torch.float64) * (torch.rand(n, 9, generator=g) > 0.5)
    has_map = torch.arange(n) % 5 != 0
    got = dynamics_metrics(emb, areas, has_map)
    assert set(got) == set(DIAGNOSTICS)
    assert_same(got, direct(emb, areas, has_map), "random")
    # without patch tokens (a CLS-only head) there is no localisation, the rest is unchanged
    cls_only = dynamics_metrics({k: v for k, v in emb.items() if k != "patches"})
    assert "localization" not in cls_only and cls_only["alignment"] == got["alignment"]


def test_diagnostics_on_configurations_with_known_values():
    n = 6
    basis = torch.eye(n)  # a regular simplex once centred: n - 1 equal singular values
    far = {"image": basis, "text": -basis, "logit_scale": torch.tensor(0.0)}
    got = dynamics_metrics(far)
    assert got["effective_rank_image"] == pytest.approx(n - 1, rel=1e-12)
    assert got["alignment"] == pytest.approx(4.0) and got["temperature"] == 1.0
    assert got["uniformity_image"] == pytest.approx(-4.0)  # every pair of basis vectors is sqrt(2) apart
    same = {"image": basis, "text": basis, "logit_scale": torch.tensor(0.0)}
    assert dynamics_metrics(same)["modality_gap"] == 0 and dynamics_metrics(same)["gap_variance_share"] == 0
    # each modality collapsed onto its own point: all the variance lies between the modalities
    apart = {"image": torch.ones(n, 3) * torch.tensor([1.0, 0, 0]), "text": torch.ones(n, 3) * torch.tensor([0, 1.0, 0]),
             "logit_scale": torch.tensor(0.0)}
    got = dynamics_metrics(apart)
    assert got["gap_variance_share"] == pytest.approx(1.0) and got["modality_gap"] == pytest.approx(math.sqrt(2))
    assert got["uniformity_image"] == 0.0


def test_patch_areas_follow_the_eval_transform_geometry():
    # a 64 px map at img_size 56: resize to round(56 * 256/224) = 64 (none), centre crop 4 px off each side,
    # then 14 px cells; a rectangle on rows/cols 4..32 covers the first 2 x 2 cells fully
    mask = np.zeros((64, 64), bool)
    mask[4:32, 4:32] = True
    got = patch_areas(mask, 56, 14).reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[:2, :2] = 1
    assert torch.equal(got, expected)
    mask[:] = False
    mask[4:11, 4:18] = True  # half of cell (0, 0)
    assert float(patch_areas(mask, 56, 14)[0]) == 0.5 and float(patch_areas(mask, 56, 14).sum()) == 0.5


@pytest.fixture(scope="module")
def diagnostics_run(tmp_path_factory):
    """A tiny run (4 steps, validations at 2 and 4) that logs the diagnostics and saves their embeddings."""
    from dinotxt.train.run import run_training

    work = tmp_path_factory.mktemp("dynamics")
    overrides = tiny_run_overrides(work, "trainer.val_every_n_steps=2", "trainer.log_every_n_steps=1",
                                   "trainer.checkpoint_every_n_steps=100", "eval.diagnostics_size=12",
                                   "eval.diagnostics_save=true")
    metrics = run_training(RECIPE, overrides)
    return Path(metrics["run_dir"]), overrides


def logged_rows(run_dir: Path):
    with open(run_dir / "logs" / "csv" / "v0" / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("diagnostics/alignment")]


@pytest.mark.slow
def test_every_logged_diagnostic_equals_a_direct_computation_from_the_saved_embeddings(diagnostics_run):
    from safetensors.torch import load_file

    run_dir, _ = diagnostics_run
    rows = logged_rows(run_dir)
    saved = sorted((run_dir / "diagnostics").glob("step_*.safetensors"))
    assert [p.name for p in saved] == ["step_0000002.safetensors", "step_0000004.safetensors"]
    assert len(rows) == 2  # one CSV row per validation, in the same order as the saved files
    for row, path in zip(rows, saved):
        emb = load_file(str(path))
        assert emb["image"].dtype == torch.float32 and emb["patches"].shape == (12, 16, 96)
        expected = direct(emb, emb["areas"], emb["has_map"].bool())
        logged = {k: float(row[f"diagnostics/{k}"]) for k in DIAGNOSTICS}
        assert_same(logged, expected, path.name)
        assert 0 < float(row["diagnostics/seconds"]) and 0 < float(row["diagnostics/cost_fraction"])
    assert float(rows[0]["diagnostics/alignment"]) != float(rows[1]["diagnostics/alignment"])  # the model moved


@pytest.mark.slow
def test_the_saved_embeddings_are_the_trained_models_own(diagnostics_run):
    from safetensors.torch import load_file

    import dinotxt
    from dinotxt.evaluation.dynamics import load_diagnostic_set

    run_dir, _ = diagnostics_run
    model, _, tokenizer = dinotxt.load(str(run_dir / "checkpoint"))
    dset = load_diagnostic_set(run_dir.parent / "world" / "eval", 12, tokenizer, 56, model.patch_size)
    emb = load_file(str(run_dir / "diagnostics" / "step_0000004.safetensors"))  # the last step = the checkpoint
    with torch.no_grad():
        assert_close(emb["image"], model.encode_image(dset.images), 64 * FP32_U, "image")
        assert_close(emb["text"], model.encode_text(dset.ids), 64 * FP32_U, "text")
        patches = model.encode_patches(dset.images)
        assert_close(emb["patches"], patches.reshape(12, -1, patches.shape[-1]), 64 * FP32_U, "patches")
    assert float(emb["logit_scale"]) == float(model.logit_scale.detach())
    assert torch.equal(emb["areas"], dset.areas) and bool(emb["has_map"].all())


@pytest.mark.slow
def test_analyze_draws_the_sheet_and_tabulates_every_diagnostic(diagnostics_run, tmp_path, capsys):
    from PIL import Image

    from dinotxt.cli import main

    run_dir, _ = diagnostics_run
    assert main(["analyze", str(run_dir)]) == 0
    out = capsys.readouterr().out
    sheet = run_dir / "dynamics.png"
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.width > 1000 and im.height > 700
    table = [line.split()[0] for line in out.splitlines()[1:] if line and not line.startswith("wrote")]
    for name in DIAGNOSTICS + ("seconds", "cost_fraction", "zeroshot/top1"):
        assert name in table, name
    # two runs overlay: a second run folder (a copy of the logs) gets its own rows and legend entries
    other = tmp_path / "other_run"
    shutil.copytree(run_dir / "logs", other / "logs")
    out_png = tmp_path / "both.png"
    assert main(["analyze", str(run_dir), str(other), "--out", str(out_png), "--json"]) == 0
    out = capsys.readouterr().out
    assert out_png.is_file()
    rows = [line for line in out.splitlines() if line.startswith("alignment")]
    assert len(rows) == 2 and "other_run" in rows[1]


def test_analyze_says_what_is_missing(tmp_path, capsys):
    from dinotxt.cli import main

    assert main(["analyze", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "run" / "logs" / "csv" / "v0").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "csv" / "v0" / "metrics.csv").write_text("epoch,step,train/loss\n0,4,2.5\n")
    assert main(["analyze", str(tmp_path / "run")]) == 2
    assert "eval.diagnostics=SHARDS" in capsys.readouterr().err
