"""One task report from the per-seed values of two: ``python study/merge_reports.py OLD NEW --out REPORT``.

The study's runs are deterministic on CPU (same recipe, seed and code: the same weights and the same
measured values), so cells measured in an earlier pass need not be re-trained when new cells are
added: this merges two ``report.json`` files of the same task and measurement options into one,
run by run, and ``run_study.py --restat`` then rebuilds the statistics over the merged family of
comparisons. A run present in both (same variant and seed) must have the same value of every metric
both measured (within ``--rtol``): that is the check that the earlier values are what the current
code measures; a disagreement raises and nothing is written. A metric whose version differs between
the two reports merges only when a run in both shows the versions agree on it. ``--replace VARIANT`` (or
``VARIANT/seedN``) drops those runs of OLD first, so a cell re-trained and re-measured comes from NEW
alone (its earlier values are not checked: use it for runs known to be different models).
The merged report holds every metric measured on every merged run: new cells measured with all
metrics merge on the metrics both reports hold, and a metric added to the code later, measured on
every run of OLD (``run_study.py --compare-only --metrics accuracy NEW_METRIC``), joins OLD's.
The two may differ in the switches that only select metrics (``--circuit``, ``--edge-ablation``,
``--llc``, ...): a pass of circuits alone over every run joins a report measured without them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python study/merge_reports.py` puts study/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

# options that do not change a measured value (where the process ran)
IGNORED_OPTIONS = ("device",)


def options_added() -> dict:
    """{option: the value reports older than it were measured at}, from the compare metrics'
    ``options_added`` (a report written before an option existed lacks it)."""
    from evaluation.compare.metrics.base import all_metrics

    return {name: value for metric in all_metrics() for name, value in metric.options_added.items()}


def metric_switches() -> dict[str, str]:
    """{metric name: the boolean ``MeasureOptions`` field that turns it on}; metrics always measured
    are absent. A switch selects metrics and changes no measured value, so reports may differ in it."""
    from evaluation.compare.metrics.base import all_metrics

    return {m.name: m.switch for m in all_metrics() if m.switch}


def _runs(report: dict) -> dict[tuple[str, str], dict]:
    """The report's runs keyed by (variant, seed), unpacked as ``run_study --restat`` reads them."""
    from study.restat import measurements_from_report

    return {(variant, m["seed"]): {"run": m["run_dir"], "notes": m["notes"], "values": m["metrics"]}
            for variant, runs in measurements_from_report(report).items() for m in runs}


def _same(a, b, rtol: float) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) and isinstance(b, float) and (math.isnan(a) or math.isnan(b)):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300)


def _replaced(key: tuple[str, str], replace: Sequence[str]) -> bool:
    return key[0] in replace or f"{key[0]}/{key[1]}" in replace


def merge_reports(old: dict, new: dict, rtol: float = 1e-9, replace: Sequence[str] = ()) -> dict:
    """``new`` with the runs of ``old`` it lacks; metrics: those measured on every merged run, by either
    report (values of ``new`` where both). So new cells measured with every metric merge on the
    metrics both reports hold, and a metric measured afterwards on every run of ``old``
    (``run_study.py --compare-only --metrics ...``) joins the earlier report's metrics.

    The measurement options must agree, except the switches that only select metrics (``circuit``,
    ``edge_ablation``, ``llc``, ``alignment``, ...: ``metric_switches``): a report measured with
    circuits merges with one measured without them, on the metrics every merged run has, and the
    merged report's switch is on where it holds a metric the switch turns on.

    ``replace``: variants (``name``) or runs (``name/seedN``) of ``old`` left out before merging; each
    must name a run of ``old``, so a typo raises instead of silently keeping the earlier values.
    """
    if old["task"] != new["task"] or old["baseline"] != new["baseline"]:
        raise ValueError(f"reports of different tasks/baselines: {old['task']}/{old['baseline']} vs "
                         f"{new['task']}/{new['baseline']}")
    added = options_added()
    old_options, new_options = ({**{k: v for k, v in added.items() if k not in r["options"]}, **r["options"]}
                                for r in (old, new))
    switch_of = metric_switches()
    switches = set(switch_of.values())
    differing = sorted(k for k in set(old_options) | set(new_options)
                       if k not in IGNORED_OPTIONS and k not in switches and old_options.get(k) != new_options.get(k))
    if differing:
        raise ValueError(f"measurement options differ, values are not comparable: "
                         + ", ".join(f"{k}={old_options.get(k)!r} vs {new_options.get(k)!r}" for k in differing))
    old_runs, new_runs = _runs(old), _runs(new)
    unknown = [r for r in replace if not any(_replaced(key, (r,)) for key in old_runs)]
    if unknown:
        raise ValueError(f"--replace {', '.join(unknown)}: no such run in the earlier report; it has "
                         + ", ".join(f"{v}/{s}" for v, s in sorted(old_runs)))
    old_runs = {key: run for key, run in old_runs.items() if not _replaced(key, replace)}
    old_names, new_names = ({m["name"] for m in r["metrics"]} for r in (old, new))
    measured = [(old_names if key in old_runs else set()) | (new_names if key in new_runs else set())
                for key in {**old_runs, **new_runs}]
    infos = {**{m["name"]: m for m in old["metrics"]}, **{m["name"]: m for m in new["metrics"]}}
    from evaluation.compare.metrics.base import all_metrics

    order = {m.name: i for i, m in enumerate(all_metrics())}
    metrics = sorted((infos[n] for n in infos if all(n in names for names in measured)),
                     key=lambda m: order.get(m["name"], len(order)))
    names = [m["name"] for m in metrics]
    shared = set(old_runs) & set(new_runs)
    for key in sorted(shared):
        for name in (n for n in names if n in old_names and n in new_names):
            a, b = old_runs[key]["values"].get(name), new_runs[key]["values"].get(name)
            if not _same(a, b, rtol):
                raise ValueError(f"run {key[0]}/{key[1]}: {name} = {b!r} now but {a!r} in the earlier report "
                                 f"(rtol {rtol}); re-measure it instead of merging")
    old_versions = {m["name"]: m.get("version") for m in old["metrics"]}
    changed = [f"{m['name']} (version {old_versions[m['name']]} vs {m.get('version')})" for m in metrics
               if m["name"] in old_versions and m["name"] in new_names and old_versions[m["name"]] != m.get("version")]
    if changed and not shared:
        # with a run in both, the check above shows the two versions measure this task alike
        raise ValueError("measured by different versions of a metric, and no run is in both reports to show "
                         "they agree on this task: " + ", ".join(changed) + "; re-measure the earlier runs")
    empty = {"notes": [], "values": {}}
    merged_runs = {key: {"run": (new_runs.get(key) or old_runs[key])["run"],
                         "notes": sorted({*old_runs.get(key, empty)["notes"], *new_runs.get(key, empty)["notes"]}),
                         "values": {**old_runs.get(key, empty)["values"], **new_runs.get(key, empty)["values"]}}
                   for key in {**old_runs, **new_runs}}
    variants: dict[str, dict] = {}
    for (variant, seed) in sorted(merged_runs, key=lambda k: (k[0] != new["baseline"], k[0], k[1])):
        run = merged_runs[variant, seed]
        row = variants.setdefault(variant, {"seeds": [], "runs": [], "notes": [],
                                            "metrics": {n: {"values": []} for n in names}})
        # a report keeps notes per variant: those of both reports' rows, not only the first run's
        row["notes"] = sorted({*row["notes"], *run["notes"]})
        row["seeds"].append(seed)
        row["runs"].append(run["run"])
        for n in names:
            row["metrics"][n]["values"].append(run["values"].get(n))
    from evaluation.compare.command import ONLY_ASKED

    # a report of some metrics says so; merged into the earlier one, it no longer holds only those
    messages = [m for m in dict.fromkeys(old.get("messages", []) + new.get("messages", [])) if not m.startswith(ONLY_ASKED)]
    # a switch is on in the merged report when it holds a metric that the switch turns on
    options = {**new["options"], **{k: any(switch_of.get(n) == k for n in names)
                                    for k in switches if k in old["options"] or k in new["options"]}}
    return {**new, "options": options, "metrics": metrics, "variants": variants, "messages": messages}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="merged report.json (then run_study.py --restat)")
    parser.add_argument("--rtol", type=float, default=1e-9)
    parser.add_argument("--replace", nargs="+", default=[], metavar="VARIANT[/seedN]",
                        help="runs of OLD to leave out (re-trained runs that are different models); NEW's stand")
    args = parser.parse_args(argv)
    from interp_train.io import write_json_atomic

    merged = merge_reports(json.loads(args.old.read_text()), json.loads(args.new.read_text()), args.rtol,
                           args.replace)
    write_json_atomic(args.out, merged)
    print(f"merged {sum(len(r['seeds']) for r in merged['variants'].values())} runs "
          f"({', '.join(merged['variants'])}) into {args.out}; now: python study/run_study.py --restat")


if __name__ == "__main__":
    main()
