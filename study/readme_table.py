"""The study README's per-task tables, from a report.json: ``python study/readme_table.py REPORT --metrics ...``.

One row per cell, the mean over its seeds and, in brackets, its change against the baseline: × for
edge counts and ratios (where a factor reads better than a difference), points for accuracy, + for
the rest; then the verdict after the report's multiple-comparison correction: ✓ / ✗ significant in
the interpretable / other direction, n.s.* raw p < 0.05 but not after the correction, n.s. otherwise.

A table in a markdown file is kept current by a marker line right above it,

    <!-- table: results/digits/report.json accuracy lib_edge_fraction_90 ... [| cells: baseline a b] -->

(the report's path relative to the markdown file, then the metrics; optionally the rows), or
``<!-- summary table: ... -->`` for ``study.summary.summary_table``'s layout (mean ± std, Δ, p);
``python study/readme_table.py --update study/README.md`` rewrites every marked table from its report,
and ``--check`` exits 1 naming each marked table that differs (tests/test_study_results.py runs it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from study.summary import fmt, summary_table  # noqa: E402

# metrics whose change reads as a factor: edge fractions, node and edge counts, ratios
FACTOR_SUFFIXES = ("_edge_fraction_90", "_ratio")
FACTOR_PREFIXES = ("circuit_", "edge_ablation_")


def is_factor(metric: str) -> bool:
    return metric.endswith(FACTOR_SUFFIXES) or metric.startswith(FACTOR_PREFIXES)


def verdict(comparison: Mapping[str, Any]) -> str:
    if comparison.get("significant"):
        return "✓" if comparison.get("improved") else "✗"
    p = comparison.get("p")
    return "n.s.*" if p is not None and p < 0.05 else "n.s."


def value(metric: str, mean: float) -> str:
    return f"{100 * mean:.2f} %" if metric == "accuracy" else fmt(mean)


def change(metric: str, comparison: Mapping[str, Any]) -> str:
    base, variant = comparison["mean_baseline"], comparison["mean_variant"]
    if metric == "accuracy":
        shift = f"{100 * (variant - base):+.2f} pt"
    elif is_factor(metric) and base:
        shift = f"×{variant / base:.2f}"
    else:
        diff = variant - base
        shift = f"+{fmt(diff)}" if diff >= 0 else fmt(diff)
    return f"{shift} {verdict(comparison)}"


def _check_metrics(report: Mapping[str, Any], metrics: Sequence[str]) -> None:
    held = sorted(m["name"] for m in report["metrics"])
    unknown = [m for m in metrics if m not in held]
    if unknown:
        raise ValueError(f"metrics not in this report: {unknown}; it holds {held}")


def table(report: Mapping[str, Any], metrics: Sequence[str], cells: Sequence[str] | None = None) -> str:
    """A markdown table of ``metrics`` for ``cells`` (default: the baseline, then every other cell by name)."""
    _check_metrics(report, metrics)
    labels = {m["name"]: m for m in report["metrics"]}
    baseline = report["baseline"]
    cells = list(cells) if cells else [baseline] + sorted(v for v in report["variants"] if v != baseline)
    missing = [c for c in cells if c not in report["variants"]]
    if missing:
        raise ValueError(f"cells not in this report: {missing}; it holds {sorted(report['variants'])}")
    arrows = {m: "↑" if labels[m]["higher_is_better"] else "↓" for m in metrics}
    lines = ["| cell | " + " | ".join(f"{labels[m]['label']} {arrows[m]}" for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    for cell in cells:
        row = report["variants"][cell]["metrics"]
        parts = []
        for m in metrics:
            stats = row.get(m)
            if stats is None or stats.get("mean") is None:
                parts.append("—")
                continue
            text = value(m, stats["mean"])
            if cell != baseline and stats.get("comparison"):
                text += f" ({change(m, stats['comparison'])})"
            parts.append(text)
        lines.append(f"| `{cell}` | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def summary(report: Mapping[str, Any], metrics: Sequence[str], cells: Sequence[str] | None = None) -> str:
    """``study.summary.summary_table`` (mean ± std, Δ, corrected and raw p), its rows limited to ``cells``."""
    _check_metrics(report, metrics)
    lines = summary_table(report, list(metrics)).splitlines()
    if not cells:
        return "\n".join(lines)
    rows = {line.split("`")[1]: line for line in lines[2:]}
    missing = [c for c in cells if c not in rows]
    if missing:
        raise ValueError(f"cells not in this report: {missing}; it holds {sorted(rows)}")
    return "\n".join(lines[:2] + [rows[c] for c in cells])


MARKER = re.compile(r"^<!-- (?P<style>table|summary table): (?P<report>\S+) (?P<metrics>[^|]+?)(?: \| cells: (?P<cells>[^|]+?))? -->$")


def marked_tables(markdown: str, base: Path) -> list[tuple[int, int, str]]:
    """(first line, end line, table as the report makes it) for each marked table of ``markdown``;
    lines count from 0, the table is lines[first:end]. A marker without a table below it raises."""
    lines = markdown.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = MARKER.match(line)
        if not match:
            continue
        first = i + 1
        end = first
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        if end == first:
            raise ValueError(f"line {i + 1}: a table marker with no table below it")
        report = json.loads((base / match["report"]).read_text())
        cells = match["cells"].split() if match["cells"] else None
        render = table if match["style"] == "table" else summary
        found.append((first, end, render(report, match["metrics"].split(), cells)))
    return found


def update(path: Path, write: bool) -> list[int]:
    """The (1-based) marker lines of ``path`` whose table differs from its report; rewrites them if ``write``."""
    text = path.read_text()
    lines = text.splitlines()
    stale = []
    for first, end, fresh in reversed(marked_tables(text, path.parent)):
        if lines[first:end] != fresh.splitlines():
            stale.append(first)
            lines[first:end] = fresh.splitlines()
    if write and stale:
        from interp_train.io import write_atomic

        write_atomic(path, "\n".join(lines) + ("\n" if text.endswith("\n") else ""))
    return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, nargs="?", help="a report.json: print its table")
    parser.add_argument("--metrics", nargs="+")
    parser.add_argument("--cells", nargs="+", help="rows in this order (default: baseline, then by name)")
    parser.add_argument("--update", type=Path, metavar="MARKDOWN", help="rewrite every marked table of this file")
    parser.add_argument("--check", type=Path, metavar="MARKDOWN", help="exit 1 if a marked table is not current")
    args = parser.parse_args(argv)
    try:
        if args.update or args.check:
            path = args.update or args.check
            stale = update(path, write=bool(args.update))
            verb = "rewrote" if args.update else "not current:"
            if stale:
                print(f"{path}: {verb} the tables below the markers at lines {stale}")
            return 1 if stale and args.check else 0
        if args.report is None or not args.metrics:
            parser.error("give a report.json and --metrics, or --update/--check MARKDOWN")
        print(table(json.loads(args.report.read_text()), args.metrics, args.cells))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
