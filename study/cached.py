"""A compare report from the measurement cache alone: ``run_study.py --compare-only --cached``.

When the compare code gains a metric after a task was measured, a normal compare measures it on
every run (the LIB fit again, minutes per run on a loaded machine). ``cached_compare`` instead
reports the metrics whose cached record matches the current key (evaluation.compare.cache: same
checkpoint, metric version and options, so the value is what the current code would measure) on
every run, and names the metrics it leaves out in the report's messages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

from evaluation.compare import cache
from evaluation.compare.command import CompareResult
from evaluation.compare.measure import _view, enabled_metrics
from evaluation.compare.options import MeasureOptions
from evaluation.compare.report import build_report, render_markdown
from evaluation.compare.runs import Run, check_consistent
from interp_train.io import write_atomic, write_json_atomic


def cached_compare(variants: Mapping[str, Sequence[Run]], out_dir: Path, options: MeasureOptions,
                   baseline: str = "baseline") -> CompareResult:
    """report.json, report.md and the plots in ``out_dir`` from ``out_dir/cache`` (nothing is measured)."""
    from evaluation.compare import plots as compare_plots

    out_dir = Path(out_dir)
    opts = dataclasses.asdict(options)
    metrics = enabled_metrics(options)
    entries = []
    for runs in variants.values():
        for run in runs:
            digest = cache.run_digest(run.checkpoint, run.config)
            entry = cache.read_entry(cache.cache_path(out_dir, run.variant, run.seed), digest) or {"measured": {}}
            entries.append((run, digest, entry))
    cached = [m for m in metrics
              if all(e["measured"].get(m.name, {}).get("key") == cache.metric_key(d, m, opts) for _, d, e in entries)]
    left_out = [m.name for m in metrics if m not in cached]
    measurements: dict[str, list[dict]] = {v: [] for v in variants}
    for run, _, entry in entries:
        measurements[run.variant].append({"variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir),
                                          "checkpoint": str(run.checkpoint), "options": opts,
                                          **_view(entry["measured"], cached, entry.get("task"))})
    messages = check_consistent(variants)
    if left_out:
        messages.append(f"reported from the measurement cache; not measured on every run, so left out: "
                        f"{', '.join(left_out)}")
    report = build_report(measurements, baseline, "welch", 0.05, opts, messages)
    plots = compare_plots.write_plots(report, measurements, out_dir)
    write_json_atomic(out_dir / "report.json", report)
    write_atomic(out_dir / "report.md", render_markdown(report, plots))
    return CompareResult(report, out_dir, ["report.json", "report.md", *plots])
