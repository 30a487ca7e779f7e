"""`make demo`: train baseline and regularized models on embedded data, 3 seeds each, and compare them.

    python -m interp_train.demo [--seeds 0 1 2] [--root checkpoints/demo] [--out reports/demo]

Two recipes, both offline and CPU-sized: the digits MLP (scikit-learn 8x8 digits) and the MLP on
the synthetic manifold (exact tangent spaces, so gradient alignment is measured exactly; the
bent d = 128 setting of study/run_study.py). Each (variant, seed) is trained with
``interp-train fit`` (in this process) into ``<root>/<task>/<variant>/seed<k>/``; a run whose
``metrics.json`` exists is reused. Then ``interp-eval compare`` measures every run (accuracy,
LIB/PCA interaction sparsity, modularity, gradient alignment, off/on robustness ratio; cached
in ``<out>/<task>/cache``), writes ``report.md``/``report.json`` and plots into ``<out>/<task>/``,
and the demo prints the comparison table and those paths.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# The synthetic manifold, strongly bent (scale 10) in d = 128: reading z linearly off the chart is
# then far from the tangent spaces, so gradient alignment has room to move (see study/README.md).
MANIFOLD_DATA = ("--data.init_args.ambient_dim", "128", "--data.init_args.scale", "10.0",
                 "--model.model.init_args.d_in", "128")
TABLE_METRICS = ("accuracy", "alignment", "robustness_ratio", "lib_edge_fraction_90", "pca_edge_fraction_90",
                 "modularity_q")


@dataclass(frozen=True)
class DemoTask:
    """One recipe folder (under recipes/), its baseline and regularized variants (YAML names),
    and CLI overrides applied to every run."""

    name: str
    variants: tuple[str, ...]
    baseline: str = "baseline"
    overrides: tuple[str, ...] = field(default_factory=tuple)


DEMO_TASKS = (
    DemoTask("digits", ("baseline", "grad_norm", "connection_cost")),
    DemoTask("manifold", ("baseline", "off_manifold_noise", "off_manifold_grad"), overrides=MANIFOLD_DATA),
)


def run_directory(root: Path, task: str, variant: str, seed: int) -> Path:
    return Path(root) / task / variant / f"seed{seed}"


def fit_arguments(task: DemoTask, variant: str, seed: int, directory: Path,
                  extra: Sequence[str] = (), recipes: Path = RECIPES) -> list[str]:
    """The ``interp-train fit`` arguments of one run: recipe YAML, seed, run directory, the task's
    overrides, then ``extra`` (later arguments win)."""
    config = Path(recipes) / task.name / f"{variant}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no recipe {str(config)!r} for variant {variant!r} of task {task.name!r}")
    return ["fit", "--config", str(config), "--seed_everything", str(seed), "--run_dir", str(directory),
            *task.overrides, *extra, "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]


def _fit_one(args: list[str], threads: int) -> None:
    """Worker: one ``interp-train fit`` in this process (torch threads set first)."""
    import torch

    from interp_train.cli import InterpTrainCLI

    torch.set_num_threads(threads)
    quiet_lightning()
    InterpTrainCLI(args=args)


def train_missing(task: DemoTask, seeds: Sequence[int], root: Path, extra: Sequence[str] = (),
                  progress: bool = True, recipes: Path = RECIPES, workers: int = 1,
                  threads: int = 1) -> dict[str, int]:
    """Trains every (variant, seed) of ``task`` whose run directory has no metrics.json yet, in
    ``workers`` processes (each run single-process and seeded, so results do not depend on it).
    Returns {"trained": n, "reused": m}."""
    from tqdm.auto import tqdm

    jobs = [(v, s) for v in task.variants for s in seeds]
    todo = [fit_arguments(task, v, s, run_directory(root, task.name, v, s), extra, recipes)
            for v, s in jobs if not (run_directory(root, task.name, v, s) / "metrics.json").is_file()]
    counts = {"trained": len(todo), "reused": len(jobs) - len(todo)}
    bar = tqdm(total=len(todo), desc=f"train {task.name}", unit="run", disable=not progress or not todo)
    if workers <= 1:
        for args in todo:
            _fit_one(args, threads)
            bar.update()
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for future in cf.as_completed([pool.submit(_fit_one, args, threads) for args in todo]):
                future.result()  # re-raises a failed run's error
                bar.update()
    bar.close()
    return counts


def compare_task(task: DemoTask, seeds: Sequence[int], root: Path, out: Path, max_samples: int = 512,
                 progress: bool = True):
    """``interp-eval compare`` on the task's runs into ``out/<task>/`` (its cache/ is reused)."""
    from evaluation.compare import MeasureOptions, run_compare, runs_from_paths

    variants = {v: runs_from_paths(v, [run_directory(root, task.name, v, s) for s in seeds])
                for v in task.variants}
    return run_compare(variants, Path(out) / task.name, MeasureOptions(max_samples=max_samples),
                       baseline=task.baseline, progress=progress)


def format_table(report: dict, metrics: Sequence[str] = TABLE_METRICS, width: int = 100) -> str:
    """The terminal table of evaluation.compare.table (metrics as rows, variants as columns, at
    most ``width`` characters a line) for the demo's metrics."""
    from evaluation.compare.table import format_table as compare_table

    return compare_table(report, metrics, width=width)


def quiet_lightning() -> None:
    """Lightning's per-run banners and the few known-harmless warnings would bury the progress bars."""
    import lightning.pytorch  # noqa: F401  (sets its loggers to INFO on import; lower them afterwards)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")


def run_demo(tasks: Sequence[DemoTask] = DEMO_TASKS, seeds: Sequence[int] = (0, 1, 2),
             root: str | Path = "checkpoints/demo", out: str | Path = "reports/demo", extra: Sequence[str] = (),
             max_samples: int = 512, progress: bool = True, recipes: Path = RECIPES, echo=print,
             workers: int = 1, threads: int = 1) -> dict[str, dict]:
    """Trains (what is missing), compares and prints; returns {task: report dict}."""
    root, out = Path(root), Path(out)
    reports = {}
    for task in tasks:
        start = time.time()
        counts = train_missing(task, seeds, root, extra, progress, recipes, workers, threads)
        trained = time.time() - start
        result = compare_task(task, seeds, root, out, max_samples, progress)
        echo(f"\n== {task.name}: {len(task.variants)} variants x {len(seeds)} seeds "
             f"({counts['trained']} trained in {trained:.0f} s, {counts['reused']} reused; "
             f"compare {time.time() - start - trained:.0f} s) ==")
        echo(format_table(result.report))
        echo(f"report: {result.out_dir / 'report.md'}")
        plots = [f for f in result.files if f.endswith(".png")]
        if plots:
            echo("plots:  " + ", ".join(str(result.out_dir / p) for p in plots))
        reports[task.name] = result.report
    from evaluation.compare.table import LEGEND

    echo(f"\n{LEGEND} Welch t-test; accuracy is the cost. Full study: study/README.md.")
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", default="checkpoints/demo", help="run directories go here (reused)")
    parser.add_argument("--out", default="reports/demo", help="compare reports and plots go here")
    parser.add_argument("--tasks", nargs="+", default=[t.name for t in DEMO_TASKS],
                        choices=[t.name for t in DEMO_TASKS])
    parser.add_argument("--max-samples", type=int, default=512, help="examples for LIB / alignment / robustness")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: these models are too small to gain from more)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes in parallel (default: up to 2 cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args, extra = parser.parse_known_args(argv)  # unknown arguments go to every `interp-train fit`
    import torch

    torch.set_num_threads(args.threads)
    quiet_lightning()
    start = time.time()
    run_demo([t for t in DEMO_TASKS if t.name in args.tasks], args.seeds, args.root, args.out, extra,
             args.max_samples, progress=not args.quiet, workers=args.workers, threads=args.threads)
    print(f"total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
