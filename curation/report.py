"""The curation report: what each stage kept, and how balanced the result is.

``report/report.json`` holds the numbers; ``report/*.png`` plot them:

- ``stages.png``         samples kept after every stage (pool, de-duplication, image balancing,
                         text balancing, combined);
- ``cluster_sizes.png``  level-1 and top-level cluster sizes, largest first, in the pool and in
                         the curated subset (balancing flattens the head);
- ``concepts.png``       the most frequent metadata entries before and after;
- ``duplicates.png``     how many duplicate groups of each size were found.

Balance is summarised by the normalised entropy of a distribution (1.0 = uniform over its
bins) and by the share the largest 10% of bins hold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from dinotxt.utils.fileio import atomic_output, atomic_write_json

from .sampling import normalized_entropy


def distribution_summary(counts: np.ndarray) -> Dict:
    """Entropy vs uniform, size range and the share of the largest 10% of bins."""
    counts = np.asarray(counts, dtype=np.int64)
    top = np.sort(counts)[::-1][:max(1, len(counts) // 10)]
    return {"bins": int(len(counts)), "total": int(counts.sum()), "normalized_entropy": round(normalized_entropy(counts), 4),
            "max": int(counts.max()) if len(counts) else 0, "min": int(counts.min()) if len(counts) else 0,
            "top10pct_share": round(float(top.sum() / max(1, counts.sum())), 4)}


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_report(report: Dict, out_dir: Path, cluster_counts: List[Dict[str, np.ndarray]],
                concept_names: List[str], concept_before: Optional[np.ndarray], concept_after: Optional[np.ndarray]) -> List[str]:
    """Write the PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stages = report["kept"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(list(stages), list(stages.values()), color="#4c72b0")
    for i, v in enumerate(stages.values()):
        ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("samples")
    ax.set_title("samples kept after each stage")
    fig.tight_layout()
    _save_figure(fig, out_dir / "stages.png")
    written.append("stages.png")

    if cluster_counts:
        fig, axes = plt.subplots(1, len(cluster_counts), figsize=(5.5 * len(cluster_counts), 3.8), squeeze=False)
        for ax, item in zip(axes[0], cluster_counts):
            order = np.argsort(item["before"])[::-1]
            ax.plot(item["before"][order], label=f"pool (entropy {normalized_entropy(item['before']):.3f})")
            ax.plot(item["after"][order], label=f"curated (entropy {normalized_entropy(item['after']):.3f})")
            ax.set_yscale("symlog")
            ax.set_xlabel("cluster (largest in the pool first)")
            ax.set_ylabel("samples")
            ax.set_title(item["title"])
            ax.legend(fontsize=8)
        fig.tight_layout()
        _save_figure(fig, out_dir / "cluster_sizes.png")
        written.append("cluster_sizes.png")

    if concept_before is not None and len(concept_names):
        top = np.argsort(-concept_before, kind="stable")[:30]
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(top))
        ax.bar(x - 0.2, concept_before[top], width=0.4, label="pool")
        ax.bar(x + 0.2, concept_after[top], width=0.4, label="curated")
        ax.set_xticks(x)
        ax.set_xticklabels([concept_names[i] for i in top], rotation=60, ha="right", fontsize=8)
        ax.set_ylabel("captions matching")
        ax.set_title("most frequent metadata entries")
        ax.legend()
        fig.tight_layout()
        _save_figure(fig, out_dir / "concepts.png")
        written.append("concepts.png")

    groups = report.get("dedup", {}).get("group_sizes", {})
    if groups:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        sizes = sorted(int(s) for s in groups)
        ax.bar([str(s) for s in sizes], [groups[s] if s in groups else groups[str(s)] for s in sizes], color="#dd8452")
        ax.set_xlabel("duplicate group size")
        ax.set_ylabel("groups")
        ax.set_title(f"near duplicates: {report['dedup']['removed']:,} samples removed")
        fig.tight_layout()
        _save_figure(fig, out_dir / "duplicates.png")
        written.append("duplicates.png")
    return written


def write_report(out_dir: Path, report: Dict, plots: bool, **plot_inputs) -> Dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = plot_report(report, out_dir, **plot_inputs)
    atomic_write_json(out_dir / "report.json", report)
    return report
