"""``run_compare``: the ``interp-eval compare`` command as a function — check the runs, measure
them (cached), build the report, write report.json, report.md and the plots."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from evaluation.compare.measure import measure_all, select_metrics
from evaluation.compare.options import MeasureOptions
from evaluation.compare.report import BASELINE, build_report, check_baseline_and_test, render_markdown
from evaluation.compare.runs import Run, check_consistent
from interp_train.io import write_atomic, write_json_atomic


ONLY_ASKED = "measured only the metrics asked for"  # a report of some metrics (``metrics=``) says so


@dataclass
class CompareResult:
    report: dict
    out_dir: Path
    files: list[str] = field(default_factory=list)


def run_compare(
    variants: Mapping[str, Sequence[Run]],
    out_dir: str | Path,
    options: MeasureOptions = MeasureOptions(),
    baseline: str = BASELINE,
    test: str = "welch",
    alpha: float = 0.05,
    progress: bool = True,
    correction: str = "holm",
    metrics: Sequence[str] | None = None,
) -> CompareResult:
    """Checks the runs, measures them (cached in ``out_dir/cache``), writes ``report.json``,
    ``report.md`` and the plots into ``out_dir`` (each file atomically; a re-run replaces them).
    ``metrics``: measure and report only these (names; default every metric ``options`` enables)."""
    from evaluation.compare import plots as compare_plots

    check_baseline_and_test(variants, baseline, test, correction)  # before any (slow) measurement
    chosen = select_metrics(options, metrics)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {str(out_dir)!r} exists and is not a directory")
    messages = check_consistent(variants)
    if metrics is not None:
        messages.append(f"{ONLY_ASKED}: {', '.join(m.name for m in chosen)}")
    measurements = measure_all(variants, out_dir, options, progress=progress, metrics=metrics)
    report = build_report(measurements, baseline, test, alpha, dataclasses.asdict(options), messages,
                          correction=correction)
    plots = compare_plots.write_plots(report, measurements, out_dir)
    write_json_atomic(out_dir / "report.json", report)
    write_atomic(out_dir / "report.md", render_markdown(report, plots))
    return CompareResult(report, out_dir, ["report.json", "report.md", *plots])
