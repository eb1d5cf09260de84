"""The report's figures, drawn with matplotlib (Agg backend, no display) as PNG bytes: the same bytes go into the
HTML page as data URIs and to W&B as images.

Each function returns None when its data is absent; the page then says why in one line.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from trainer.report.collect import ReportData
from trainer.report.heldout import MapPoints
from trainer.verification import VerificationPairs

DPI = 100
SKIPPED_METRICS = {"step", "num_queries", "num_pairs", "num_triplets"}


def draw_all(report: ReportData) -> dict[str, bytes]:
    """Every figure the data allows, by name (loss, metrics, distances, roc, map), as PNG bytes."""
    drawn = {
        "loss": loss_figure(report.steps),
        "metrics": metrics_figure(report.evals),
        "distances": distance_figure(report.heldout.pairs),
        "roc": roc_figure(report.heldout.pairs),
        "map": map_figure(report.heldout.points),
    }
    return {name: png for name, png in drawn.items() if png is not None}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; force: a caller's interactive backend must not open windows
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    plt = _pyplot()
    out = io.BytesIO()
    figure.tight_layout()
    figure.savefig(out, format="png", dpi=DPI)
    plt.close(figure)
    return out.getvalue()


def loss_figure(steps: list[dict[str, Any]]) -> bytes | None:
    """Training loss (skipped steps left out) and learning rate over steps."""
    kept = [row for row in steps if row.get("loss") is not None and not row.get("skipped")]
    if not kept:
        return None
    figure, (loss_axis, lr_axis) = _pyplot().subplots(1, 2, figsize=(10, 3.2))
    x = [row["step"] for row in kept]
    loss_axis.plot(x, [row["loss"] for row in kept], color="tab:blue", linewidth=1)
    loss_axis.set(title="training loss", xlabel="step", ylabel="loss")
    lr_axis.plot([row["step"] for row in steps], [row.get("lr", np.nan) for row in steps], color="tab:orange")
    lr_axis.set(title="learning rate", xlabel="step", ylabel="lr")
    for axis in (loss_axis, lr_axis):
        axis.grid(alpha=0.3)
    return _png(figure)


def metrics_figure(evals: list[dict[str, Any]]) -> bytes | None:
    """Each evaluation metric over steps; the step-0 evaluation (the untrained baseline) marked as a star."""
    names = sorted({key for row in evals for key, value in row.items()
                    if key not in SKIPPED_METRICS and isinstance(value, (int, float))})
    if not evals or not names:
        return None
    figure, axis = _pyplot().subplots(figsize=(10, 3.6))
    for number, name in enumerate(names):
        rows = [row for row in evals if name in row]
        color = f"C{number % 10}"
        axis.plot([row["step"] for row in rows], [row[name] for row in rows], marker="o", color=color, label=name)
        baseline = [row for row in rows if row["step"] == 0]
        if baseline:
            axis.scatter([0], [baseline[0][name]], marker="*", s=160, color=color, edgecolor="black", zorder=3)
    axis.set(title="held-out evaluation over steps (★ step-0 baseline)", xlabel="step", ylabel="value")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(figure)


def distance_figure(pairs: VerificationPairs | None) -> bytes | None:
    """Histograms of the cosine similarity of same and different held-out pairs, with the chosen threshold."""
    if pairs is None:
        return None
    figure, axis = _pyplot().subplots(figsize=(6, 3.6))
    bins = np.linspace(min(-1.0, float(pairs.scores.min())), 1.0, 61)
    axis.hist(pairs.scores[pairs.same], bins=bins, alpha=0.6, color="tab:green", label="positive pairs", density=True)
    axis.hist(pairs.scores[~pairs.same], bins=bins, alpha=0.6, color="tab:red", label="negative pairs", density=True)
    axis.axvline(pairs.threshold, color="black", linestyle="--", label=f"threshold {pairs.threshold:.3f}")
    axis.set(title="held-out pairs: cosine similarity", xlabel="cosine similarity", ylabel="density")
    axis.legend(fontsize=8)
    return _png(figure)


def roc_figure(pairs: VerificationPairs | None) -> bytes | None:
    """The ROC curve of the held-out pairs, with the operating point of the chosen threshold."""
    if pairs is None:
        return None
    from sklearn.metrics import roc_auc_score, roc_curve

    false_rate, true_rate, _ = roc_curve(pairs.same, pairs.scores)
    chosen = pairs.scores >= pairs.threshold
    point = (float(chosen[~pairs.same].mean()), float(chosen[pairs.same].mean()))
    figure, axis = _pyplot().subplots(figsize=(4.6, 4.2))
    axis.plot(false_rate, true_rate, color="tab:blue", label=f"AUC {roc_auc_score(pairs.same, pairs.scores):.3f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.scatter([point[0]], [point[1]], color="black", zorder=3,
                 label=f"threshold {pairs.threshold:.3f} (accuracy {pairs.accuracy:.3f})")
    axis.set(title="ROC, held-out pairs", xlabel="false positive rate", ylabel="true positive rate")
    axis.legend(fontsize=7, loc="lower right")
    return _png(figure)


def map_figure(points: MapPoints | None) -> bytes | None:
    """The 2-D PCA map, coloured by class (or view); a legend when there are few groups, a colour bar otherwise."""
    if points is None:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 5))
    many = len(points.names) > 20
    cmap = "viridis" if many else "tab20" if len(points.names) > 10 else "tab10"
    drawn = axis.scatter(points.coords[:, 0], points.coords[:, 1], c=points.groups, cmap=cmap, s=8, alpha=0.8,
                         vmin=0, vmax=max(len(points.names) - 1, 1) if many else (19 if cmap == "tab20" else 9))
    if many:
        figure.colorbar(drawn, ax=axis, label=f"{points.coloured_by} (rank)")
    else:
        handles = [plt.Line2D([], [], marker="o", linestyle="", color=drawn.cmap(drawn.norm(group)), label=name)
                   for group, name in enumerate(points.names)]
        axis.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axis.set(title=f"held-out embeddings, PCA ({len(points.coords)} points, by {points.coloured_by})",
             xlabel="PC 1", ylabel="PC 2")
    return _png(figure)
