"""Figures of ``interp-eval compare`` (matplotlib, Agg). Each PNG is written atomically.

* metrics.png — one panel per metric: a bar per variant at the mean over seeds, a dot per seed.
* alignment_hist.png — per-example gradient-alignment fractions, one histogram per variant
  (all seeds pooled), with the random-direction baseline sqrt(k/d) marked.
* edge_curves.png — cumulative LIB edge weight against edges kept, one panel per edge layer,
  every run of every variant on it (colour = variant).

A variant has the same colour in every figure of a report (the report's variant order, baseline
first); the ✓/✗ verdicts go under the variant names, clear of the data.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from interp_train.io import write_atomic  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return path.name


def variant_colors(report: Mapping[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    """{variant: colour} in the report's variant order with the baseline first (tab10, then tab20
    beyond 10 variants); ``extra`` names not in the report are appended."""
    variants = list(report.get("variants", {}))
    baseline = report.get("baseline")
    order = ([baseline] if baseline in variants else []) + [v for v in variants if v != baseline]
    order += [v for v in extra if v not in order]
    cmap = plt.get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {v: cmap(i % cmap.N) for i, v in enumerate(order)}


def _grid(n: int, width: float = 3.6, height: float = 3.0):
    cols = min(max(n, 1), 4)
    rows = (max(n, 1) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def plot_metric_bars(report: Mapping[str, Any], path: Path, colors: Mapping[str, Any] | None = None) -> str:
    variants = list(report["variants"])
    colors = colors or variant_colors(report)
    fig, axes = _grid(len(report["metrics"]))
    for ax, metric in zip(axes, report["metrics"]):
        for i, v in enumerate(variants):
            stats = report["variants"][v]["metrics"][metric["name"]]
            vals = [x for x in stats["values"] if x is not None]
            if stats["mean"] is not None:
                ax.bar(i, stats["mean"], color=colors[v], alpha=0.45,
                       yerr=stats["std"] if stats["std"] is not None else None, capsize=3)
            ax.scatter(np.full(len(vals), i) + np.linspace(-0.15, 0.15, len(vals)) if len(vals) > 1 else [i] * len(vals),
                       vals, color=colors[v], edgecolors="k", linewidths=0.4, s=18, zorder=3)
        verdicts = [(report["variants"][v]["metrics"][metric["name"]].get("comparison") or {}).get("verdict") or ""
                    for v in variants]
        ax.set_xticks(range(len(variants)), [f"{v}\n{mark}" if mark else v for v, mark in zip(variants, verdicts)],
                      rotation=25 if len(variants) > 3 else 0, fontsize=8)
        better = "↑" if metric["higher_is_better"] else "↓"
        ax.set_title(f"{metric['label']} ({better} better)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{report['task']}: mean over seeds (bars), seeds (dots), baseline {report['baseline']!r}")
    return _save(fig, path)


def plot_alignment_hist(measurements: Mapping[str, Sequence[Mapping]], path: Path,
                        colors: Mapping[str, Any] | None = None) -> str | None:
    pooled = {v: np.concatenate([np.asarray(e["details"]["alignment"]["fractions"], dtype=np.float64)
                                 for e in entries if "alignment" in e.get("details", {})] or [np.zeros(0)])
              for v, entries in measurements.items()}
    pooled = {v: f for v, f in pooled.items() if f.size}
    if not pooled:
        return None
    colors = colors or variant_colors({}, list(measurements))
    fig, ax = plt.subplots(figsize=(6, 3.8))
    bins = np.linspace(0, 1, 41)
    for v, fr in pooled.items():
        ax.hist(fr, bins=bins, density=True, histtype="step", lw=1.5, color=colors[v], label=f"{v} (mean {fr.mean():.3f})")
    baselines = {e["details"]["alignment"]["baseline"] for es in measurements.values() for e in es
                 if "alignment" in e.get("details", {})}
    for b in sorted(baselines):
        ax.axvline(b, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("||UUᵀg|| / ||g||   (dashed: random baseline sqrt(k/d))")
    ax.set_ylabel("density")
    ax.set_title("gradient alignment with the data manifold")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_edge_curves(measurements: Mapping[str, Sequence[Mapping]], path: Path,
                     colors: Mapping[str, Any] | None = None) -> str | None:
    layers: list[str] = []
    for entries in measurements.values():
        for e in entries:
            for layer in e.get("details", {}).get("edge_curves") or {}:
                if layer not in layers:
                    layers.append(layer)
    if not layers:
        return None
    colors = colors or variant_colors({}, list(measurements))
    fig, axes = _grid(len(layers), width=4.2, height=3.3)
    for ax, layer in zip(axes, layers):
        for v, entries in measurements.items():
            for i, e in enumerate(entries):
                curve = (e.get("details", {}).get("edge_curves") or {}).get(layer)  # none: LIB not measurable
                if curve and curve["n"]:
                    ax.semilogx(curve["n"], curve["c"], color=colors[v], lw=1, alpha=0.8, label=v if i == 0 else None)
        ax.axhline(0.9, color="grey", lw=0.7, ls="--")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"LIB edges out of {layer}", fontsize=9)
        ax.set_xlabel("edges kept (largest first)")
        ax.set_ylabel("share of edge weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Cumulative edge weight (one line per run)")
    return _save(fig, path)


def write_plots(report: Mapping[str, Any], measurements: Mapping[str, Sequence[Mapping]], out_dir: Path) -> list[str]:
    """Writes the figures that have data; returns their file names."""
    out_dir = Path(out_dir)
    colors = variant_colors(report, list(measurements))
    files = [plot_metric_bars(report, out_dir / "metrics.png", colors),
             plot_alignment_hist(measurements, out_dir / "alignment_hist.png", colors),
             plot_edge_curves(measurements, out_dir / "edge_curves.png", colors)]
    return [f for f in files if f]
