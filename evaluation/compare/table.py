"""The comparison as a plain-text table for a terminal (``interp-eval compare`` and ``make demo``).

One row per metric, one column per variant: the baseline column holds "mean ± std" over seeds,
every other column the difference to the baseline, Δ = variant − baseline, its p-value (adjusted
for multiple comparisons when the report has it) and ✓/✗ when significant in / against the
interpretable direction. Columns that would make a line longer than ``width`` characters go
into a further block of rows, so the table fits an ordinary terminal (default 100 columns).
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_WIDTH = 100
GAP = "  "


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:#.{digits}g}"


def baseline_cell(stats: dict) -> str:
    cell = _fmt(stats.get("mean"), 3)  # significant digits: edge fractions are ~1e-3
    return cell if stats.get("std") is None else f"{cell} ± {stats['std']:#.2g}"


def variant_cell(stats: dict) -> str:
    """"Δ+0.065 ✓ p=0.01" against the baseline, or "mean ± std" when there is no comparison."""
    c = stats.get("comparison")
    if not c or c.get("diff") is None:
        return baseline_cell(stats)
    p = c.get("p_adjusted", c.get("p"))
    verdict = f" {c['verdict']}" if c.get("verdict") else ""
    return f"Δ{c['diff']:+#.2g}{verdict} p={'–' if p is None else f'{p:.2g}'}"


def format_table(report: dict, metrics: Sequence[str] | None = None, width: int = DEFAULT_WIDTH) -> str:
    """The table of ``report`` (report.json's content) for ``metrics`` (default: every metric of
    the report that has a value), at most ``width`` characters per line."""
    labels = {m["name"]: m["label"] + (" ↑" if m["higher_is_better"] else " ↓") for m in report["metrics"]}
    variants = report["variants"]
    baseline = report.get("baseline") or next(iter(variants))
    names = [n for n in (metrics or labels) if n in labels
             and any(v["metrics"].get(n, {}).get("mean") is not None for v in variants.values())]
    order = [baseline, *(v for v in variants if v != baseline)] if baseline in variants else list(variants)
    columns = {v: [baseline_cell(variants[v]["metrics"].get(n, {})) if v == baseline
                   else variant_cell(variants[v]["metrics"].get(n, {})) for n in names] for v in order}
    head = ["metric", *(labels[n] for n in names)]
    head_width = max(len(h) for h in head)
    blocks, current, used = [], [], head_width
    for v in order:
        col_width = max(len(v), *(len(c) for c in columns[v])) if names else len(v)
        if current and used + len(GAP) + col_width > width:
            blocks.append(current)
            current, used = [], head_width
        current.append((v, col_width))
        used += len(GAP) + col_width
    if current:
        blocks.append(current)
    lines: list[str] = []
    for block in blocks:
        if lines:
            lines.append("")
        rows = [[head[0].ljust(head_width), *(v.ljust(w) for v, w in block)]]
        rows.append(["-" * head_width, *("-" * w for _, w in block)])
        for i, n in enumerate(names):
            rows.append([head[i + 1].ljust(head_width), *(columns[v][i].ljust(w) for v, w in block)])
        lines += [GAP.join(r).rstrip() for r in rows]
    return "\n".join(lines)


LEGEND = ("Δ = variant − baseline over seeds; ✓ significant in the interpretable direction (↑ higher / ↓ lower "
          "is better), ✗ significant the other way; p adjusted for multiple comparisons where the report says so.")
