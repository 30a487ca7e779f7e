"""The compare report: per variant and metric the seed values, mean ± std and, against the
baseline, the difference, its test and the verdict on the p-value corrected for the number of
comparisons (``build_report``); and its markdown rendering (``render_markdown``).

The correction family is every tested (variant, metric) pair of one report, accuracy included
(its ✗ is a significant cost); Holm by default (evaluation.compare.stats).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from evaluation.compare.metrics import all_metrics
from evaluation.compare.stats import CORRECTIONS, TESTS, apply_correction, compare_groups
from interp_train.io import json_safe

BASELINE = "baseline"


def arrow(diff: float | None) -> str:
    """↑ / ↓ for the sign of the difference to baseline, = for none, – when undefined."""
    if diff is None:
        return "–"
    return "↑" if diff > 0 else "↓" if diff < 0 else "="


def verdict(comparison: Mapping[str, Any]) -> str:
    """✓ significant (corrected p) in the interpretable direction, ✗ significant the other way, '' otherwise."""
    if not comparison.get("significant"):
        return ""
    return "✓" if comparison.get("improved") else "✗"


def check_baseline_and_test(variants: Mapping[str, Any], baseline: str, test: str,
                            correction: str = "holm") -> None:
    if baseline not in variants:
        raise ValueError(f"no baseline variant {baseline!r}; variants found: {', '.join(sorted(variants))} "
                         "(choose one with --baseline)")
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; allowed: {', '.join(TESTS)}")
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; allowed: {', '.join(CORRECTIONS)}")


def build_report(
    measurements: Mapping[str, Sequence[Mapping[str, Any]]],
    baseline: str = BASELINE,
    test: str = "welch",
    alpha: float = 0.05,
    options: Mapping[str, Any] | None = None,
    messages: Sequence[str] = (),
    correction: str = "holm",
) -> dict:
    """The report dict: per variant and metric the seed values, mean, std (ddof = 1) and, for
    non-baseline variants, ``compare_groups(baseline values, variant values, higher_is_better)``
    with p adjusted over all tested comparisons of the report (``correction``), plus ``arrow``
    and ``verdict`` (on the adjusted p). Metrics nobody measured are dropped; runs missing a
    value (None) are left out of that metric's statistics."""
    check_baseline_and_test(measurements, baseline, test, correction)
    messages = list(messages)
    order = [baseline] + sorted(v for v in measurements if v != baseline)
    used = [m for m in all_metrics() if any(e["metrics"].get(m.name) is not None
                                            for entries in measurements.values() for e in entries)]
    values = {v: {m.name: [e["metrics"].get(m.name) for e in measurements[v]] for m in used} for v in order}
    for v in order:
        n = len(measurements[v])
        if n < 2:
            messages.append(f"variant {v!r} has {n} seed; no significance test (at least 2 seeds per variant "
                            "are needed)")
    report_variants = {}
    comparisons = []
    for v in order:
        entries = measurements[v]
        row = {"seeds": [e["seed"] for e in entries], "runs": [e["run_dir"] for e in entries], "metrics": {}}
        for m in used:
            vals = [x for x in values[v][m.name] if x is not None]
            stats = {"values": values[v][m.name], "n": len(vals),
                     "mean": float(np.mean(vals)) if vals else None,
                     "std": float(np.std(vals, ddof=1)) if len(vals) >= 2 else None}
            if v != baseline:
                base = [x for x in values[baseline][m.name] if x is not None]
                stats["comparison"] = compare_groups(base, vals, higher_is_better=m.higher_is_better, test=test,
                                                     alpha=alpha)
                comparisons.append(stats["comparison"])
            row["metrics"][m.name] = stats
        notes = sorted({n for e in entries for n in e.get("notes", [])})
        if notes:
            row["notes"] = notes
        report_variants[v] = row
    n_comparisons = apply_correction(comparisons, correction)
    for c in comparisons:
        c.update(arrow=arrow(c["diff"]), verdict=verdict(c))
    tasks = sorted({str(e.get("details", {}).get("task")) for es in measurements.values() for e in es})
    return json_safe({
        "task": tasks[0] if len(tasks) == 1 else tasks, "baseline": baseline, "test": test, "alpha": alpha,
        "correction": correction, "n_comparisons": n_comparisons,
        "metrics": [m.info() for m in used], "variants": report_variants,
        "options": dict(options or {}), "messages": messages,
    })


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def format_p(comparison: Mapping[str, Any]) -> str:
    """"p=0.048 (holm; raw 0.012)" — the corrected p with the raw one beside; "no test" when untested."""
    if comparison.get("p") is None:
        return "no test"
    correction = comparison.get("correction", "none")
    if correction == "none" or comparison.get("p_adjusted") is None:
        return f"p={comparison['p']:.3g}"
    return f"p={comparison['p_adjusted']:.3g} ({correction}; raw {comparison['p']:.3g})"


def render_markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
    """report.md: one table row per variant; cells "mean ± std" and, for variants, the
    difference to baseline with its arrow, corrected and raw p-value and ✓/✗ (see ``verdict``)."""
    metrics = report["metrics"]
    correction = report.get("correction", "none")
    corrected = ("" if correction == "none" else
                 f" p-values {correction}-adjusted over the report's {report.get('n_comparisons')} comparisons "
                 "(raw p beside);")
    lines = [f"# Regularized vs standard training: {report['task']}", "",
             f"Baseline: `{report['baseline']}`. Test: {report['test']} (α = {report['alpha']});{corrected} "
             "seeds as listed. Each cell: mean ± std over seeds; for variants, Δ to baseline, "
             "arrow = direction of the change, p-value, ✓ = significant in the interpretable direction, "
             "✗ = significant the other way.", "",
             "| variant | seeds | " + " | ".join(f"{m['label']} ({'↑' if m['higher_is_better'] else '↓'} better)"
                                             for m in metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for v, row in report["variants"].items():
        cells = [f"`{v}`", str(len(row["seeds"]))]
        for m in metrics:
            s = row["metrics"][m["name"]]
            cell = f"{_fmt(s['mean'])} ± {_fmt(s['std'], 2)}"
            c = s.get("comparison")
            if c is not None:
                cell += f"<br>Δ {_fmt(c['diff'], 3)} {c['arrow']} ({format_p(c)}) {c['verdict']}".rstrip()
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy is the cost: its Δ is what the regularizer costs (or gains) in held-out accuracy.", "",
              "## Metrics", ""]
    lines += [f"- **{m['label']}** ({'higher' if m['higher_is_better'] else 'lower'} = "
              f"{'better' if m['name'] == 'accuracy' else 'more interpretable'}): {m['description']}"
              for m in metrics]
    measured = {m["name"] for m in metrics}
    options = report.get("options") or {}
    if measured & {"circuit_nodes", "circuit_nodes_zero"} and "circuit_delta" in options:
        ablations = ([f"circuit nodes/edges: {options.get('circuit_ablation', 'mean')} ablation"]
                     if "circuit_nodes" in measured else []) + (
                    ["the *zero* columns: zero ablation"] if "circuit_nodes_zero" in measured else [])
        lines.append(f"- **Circuit settings**: {options.get('circuit_search', 'penalty')} search, "
                     f"δ = {options['circuit_delta']:g} nats; {'; '.join(ablations)} (docs/DESIGN.md §6.2).")
    if "llc" not in measured:
        lines.append("- **LLC**: not measured (opt-in: `--llc`, on the task loss and on the training objective; "
                     "SGLD sampling is slow).")
    notes = [f"`{v}`: {n}" for v, row in report["variants"].items() for n in row.get("notes", [])]
    if report["messages"] or notes:
        lines += ["", "## Messages", ""] + [f"- {m}" for m in report["messages"]] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)
                  + " (metrics.png: bars = means, dots = seeds)."]
    lines.append("")
    return "\n".join(lines)
