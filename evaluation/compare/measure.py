"""Measuring runs: every enabled compare metric on every run, each metric's value cached on its own.

``measure_all`` reads each run's cache entry (evaluation.compare.cache), measures the metrics
whose key is missing or changed on one shared ``RunContext`` (so the LIB fit, the tangents ...
are computed at most once per run, and only if a metric that needs them is measured), writes
the entry back atomically and returns per run the view the report and plots read:

    {"variant", "seed", "run_dir", "checkpoint", "options",
     "metrics": {name: value or None}, "details": {..., "task"}, "notes": [...]}

A metric's record holds its value, its own details and notes, and those of the shared
computations it used (``RunContext.used``), so each record is complete on its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from tqdm.auto import tqdm

from evaluation.compare import cache
from evaluation.compare.context import RunContext, finite_or_none
from evaluation.compare.metrics import CompareMetric, Measurement, all_metrics
from evaluation.compare.options import MeasureOptions
from evaluation.compare.runs import Run
from interp_train.io import json_safe, write_json_atomic


def enabled_metrics(options: MeasureOptions) -> list[CompareMetric]:
    """The registered metrics that ``options`` turns on (see ``CompareMetric.switch``), in report order."""
    return [m for m in all_metrics() if m.enabled(options)]


def select_metrics(options: MeasureOptions, names: Sequence[str] | None) -> list[CompareMetric]:
    """The enabled metrics named in ``names`` (all enabled ones for None), in report order; a name
    that is not an enabled metric raises, listing the enabled ones."""
    metrics = enabled_metrics(options)
    if names is None:
        return metrics
    known = {m.name for m in metrics}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"metrics {unknown or list(names)!r}: not among the metrics these options measure: "
                         f"{', '.join(sorted(known))}")
    return [m for m in metrics if m.name in set(names)]


def measure_metric(metric: CompareMetric, ctx: RunContext) -> dict[str, Any]:
    """{"value", "version", "details", "notes"} of ``metric`` on the context's run. A metric that the
    run's model cannot have (``DegenerateModelError``: LIB of a network with a constant layer, the
    alignment of one whose input gradients are all zero, e.g. one that collapsed in training) is
    None with the reason as a note, so one such run does not stop a whole comparison."""
    from evaluation.errors import DegenerateModelError

    ctx.used = set()
    try:
        out = metric.measure(ctx)
    except DegenerateModelError as err:
        out = Measurement(None, notes=[f"{metric.name} not measurable on this run: {err}"])
    result = out if isinstance(out, Measurement) else Measurement(out)
    details: dict[str, Any] = {}
    notes: list[str] = []
    for name in sorted(ctx.used):
        details.update(ctx.shared_details.get(name, {}))
        notes += ctx.shared_notes.get(name, [])
    details.update(result.details)
    notes += [n for n in result.notes if n not in notes]
    value = None if result.value is None else finite_or_none(result.value)
    return json_safe({"value": value, "version": metric.version, "details": details, "notes": notes})


def _view(measured: Mapping[str, Mapping], metrics: Sequence[CompareMetric], task: str | None) -> dict:
    values = {m.name: None for m in all_metrics()}
    details: dict[str, Any] = {}
    notes: list[str] = []
    for m in metrics:
        record = measured[m.name]
        values[m.name] = record["value"]
        details.update(record["details"])
        notes += [n for n in record["notes"] if n not in notes]
    return {"metrics": values, "details": {**details, "task": task}, "notes": notes}


def measure_run(run: Run, options: MeasureOptions, progress: bool = False,
                metrics: Sequence[CompareMetric] | None = None) -> dict:
    """Measures ``metrics`` (default: all enabled by ``options``) on ``run``, uncached:
    {"metrics": {name: value or None}, "details": {...}, "notes": [...], "measured": {name: record}}."""
    metrics = enabled_metrics(options) if metrics is None else list(metrics)
    ctx = RunContext(run, options, progress)
    measured = {m.name: measure_metric(m, ctx) for m in metrics}
    return {**_view(measured, metrics, ctx.task), "measured": measured}


def measure_all(
    variants: Mapping[str, Sequence[Run]],
    out_dir: Path,
    options: MeasureOptions,
    progress: bool = True,
    metrics: Sequence[str] | None = None,
) -> dict[str, list[dict]]:
    """{variant: [view per run]} (see the module docstring); each run's cache entry under
    ``out_dir/cache`` is reused metric by metric and rewritten atomically when anything was measured.

    A run with something to measure is measured under its entry's lock (``cache.entry_lock``); a run
    that another process is measuring is put last and then waited for, and only what that process
    left unmeasured is measured here. ``metrics``: only these (names; default every enabled metric),
    e.g. a metric added to the code since the runs were measured."""
    opts = dataclasses.asdict(options)
    metrics = select_metrics(options, metrics)
    runs = [r for rs in variants.values() for r in rs]
    views: dict[int, dict] = {}
    deferred = []
    with tqdm(total=len(runs), desc="checkpoints", disable=not progress) as bar:
        for i, run in enumerate(runs):
            views[i] = _measure_cached(run, out_dir, metrics, opts, options, wait=False)
            if views[i] is None:  # being measured by another process
                deferred.append(i)
            else:
                bar.update()
        for i in deferred:
            views[i] = _measure_cached(runs[i], out_dir, metrics, opts, options, wait=True)
            bar.update()
    out: dict[str, list[dict]] = {v: [] for v in variants}
    for i, run in enumerate(runs):
        out[run.variant].append(views[i])
    return out


def _measure_cached(run: Run, out_dir: Path, metrics: Sequence[CompareMetric], opts: Mapping[str, Any],
                    options: MeasureOptions, wait: bool) -> dict | None:
    """The view of ``run``, measuring (under the entry's lock) the metrics its cache entry lacks;
    None if that lock is held elsewhere and ``wait`` is False."""
    digest = cache.run_digest(run.checkpoint, run.config)
    path = cache.cache_path(out_dir, run.variant, run.seed)
    keys = {m.name: cache.metric_key(digest, m, opts) for m in metrics}

    def read():
        entry = cache.read_entry(path, digest) or {"run_digest": digest, "measured": {}}
        return entry, [m for m in metrics if entry["measured"].get(m.name, {}).get("key") != keys[m.name]]

    entry, stale = read()
    if stale:
        with cache.entry_lock(cache.lock_path(out_dir, run.variant, run.seed), wait=wait) as held:
            if not held:
                return None
            entry, stale = read()  # another process may have measured it meanwhile
            if stale:
                ctx = RunContext(run, options)
                for m in stale:
                    entry["measured"][m.name] = {"key": keys[m.name], "options": cache.metric_options(m, opts),
                                                 **measure_metric(m, ctx)}
                entry.update(variant=run.variant, seed=run.seed, run_dir=str(run.run_dir),
                             checkpoint=str(run.checkpoint), task=entry.get("task") or ctx.task)
                write_json_atomic(path, json_safe(entry))
    return {"variant": run.variant, "seed": run.seed, "run_dir": str(run.run_dir),
            "checkpoint": str(run.checkpoint), "options": dict(opts),
            **_view(entry["measured"], metrics, entry.get("task"))}
