"""study/results/summary.md: per task the command(s), seeds, dates and cost, the headline cells and
the table of every cell (mean ± std over seeds; Δ to baseline with Holm-adjusted and raw p)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from study.tradeoff import best_within

HEADLINE_METRICS = ("alignment", "lib_edge_fraction_90")


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def summary_table(report: Mapping[str, Any], metrics: list[str] | None = None) -> str:
    """Markdown table: per variant and metric "mean ± std", and for variants "Δ (p)" vs baseline,
    p corrected for the report's number of comparisons (raw p beside) and ✓/✗ on the corrected p."""
    names = [m["name"] for m in report["metrics"] if metrics is None or m["name"] in metrics]
    labels = {m["name"]: m["label"] + (" ↑" if m["higher_is_better"] else " ↓") for m in report["metrics"]}
    lines = ["| variant | n | " + " | ".join(labels[n] for n in names) + " |", "|---|---|" + "---|" * len(names)]
    order = [report["baseline"]] + [v for v in report["variants"] if v != report["baseline"]]
    for variant in order:  # report.json is written with sorted keys: baseline first again
        row = report["variants"][variant]
        cells = []
        for n in names:
            s = row["metrics"][n]
            cell = f"{fmt(s['mean'])} ± {fmt(s['std'], 2)}"
            c = s.get("comparison")
            if c is not None and c.get("diff") is not None:
                if c.get("p") is None:
                    p = "–"
                elif c.get("correction", "none") == "none":
                    p = f"{c['p']:.2g}"
                else:
                    p = f"{c['p_adjusted']:.2g}, raw {c['p']:.2g}"
                cell += f" (Δ {c['diff']:+.3g}, p={p}{' ' + c['verdict'] if c['verdict'] else ''})"
            cells.append(cell)
        lines.append(f"| `{variant}` | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline(report: Mapping[str, Any], metric: str, max_accuracy_drop: float = 0.01) -> str | None:
    """One sentence: the best cell for ``metric`` within ``max_accuracy_drop`` of the baseline's accuracy."""
    best = best_within(report, metric, max_accuracy_drop)
    label = next((m["label"] for m in report["metrics"] if m["name"] == metric), metric)
    if best is None:
        return None if metric not in {m["name"] for m in report["metrics"]} else (
            f"{label}: no cell within {100 * max_accuracy_drop:g} point(s) of the baseline's accuracy")
    p = "no test" if best["p"] is None else f"Holm p = {best['p_adjusted']:.2g} (raw {best['p']:.2g})"
    return (f"{label}, best within {100 * max_accuracy_drop:g} point of accuracy: `{best['variant']}` "
            f"{fmt(best['baseline'])} → {fmt(best['mean'])} (×{fmt(best['ratio'])}, {p}) at "
            f"{100 * best['accuracy_diff']:+.2f} points of accuracy")


def cost_line(info: Mapping[str, Any]) -> str:
    compares = info.get("compares", [])
    minutes = info.get("train_seconds", 0.0) / 60
    untimed = info.get("runs_without_time", 0)
    text = (f"{info.get('n_runs', '?')} runs, training {minutes:.1f} min (sum over runs"
            + (f"; {untimed} runs trained without a recorded time" if untimed else "") + ")")
    if compares:
        text += (f"; compare {compares[0]['seconds'] / 60:.1f} min (first), "
                 f"{sum(c['seconds'] for c in compares) / 60:.1f} min over {len(compares)} invocation(s) "
                 "(later ones reuse the cache)")
    return text


def task_section(task: str, report: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
    lines = [f"## {task}", ""]
    if info:
        compares = info.get("compares", [])
        lines += [f"* Seeds: {', '.join(map(str, info.get('seeds', [])))}; cells: {len(info.get('cells', []))}"
                  + (f"; not trained: {', '.join(info['missing'])}" if info.get("missing") else ""),
                  f"* Cost (one torch thread, shared 2-core machine): {cost_line(info)}",
                  f"* Date of the last compare: {compares[-1]['date'] if compares else '?'}"]
        lines += [f"* Training command: `{c}`" for c in info.get("train_commands", [])]
        lines += [f"* Compare command: `{c}`" for c in sorted({c['command'] for c in compares} - {''})]
    lines += [f"* {h}" for h in (headline(report, m) for m in HEADLINE_METRICS) if h]
    rand = info.get("alignment_random_baseline")
    if rand:
        lines.append(f"* Random-direction alignment √(k/d) = √({rand['k']}/{rand['d']}) = {fmt(rand['baseline'])}")
    lines += ["", f"![{task} trade-off](../figures/{task}_tradeoff.png)", "", summary_table(report), ""]
    return lines


def write_summary(out: Path, tasks: list[str]) -> Path:
    """Writes ``out/summary.md`` from every ``out/<task>/report.json`` (with its study.json); returns its path."""
    from interp_train.io import write_atomic

    text = ["# Study summary (generated by study/run_study.py)", "",
            "Each regularizer family at 0.1, 1 and 10 × its recipe's weight (`<family>_x<m>`; `adversarial`: × the "
            "attack radius ε, since PGD training replaces the task loss and its weight would only rescale the loss) "
            "against standard training (`baseline`). Δ = variant − baseline; p: Welch t-test over seeds, Holm-adjusted over each "
            "report's comparisons (raw p beside); ✓/✗: significant after the correction, in / against the "
            "interpretable direction.", ""]
    for task in tasks:
        path = out / task / "report.json"
        if path.is_file():
            info_path = out / task / "study.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            text += task_section(task, json.loads(path.read_text()), info)
    return write_atomic(out / "summary.md", "\n".join(text))
