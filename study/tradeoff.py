"""Trade-off curves of a strength sweep: each metric against the regularizer's strength.

A sweep report (``interp-eval compare`` over the cells ``baseline`` and ``<family>_x<m>``, see
study/sweep.py) is read back as, per metric and family, the points (m, mean, std, n, verdict) over
seeds, with the baseline's mean ± std as the reference line. ``plot_tradeoff`` draws one panel per
metric (accuracy first: the cost beside every gain), x = multiplier on a log axis;
``best_within`` picks the headline cell: the largest gain in one metric among cells that cost at
most a given accuracy drop.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

from study.sweep import BASELINE, parse_variant


def series(report: Mapping[str, Any], metric: str) -> dict[str, list[dict]]:
    """{family: [{"multiplier", "mean", "std", "n", "verdict", "p_adjusted"}] sorted by multiplier}
    for ``metric``; cells with no value are left out; the baseline is not a family."""
    out: dict[str, list[dict]] = {}
    for variant, row in report["variants"].items():
        family, m = parse_variant(variant)
        stats = row["metrics"].get(metric)
        if family == BASELINE or stats is None or stats.get("mean") is None:
            continue
        c = stats.get("comparison") or {}
        out.setdefault(family, []).append({"multiplier": m, "mean": stats["mean"], "std": stats.get("std"),
                                           "n": stats.get("n"), "verdict": c.get("verdict") or "",
                                           "p_adjusted": c.get("p_adjusted"), "p": c.get("p"),
                                           "diff": c.get("diff")})
    return {f: sorted(points, key=lambda p: p["multiplier"]) for f, points in sorted(out.items())}


def baseline_stats(report: Mapping[str, Any], metric: str) -> tuple[float | None, float | None]:
    stats = report["variants"][report["baseline"]]["metrics"].get(metric) or {}
    return stats.get("mean"), stats.get("std")


def plot_tradeoff(report: Mapping[str, Any], path: str | Path) -> str:
    """tradeoff.png: per metric (accuracy first) mean ± std over seeds against the multiplier of
    the recipe's regularizer weight (log x), one line per family; grey line and band: the
    baseline's mean ± std; a filled marker: significant after the report's correction (✓ or ✗)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interp_train.io import write_atomic

    metrics = sorted(report["metrics"], key=lambda m: m["name"] != "accuracy")
    families = sorted({f for m in metrics for f in series(report, m["name"])})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    cols = min(4, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.1 * rows), squeeze=False)
    for ax in axes.ravel()[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.ravel(), metrics):
        mean, std = baseline_stats(report, metric["name"])
        if mean is not None:
            ax.axhline(mean, color="grey", lw=1, label="baseline")
            if std:
                ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2, lw=0)
        for family, points in series(report, metric["name"]).items():
            xs = [p["multiplier"] for p in points]
            ax.errorbar(xs, [p["mean"] for p in points], yerr=[p["std"] or 0.0 for p in points], color=colors[family],
                        marker="o", mfc="white", capsize=3, lw=1.2, label=family)
            sig = [p for p in points if p["verdict"]]
            ax.scatter([p["multiplier"] for p in sig], [p["mean"] for p in sig], color=colors[family], zorder=3, s=30)
        ax.set_xscale("log")
        ax.set_xlabel("× recipe's regularizer weight")
        better = "↑" if metric["higher_is_better"] else "↓"
        ax.set_title(f"{metric['label']} ({better} {'better' if metric['name'] == 'accuracy' else 'interpretable'})",
                     fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{report['task']}: mean ± std over seeds vs strength (filled: significant after "
                 f"{report.get('correction', 'no')} correction over {report.get('n_comparisons')} comparisons)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return Path(path).name


def best_within(report: Mapping[str, Any], metric: str, max_accuracy_drop: float = 0.01) -> dict | None:
    """The cell with the best mean of ``metric`` (in its interpretable direction) among those whose
    mean accuracy is at most ``max_accuracy_drop`` below the baseline's; with the ratio to the
    baseline, its (corrected) p and its accuracy change. None when no cell qualifies."""
    info = {m["name"]: m for m in report["metrics"]}
    if metric not in info or "accuracy" not in info:
        return None
    base_acc, _ = baseline_stats(report, "accuracy")
    base, _ = baseline_stats(report, metric)
    sign = 1.0 if info[metric]["higher_is_better"] else -1.0
    best = None
    for variant, row in report["variants"].items():
        if variant == report["baseline"]:
            continue
        acc, stats = row["metrics"]["accuracy"], row["metrics"][metric]
        if acc.get("mean") is None or stats.get("mean") is None or acc["mean"] < base_acc - max_accuracy_drop:
            continue
        if best is None or sign * stats["mean"] > sign * best["mean"]:
            c = stats.get("comparison") or {}
            best = {"variant": variant, "mean": stats["mean"], "std": stats.get("std"), "baseline": base,
                    "ratio": stats["mean"] / base if base else None, "p": c.get("p"),
                    "p_adjusted": c.get("p_adjusted"), "verdict": c.get("verdict") or "",
                    "accuracy_diff": acc["mean"] - base_acc,
                    "accuracy_p_adjusted": (acc.get("comparison") or {}).get("p_adjusted")}
    return best
