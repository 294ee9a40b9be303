"""``dinotxt analyze RUN [RUN_B ...]``: the training dynamics of runs, as one PNG sheet and a table.

Reads what training logged (``RUN/logs/csv/v*/metrics.csv``, every launch of a resumed run, a later
launch's value winning at the same step): the diagnostics of ``dinotxt.evaluation.dynamics``
(``eval.diagnostics``), the training loss and the zero-shot top-1 of the validations. The sheet has a
panel per diagnostic over the steps with every run overlaid (one colour per run; image and text, or
a value and its chance level, as line styles), and the table gives each diagnostic's first and last
logged value per run.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .dynamics import DIAGNOSTICS

Series = Dict[str, List[Tuple[int, float]]]  # metric -> [(step, value)] in step order

# (panel title, [(logged metric, line label or None, line style)])
PANELS: List[Tuple[str, List[Tuple[str, Optional[str], str]]]] = [
    ("training loss", [("train/loss", None, "-")]),
    ("zero-shot top-1 (validation)", [("zeroshot/top1", None, "-")]),
    ("temperature exp(-logit_scale)", [("diagnostics/temperature", None, "-")]),
    ("alignment E||x - y||^2 (lower: pairs closer)", [("diagnostics/alignment", None, "-")]),
    ("uniformity log E exp(-2||u - v||^2)", [("diagnostics/uniformity_image", "image", "-"),
                                             ("diagnostics/uniformity_text", "text", "--")]),
    ("modality gap ||mean img - mean txt||", [("diagnostics/modality_gap", None, "-")]),
    ("variance share between modalities", [("diagnostics/gap_variance_share", None, "-")]),
    ("effective rank (centred)", [("diagnostics/effective_rank_image", "image", "-"),
                                  ("diagnostics/effective_rank_text", "text", "--")]),
    ("localisation: caption mass on its object", [("diagnostics/localization", "model", "-"),
                                                  ("diagnostics/localization_uniform", "uniform mass", ":")]),
]
# the table's rows: every diagnostic, what it cost, and the zero-shot accuracy they accompany
TABLE = ([f"diagnostics/{name}" for name in DIAGNOSTICS]
         + ["diagnostics/seconds", "diagnostics/cost_fraction", "zeroshot/top1", "train/loss"])


def _version(path: Path) -> int:
    match = re.fullmatch(r"v(\d+)", path.parent.name)
    return int(match.group(1)) if match else -1


def read_logged_metrics(run_dir) -> Series:
    """Every metric a run logged to its CSV logs, as ``{name: [(step, value), ...]}`` sorted by step."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    files = sorted((run_dir / "logs" / "csv").glob("v*/metrics.csv"), key=_version)
    if not files:
        raise FileNotFoundError(f"{run_dir} has no CSV logs (expected {run_dir}/logs/csv/v0/metrics.csv): "
                                "is it a dinotxt train run folder?")
    merged: Dict[str, Dict[int, float]] = {}
    for f in files:
        with open(f, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if not row.get("step"):
                    continue
                step = int(float(row["step"]))
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    merged.setdefault(key, {})[step] = float(value)  # a later launch wins at the same step
    return {k: sorted(v.items()) for k, v in merged.items()}


def run_labels(run_dirs: Sequence) -> List[str]:
    """Short names for the runs: the folder names, or more of their paths where those repeat."""
    paths = [Path(r).resolve() for r in run_dirs]
    for depth in range(1, 6):
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def dynamics_table(runs: Dict[str, Series], metrics: Sequence[str] = TABLE) -> List[Dict]:
    """First and last logged value of each metric per run: ``[{metric, run, first_step, first, last_step, last}]``
    (a metric a run did not log gets no row)."""
    rows = []
    for metric in metrics:
        for label, series in runs.items():
            points = series.get(metric)
            if points:
                rows.append({"metric": metric, "run": label, "first_step": points[0][0], "first": points[0][1],
                             "last_step": points[-1][0], "last": points[-1][1]})
    return rows


def format_table(rows: List[Dict]) -> str:
    width = max([len(r["run"]) for r in rows] + [3])

    def num(v: float) -> str:
        return "nan" if math.isnan(v) else f"{v:.4g}"

    lines = [f"{'diagnostic':<28}{'run':<{width + 2}}{'first (step)':>20}{'last (step)':>20}"]
    for r in rows:
        name = r["metric"].split("/", 1)[1] if r["metric"].startswith("diagnostics/") else r["metric"]
        first, last = f"{num(r['first'])} ({r['first_step']})", f"{num(r['last'])} ({r['last_step']})"
        lines.append(f"{name:<28}{r['run']:<{width + 2}}{first:>20}{last:>20}")
    return "\n".join(lines)


def draw_dynamics_sheet(runs: Dict[str, Series], out, title: Optional[str] = None) -> Path:
    """One PNG: a panel per diagnostic (``PANELS``) over the steps, the runs overlaid with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.fileio import atomic_output

    cols = 3
    rows = -(-len(PANELS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel, lines) in zip(axes.flat, PANELS):
        drawn = 0
        for r, (label, series) in enumerate(runs.items()):
            for metric, line_label, style in lines:
                points = [(s, v) for s, v in series.get(metric, []) if not math.isnan(v)]
                if not points:
                    continue
                steps, values = zip(*points)
                name = label if line_label is None else (f"{label}: {line_label}" if len(runs) > 1 else line_label)
                ax.plot(steps, values, style, color=colours[r % len(colours)], lw=1.4,
                        marker="o" if len(points) < 30 and metric != "train/loss" else None, ms=3, label=name)
                drawn += 1
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(PANELS):]:
        ax.axis("off")
    fig.suptitle(title or "training dynamics: " + " vs ".join(runs), fontsize=12)
    fig.tight_layout()
    out = Path(out)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def analyze_runs(run_dirs: Sequence, out=None) -> Dict:
    """Read the runs' logs, draw the sheet (default ``RUN/dynamics.png``; with several runs
    ``RUN_A/dynamics_vs_<B>.png``) and return ``{"sheet", "rows", "table"}``."""
    if not run_dirs:
        raise ValueError("name at least one run folder (runs/NAME)")
    labels = run_labels(run_dirs)
    runs = {label: read_logged_metrics(d) for label, d in zip(labels, run_dirs)}
    missing = [label for label, series in runs.items() if not any(k.startswith("diagnostics/") for k in series)]
    if len(missing) == len(runs):
        raise ValueError(f"no diagnostics logged in {', '.join(map(str, run_dirs))}: train with "
                         "eval.diagnostics=SHARDS (held-out image-caption shards, e.g. the world's eval folder)")
    if out is None:
        first = Path(run_dirs[0])
        out = first / ("dynamics.png" if len(run_dirs) == 1 else
                       "dynamics_vs_" + "_".join(Path(d).name for d in run_dirs[1:]) + ".png")
    rows = dynamics_table(runs)
    sheet = draw_dynamics_sheet(runs, out)
    return {"sheet": str(sheet), "rows": rows, "table": format_table(rows), "without_diagnostics": missing}
