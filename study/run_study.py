"""The study: per task, standard training against each regularizer family at three strengths a
decade apart (0.1, 1, 10 × the recipe's weight), 5 seeds per cell, measured by
``interp-eval compare`` (accuracy, LIB/PCA interaction sparsity, modularity, gradient alignment,
off/on robustness ratio, LLC where cheap), Holm-corrected over each task's comparisons.

    python study/run_study.py                                   # everything (resumable)
    python study/run_study.py --tasks digits --train-only       # parts, in separate processes
    python study/run_study.py --tasks digits --families grad_norm --multipliers 10 --seeds 0 1
    python study/run_study.py --tasks digits --compare-only     # measure + report what is trained
    python study/run_study.py --restat                          # statistics again from report.json

Runs go to ``<root>/<task>/baseline/seed<k>/`` and ``<root>/<task>/<family>_x<m>/seed<k>/`` (default
root checkpoints/study; study/sweep.py), each with its derived recipe and ``study.json`` (training
time, command, date). A run whose ``metrics.json`` exists is skipped; compare's per-checkpoint cache
lives in ``<root>/<task>/compare/cache`` and is reused, so a rerun only does the missing work.
Reports: ``<out>/<task>/report.md|json``, ``tradeoff.png`` (each metric against strength) and
``study.json`` (commands, seeds, dates, cost), key plots copied to ``<figures>/<task>_*.png``, and
``<out>/summary.md``. ``--restat`` only rebuilds the reports' statistics from the per-seed values
they hold (no checkpoints needed).

To add a task, add a ``TaskPlan`` to ``PLANS`` in study/plans.py (study/sweep.py documents its fields).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python study/run_study.py` puts study/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from study.sweep import BASELINE, DEFAULT_SEEDS, RECIPE_FILE, Cell, TaskPlan, cells, write_derived_recipe  # noqa: E402
from study.plans import PLANS  # noqa: E402
from study.restat import measured_versions, measurements_from_report, restat, restated  # noqa: E402,F401

DEFAULT_OUT, DEFAULT_FIGURES = "study/results", "study/figures"
STUDY_FILE = "study.json"  # per run (training cost) and per task report (compare cost, commands)


def command_line(argv: list[str]) -> str:
    return "python study/run_study.py " + shlex.join(argv)


# Every committed study run computed its task loss on a forward pass of its own (RecipeModule's
# shared_forward=False, the only path up to 2026-12-04); pinned so that they are reproduced bit
# for bit. Sharing the pass changes only the floating-point rounding, and saves the regularizers
# that read activations a forward and backward pass per step (benchmarks/recipe_step_cost.py).
SEPARATE_TASK_FORWARD = ("--model.shared_forward", "false")


def fit_args(plan: TaskPlan, cell: Cell, recipe: Path, extra: list[str] = ()) -> list[str]:
    """``interp-train fit`` arguments of one run (progress bar and model summary off)."""
    return ["fit", "--config", str(recipe), "--seed_everything", str(cell.seed), "--run_dir", str(cell.directory),
            *plan.extra, *SEPARATE_TASK_FORWARD, *extra,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _without_pin(args: list[str]) -> list[str]:
    """``args`` as recorded by runs trained before SEPARATE_TASK_FORWARD was written out."""
    n = len(SEPARATE_TASK_FORWARD)
    for i in range(len(args) - n + 1):
        if tuple(args[i:i + n]) == SEPARATE_TASK_FORWARD:
            return args[:i] + args[i + n:]
    return args


def changed_settings(cell: Cell, args: list[str]) -> str:
    """How a trained run's settings differ from what the plan would train now ('' if they do not, or
    if the run has no record): the derived recipe, or the ``interp-train fit`` arguments."""
    import yaml

    from study.sweep import derived_recipe

    info, recipe = read_json(cell.directory / STUDY_FILE), cell.directory / RECIPE_FILE
    if recipe.is_file() and yaml.safe_load(recipe.read_text()) != derived_recipe(cell):
        return f"{RECIPE_FILE} differs from {cell.recipe}" + (
            "" if cell.multiplier is None else f" x {cell.multiplier:g}")
    if info.get("fit_args") not in (None, args, _without_pin(args)):
        return f"fit arguments {shlex.join(info['fit_args'])!r}, now {shlex.join(args)!r}"
    return ""


def train(plan: TaskPlan, todo: list[Cell], command: str = "", extra: list[str] = (), log=print) -> list[Cell]:
    """Trains every cell of ``todo`` without metrics.json, in this process, one after another;
    writes the derived recipe and ``study.json`` (seconds, command, date) into each run directory.
    A run that fails is logged and left out (its failure.json says why); returns the failed cells."""
    from evaluation.compare.cache import entry_lock
    from interp_train.cli import InterpTrainCLI
    from interp_train.io import write_json_atomic

    failed = []
    for i, cell in enumerate(todo, 1):
        tag = f"[{cell.task} {i}/{len(todo)}] {cell.variant} seed{cell.seed}"
        args = fit_args(plan, cell, cell.directory / RECIPE_FILE, list(extra))
        if cell.done:
            changed = changed_settings(cell, args)
            log(f"{tag}: done already" + (f" (WARNING: trained with other settings: {changed}; delete "
                                          f"{cell.directory} to retrain)" if changed else ""))
            continue
        with entry_lock(training_lock(cell), wait=False) as held:
            if not held:
                log(f"{tag}: being trained by another process (its lock {training_lock(cell)} is held); skipped")
                continue
            if cell.done:  # finished by another process between the check above and the lock
                log(f"{tag}: done already")
                continue
            write_derived_recipe(cell)
            start = time.time()
            try:
                InterpTrainCLI(args=args)
            except Exception as err:  # one diverged strength must not stop the other runs
                log(f"{tag}: FAILED after {time.time() - start:.0f} s: {type(err).__name__}: {err}")
                failed.append(cell)
                continue
            seconds = time.time() - start
            write_json_atomic(cell.directory / STUDY_FILE, {
                "task": cell.task, "variant": cell.variant, "family": cell.family, "multiplier": cell.multiplier,
                "seed": cell.seed, "recipe": str(cell.recipe), "train_seconds": seconds, "command": command,
                "fit_args": args,
                "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
            log(f"{tag}: trained in {seconds:.0f} s")
    return failed


def training_lock(cell: Cell) -> Path:
    """The lock a process holds while it trains ``cell`` (next to the run directory, which the
    trainer creates): two processes given overlapping seeds train each run once, instead of both
    writing into one directory."""
    return cell.directory.parent / ".locks" / f"{cell.directory.name}.lock"


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def random_alignment(compare_dir: Path, variant: str, seed: int) -> dict | None:
    """{"k", "d", "baseline"}: the tangent dimension, the input dimension and the random-direction
    alignment √(k/d) that compare recorded for one run (None when alignment was not measured)."""
    from evaluation.compare.cache import cache_path

    entry = read_json(cache_path(compare_dir, variant, f"seed{seed}"))
    found = ((entry.get("measured") or {}).get("alignment") or {}).get("details", {}).get("alignment")
    return None if not found else {k: found.get(k) for k in ("k", "d", "baseline")}


def measure_options(plan: TaskPlan, llc: bool | None = None):
    """The ``MeasureOptions`` a task's compare runs with (``llc`` None: the plan's choice)."""
    from evaluation.compare import MeasureOptions

    return MeasureOptions(**{"llc": plan.llc if llc is None else llc, **plan.measure})


def compare(plan: TaskPlan, task: str, todo: list[Cell], root: Path, out: Path, command: str = "",
            llc: bool | None = None, figures: Path | None = None, log=print, cached: bool = False,
            selected: list[Cell] | None = None, metrics: list[str] | None = None):
    """``interp-eval compare`` on the trained cells of ``todo`` (cache: ``<root>/<task>/compare/cache``);
    report.json|md, plots and tradeoff.png go to ``<out>/<task>/``, cost and commands to its study.json.
    ``selected``: the cells asked for (default ``todo``); those not trained are listed as missing.
    ``metrics``: measure and report only these (a metric added since the runs were measured; then
    ``study/merge_reports.py`` adds them to the earlier report)."""
    from evaluation.compare import run_compare, runs_from_paths
    from interp_train.io import write_json_atomic
    from study.tradeoff import plot_tradeoff

    done: dict[str, list[Cell]] = {}
    for cell in todo:
        if cell.done:
            done.setdefault(cell.variant, []).append(cell)
    missing = [f"{c.variant}/seed{c.seed}" for c in (todo if selected is None else selected) if not c.done]
    if missing:
        log(f"[{task}] not trained, left out of the report: {', '.join(missing)}")
    if BASELINE not in done:
        raise ValueError(f"task {task!r}: no trained baseline run under {root / task / BASELINE}; train it first")
    variants = {v: runs_from_paths(v, [c.directory for c in cs]) for v, cs in done.items()}
    other = other_architectures(variants, BASELINE)
    if other:
        log(f"[{task}] another model than the baseline's, left out of the report (compare their circuits with "
            f"study/circuit_composition.py): {', '.join(other)}")
        variants = {v: runs for v, runs in variants.items() if v not in other}
        done = {v: cells for v, cells in done.items() if v not in other}
    options = measure_options(plan, llc)
    start = time.time()
    if cached:  # nothing measured: the metrics cached for every run (study/cached.py)
        from study.cached import cached_compare

        result = cached_compare(variants, root / task / "compare", options, baseline=BASELINE)
    else:
        result = run_compare(variants, root / task / "compare", options, baseline=BASELINE, progress=False,
                             metrics=metrics)
    seconds = time.time() - start
    target = out / task
    target.mkdir(parents=True, exist_ok=True)
    for name in result.files:
        shutil.copyfile(result.out_dir / name, target / name)
    files = [*result.files, plot_tradeoff(result.report, target / "tradeoff.png")]
    runs = [c for cs in done.values() for c in cs]
    train_seconds = [read_json(c.directory / STUDY_FILE).get("train_seconds") for c in runs]
    info = read_json(target / STUDY_FILE)
    history = info.get("compares", []) + [{"command": command, "seconds": seconds,
                                           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}]
    write_json_atomic(target / STUDY_FILE, {
        "task": task, "recipe": plan.recipe, "seeds": sorted({c.seed for c in runs}),
        "cells": sorted(done), "n_runs": len(runs), "missing": missing,
        "train_seconds": sum(t for t in train_seconds if t is not None),
        "runs_without_time": sum(t is None for t in train_seconds),
        "train_commands": sorted({read_json(c.directory / STUDY_FILE).get("command", "") for c in runs} - {""}),
        "compares": history, "llc": options.llc,
        "alignment_random_baseline": random_alignment(root / task / "compare", BASELINE, done[BASELINE][0].seed)})
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        for name in files:
            if name.endswith(".png"):
                shutil.copyfile(target / name, figures / f"{task}_{name}")
    log(f"[{task}] compare finished after {seconds:.0f} s: {target / 'report.md'}")
    return result


def other_architectures(variants: dict, baseline: str) -> list[str]:
    """The variants whose model (run config ``model.model``) is not the baseline's: one report
    compares one architecture (``interp-eval compare`` refuses a mix), so a task's cells of another
    width (the ``wide_*`` families) are left out of its report."""
    from evaluation.compare.runs import architecture

    reference = {architecture(r) for r in variants[baseline]}
    return [v for v, runs in variants.items() if v != baseline and {architecture(r) for r in runs} != reference]


def figures_dir(out: Path) -> Path:
    """Where the key plots go by default: study/figures beside the default reports, else <out>/figures."""
    return Path(DEFAULT_FIGURES) if Path(out) == Path(DEFAULT_OUT) else Path(out) / "figures"


def report_cells(plan: TaskPlan, task: str, args, root: Path) -> list[Cell]:
    """Every cell a task's report covers: all its trained cells at the plan's and the asked strengths,
    not only the part selected by --families."""
    strengths = sorted(set(plan.multipliers) | set(args.multipliers or ()))
    return list(cells(plan, task, args.seeds, root, ROOT, multipliers=strengths))


def check_capability(task: str, plan: TaskPlan, args, root: Path, training: bool) -> None:
    """Refuses (SystemExit) to mix runs trained with different torch CPU capabilities in a task
    under ``root`` (study/cpu_dispatch.py): every trained cell of the task counts, not only those
    selected, since the report covers them all."""
    from study.cpu_dispatch import check_one_capability, current_level

    trained = [c.directory for c in report_cells(plan, task, args, root) if c.done]
    try:
        check_one_capability(task, trained, current_level(), training)
    except ValueError as err:
        raise SystemExit(f"run_study: {err}")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--families", nargs="+", default=None,
                        help="train only these families (and 'baseline' for standard training); default: all of the "
                             "task's. The report still covers every trained cell under --root: to measure a "
                             "subset, point --root at a folder holding only those cells")
    parser.add_argument("--multipliers", nargs="+", type=float, default=None,
                        help="strengths as multiples of the recipe's regularizer weight; default: the plan's (0.1 1 10)")
    parser.add_argument("--root", default="checkpoints/study", help="run directories (and compare's cache) go here")
    parser.add_argument("--out", default=DEFAULT_OUT, help="reports go here")
    parser.add_argument("--figures", default=None,
                        help="copies of the key plots, <task>_<plot>.png (default: study/figures with the default "
                             "--out, else <out>/figures, so a report written elsewhere leaves the committed plots alone)")
    llc = parser.add_mutually_exclusive_group()
    llc.add_argument("--llc", dest="llc", action="store_true", default=None,
                     help="measure the LLC on every task (default: on the tasks whose plan has it)")
    llc.add_argument("--no-llc", dest="llc", action="store_false", default=None, help="skip the LLC everywhere")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train-only", action="store_true", help="train the missing runs, measure nothing")
    mode.add_argument("--compare-only", action="store_true", help="measure and report the runs trained so far")
    mode.add_argument("--restat", action="store_true",
                      help="only rebuild the reports' statistics from the values in <out>/<task>/report.json")
    mode.add_argument("--dry-run", action="store_true", help="list the runs and whether each is done")
    parser.add_argument("--cached", action="store_true",
                        help="with --compare-only: report from the measurement cache alone, leaving out metrics "
                             "not cached for every run (study/cached.py)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help="with --compare-only: measure and report only these compare metrics (e.g. one added "
                             "since the runs were measured; merge the report into the earlier one with "
                             "study/merge_reports.py)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    parser.add_argument("--allow-mixed-cpu", action="store_true",
                        help="train or report runs of a task whose runs record different torch CPU capabilities "
                             "(study/cpu_dispatch.py); refused by default")
    args = parser.parse_args(argv)
    if args.families is not None and len(args.tasks) != 1:
        parser.error("--families needs exactly one task in --tasks (family names differ between tasks)")
    if args.metrics is not None and (not args.compare_only or args.cached):
        parser.error("--metrics needs --compare-only without --cached (it chooses what to measure)")
    # a seed given twice (`--seeds 0 {}` with {} = 0) would train and measure the same run twice
    args.seeds = list(dict.fromkeys(args.seeds))
    return args


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from study.summary import write_summary

    root, out = Path(args.root), Path(args.out)
    figures = Path(args.figures) if args.figures else figures_dir(out)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    command = command_line(argv)
    if args.restat:
        restat(out, figures, args.tasks, log=log)
    plans = {} if args.restat else {t: PLANS[t] for t in args.tasks}
    todo = {}
    for task, plan in plans.items():
        try:
            todo[task] = list(cells(plan, task, args.seeds, root, ROOT, args.families, args.multipliers))
        except ValueError as err:
            raise SystemExit(f"run_study: {err}")
        if args.metrics is not None:
            from evaluation.compare.measure import select_metrics

            try:
                select_metrics(measure_options(plan, args.llc), args.metrics)
            except ValueError as err:
                raise SystemExit(f"run_study: [{task}] --metrics: {err}")
    if args.dry_run:
        for task, cs in todo.items():
            log(f"[{task}] {sum(c.done for c in cs)}/{len(cs)} runs done")
            for c in cs:
                log(f"  {'done' if c.done else 'todo'}  {c.directory}  ({c.recipe.name}"
                    + ("" if c.multiplier is None else f" × {c.multiplier:g}") + ")")
        return
    import torch

    torch.set_num_threads(args.threads)
    for task, plan in plans.items():
        if not args.allow_mixed_cpu:
            check_capability(task, plan, args, root, training=not args.compare_only)
        if not args.compare_only:
            start = time.time()
            failed = train(plan, todo[task], command, log=log)
            log(f"[{task}] training finished after {time.time() - start:.0f} s"
                + (f"; {len(failed)} run(s) failed" if failed else ""))
        if args.train_only:
            continue
        compare(plan, task, report_cells(plan, task, args, root), root, out, command, llc=args.llc, figures=figures, log=log,
                cached=args.cached, selected=todo[task], metrics=args.metrics)
    if not args.train_only:
        log(f"wrote {write_summary(out, list(PLANS))}")


if __name__ == "__main__":
    main()
