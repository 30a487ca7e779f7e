"""Statistics again from a report's stored per-seed values (``run_study.py --restat``): no checkpoint
is read, each metric keeps the version it was measured at, and the report, its markdown and its
trade-off plot are rewritten with the current statistics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def plots_named_in(markdown: str) -> list[str]:
    """The compare plots a report.md shows, so that re-rendering it keeps them."""
    return [p for p in ("metrics.png", "alignment_hist.png", "edge_curves.png") if f"`{p}`" in markdown]


def measurements_from_report(report: dict) -> dict[str, list[dict]]:
    """The per-run values a report.json holds, in the shape ``build_report`` reads (details: the task only)."""
    out = {}
    for variant, row in report["variants"].items():
        out[variant] = [{"seed": seed, "run_dir": run, "notes": row.get("notes", []), "details": {"task": report["task"]},
                         "metrics": {m: stats["values"][i] for m, stats in row["metrics"].items()}}
                        for i, (seed, run) in enumerate(zip(row["seeds"], row["runs"]))]
    return out


def measured_versions(current: list[dict], recorded: list[dict]) -> tuple[list[dict], list[str]]:
    """``current`` (the metrics' descriptions as the code has them now) with each metric's version as
    ``recorded`` in the report the values come from: statistics rebuilt from stored values must not
    relabel them as measured by a later definition. Also "name (version a; the code: b)" for each
    metric whose recorded version is not the code's."""
    versions = {m["name"]: m.get("version") for m in recorded}
    infos = [{**m, "version": versions.get(m["name"], m.get("version"))} for m in current]
    stale = [f"{m['name']} (version {info['version']}; the code: {m.get('version')})"
             for m, info in zip(current, infos) if info["version"] != m.get("version")]
    return infos, stale


def restated(old: dict) -> tuple[dict, list[str]]:
    """The report ``build_report`` makes now from ``old``'s per-seed values (the current statistics),
    each metric at the version ``old`` recorded, and the metrics whose version the code has bumped."""
    from evaluation.compare.report import build_report

    generated = ("has 1 seed; no significance test",)  # build_report adds these again
    messages = [m for m in old["messages"] if not any(g in m for g in generated)]
    report = build_report(measurements_from_report(old), old["baseline"], old["test"], old["alpha"],
                          old["options"], messages, correction=old.get("correction", "holm"))
    report["metrics"], stale = measured_versions(report["metrics"], old["metrics"])
    return report, stale


def restat(out: Path, figures: Path | None, tasks: list[str] | None = None, log=print) -> None:
    """Rebuilds every ``out/<task>/report.{json,md}`` and ``tradeoff.png`` from the per-seed values
    the report holds, with the current statistics (tests, multiple-comparison correction); no
    checkpoint is read. Re-draws ``figures/<task>_{metrics,tradeoff}.png`` when ``figures`` is given."""
    from evaluation.compare import plots as compare_plots
    from evaluation.compare.report import render_markdown
    from interp_train.io import write_atomic, write_json_atomic
    from study.plans import PLANS
    from study.tradeoff import plot_tradeoff

    for task in tasks or list(PLANS):
        path = out / task / "report.json"
        if not path.is_file():
            continue
        old = json.loads(path.read_text())
        report, stale = restated(old)
        if stale:
            log(f"[{task}] measured by an earlier version of the code (not re-measured by --restat): "
                + ", ".join(stale))
        old_md = (out / task / "report.md").read_text() if (out / task / "report.md").is_file() else ""
        plots = plots_named_in(old_md)
        write_json_atomic(path, report)
        write_atomic(out / task / "report.md", render_markdown(report, plots))
        plot_tradeoff(report, out / task / "tradeoff.png")
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            compare_plots.plot_metric_bars(report, figures / f"{task}_metrics.png")
            shutil.copyfile(out / task / "tradeoff.png", figures / f"{task}_tradeoff.png")
        log(f"[{task}] statistics rebuilt: {report['n_comparisons']} comparisons, {report['correction']} correction")
