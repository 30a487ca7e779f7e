"""The study: every CPU recipe, baseline vs each regularizer family, >= 3 seeds, measured by
``interp-eval compare`` (accuracy, LIB/PCA interaction sparsity, modularity, gradient
alignment, off/on robustness ratio, LLC where cheap).

    python study/run_study.py                       # everything (resumable)
    python study/run_study.py --tasks manifold digits --seeds 0 1 2

Runs go to ``<root>/<task>/<variant>/seed<k>/`` (default root checkpoints/study); a run whose
``metrics.json`` exists is skipped, and compare re-uses its per-checkpoint cache, so re-running
after an interruption only does the missing work. ``--restat`` only rebuilds the reports'
statistics from the per-seed values they hold (no checkpoints needed). Reports: ``<out>/<task>/report.md|json`` and
plots (default out study/results), and ``<out>/summary.md`` with one table per task.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Manifold data for the headline alignment measurement: a strongly bent manifold (scale 10)
# in d = 128, so that reading z linearly off the chart (z = Aᵀx, the easy solution) gives
# input gradients that are far from the tangent spaces (docs/DESIGN.md §3.8: nonlinear generator).
MANIFOLD_DATA = ["--data.init_args.ambient_dim", "128", "--data.init_args.scale", "10.0",
                 "--model.model.init_args.d_in", "128"]


@dataclass
class TaskPlan:
    """One recipe folder: which variants to train and how to measure them."""

    recipe: str
    baseline: str
    variants: list[str]
    extra: list[str] = field(default_factory=list)  # CLI overrides applied to every run
    llc: bool = False
    measure: dict = field(default_factory=dict)  # MeasureOptions overrides for this task


PLANS: dict[str, TaskPlan] = {
    "digits": TaskPlan("recipes/digits", "baseline",
                       ["baseline", "grad_norm", "off_manifold", "degeneracy", "interaction", "connection_cost"],
                       llc=True),
    "manifold": TaskPlan("recipes/manifold", "baseline",
                         ["baseline", "grad_norm", "off_manifold_grad", "off_manifold_grad_strong",
                          "off_manifold_noise", "adversarial", "degeneracy"],
                         extra=MANIFOLD_DATA, llc=True),
    "modular_addition": TaskPlan("recipes/modular_addition", "cpu",
                                 ["cpu", "cpu_interaction_strong", "cpu_degeneracy"],
                                 extra=["--trainer.max_steps", "1000"], llc=True),
    "text": TaskPlan("recipes/text", "baseline", ["baseline", "grad_norm", "degeneracy"],
                     extra=["--trainer.max_steps", "300", "--trainer.val_check_interval", "100"],
                     # 64 positions: exact LIB needs 64·k VJPs per attention section and window
                     measure=dict(max_samples=64, lib_sources=8, lib_edge_sources=1,
                                  lib_jacobian_dtype="float32")),
}


def run_dir(root: Path, task: str, variant: str, seed: int) -> Path:
    return root / task / variant / f"seed{seed}"


def fit_args(plan: TaskPlan, variant: str, seed: int, directory: Path, extra: list[str] = ()) -> list[str]:
    """``interp-train fit`` arguments of one run (progress bar and model summary off)."""
    return ["fit", "--config", str(ROOT / plan.recipe / f"{variant}.yaml"), "--seed_everything", str(seed),
            "--run_dir", str(directory), *plan.extra, *extra,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def train(plan: TaskPlan, task: str, seeds: list[int], root: Path, extra: list[str] = (), log=print) -> None:
    """Trains every missing (variant, seed) in this process; a run counts as done when its
    metrics.json exists (written atomically at the end of fit)."""
    from interp_train.cli import InterpTrainCLI

    jobs = [(v, s) for v in plan.variants for s in seeds]
    for i, (variant, seed) in enumerate(jobs, 1):
        directory = run_dir(root, task, variant, seed)
        if (directory / "metrics.json").is_file():
            log(f"[{task} {i}/{len(jobs)}] {variant} seed{seed}: done already")
            continue
        start = time.time()
        InterpTrainCLI(args=fit_args(plan, variant, seed, directory, list(extra)))
        log(f"[{task} {i}/{len(jobs)}] {variant} seed{seed}: trained in {time.time() - start:.0f} s")


def compare(plan: TaskPlan, task: str, seeds: list[int], root: Path, out: Path, llc: bool | None = None,
            max_samples: int = 512, progress: bool = True):
    """``interp-eval compare`` on the planned runs (cached in out/<task>/cache)."""
    from evaluation.compare import MeasureOptions, run_compare, runs_from_paths

    variants = {v: runs_from_paths(v, [run_dir(root, task, v, s) for s in seeds]) for v in plan.variants}
    options = MeasureOptions(**{"max_samples": max_samples, "llc": plan.llc if llc is None else llc,
                                **plan.measure})
    return run_compare(variants, out / task, options, baseline=plan.baseline, progress=progress)


def measurements_from_report(report: dict) -> dict[str, list[dict]]:
    """The per-run values a report.json holds, in the shape ``build_report`` reads (details: the task only)."""
    out = {}
    for variant, row in report["variants"].items():
        out[variant] = [{"seed": seed, "run_dir": run, "notes": row.get("notes", []), "details": {"task": report["task"]},
                         "metrics": {m: stats["values"][i] for m, stats in row["metrics"].items()}}
                        for i, (seed, run) in enumerate(zip(row["seeds"], row["runs"]))]
    return out


def restat(out: Path, figures: Path | None, log=print) -> None:
    """Rebuilds every ``out/<task>/report.{json,md}`` from the per-seed values it already holds, with the
    current statistics (tests, multiple-comparison correction); no checkpoint is read. Re-draws
    ``figures/<task>_metrics.png`` (its ✓/✗ marks) when ``figures`` is given."""
    import json

    from evaluation.compare import plots as compare_plots
    from evaluation.compare.report import build_report, render_markdown
    from interp_train.io import write_atomic, write_json_atomic

    for task in PLANS:
        path = out / task / "report.json"
        if not path.is_file():
            continue
        old = json.loads(path.read_text())
        generated = ("has 1 seed; no significance test",)  # build_report adds these again
        messages = [m for m in old["messages"] if not any(g in m for g in generated)]
        report = build_report(measurements_from_report(old), old["baseline"], old["test"], old["alpha"],
                              old["options"], messages)
        if figures is not None:
            compare_plots.plot_metric_bars(report, figures / f"{task}_metrics.png")
        old_md = (out / task / "report.md").read_text() if (out / task / "report.md").is_file() else ""
        plots = [p for p in ("metrics.png", "alignment_hist.png", "edge_curves.png") if f"`{p}`" in old_md]
        write_json_atomic(path, report)
        write_atomic(out / task / "report.md", render_markdown(report, plots))
        log(f"[{task}] statistics rebuilt: {report['n_comparisons']} comparisons, {report['correction']} correction")


def summary_table(report: dict, metrics: list[str] | None = None) -> str:
    """Markdown table: per variant and metric "mean ± std", and for variants "Δ (p)" vs baseline,
    p corrected for the report's number of comparisons (raw p beside) and ✓/✗ on the corrected p."""
    names = [m["name"] for m in report["metrics"] if metrics is None or m["name"] in metrics]
    labels = {m["name"]: m["label"] + (" ↑" if m["higher_is_better"] else " ↓") for m in report["metrics"]}
    fmt = lambda x, d=3: "–" if x is None else f"{x:.{d}g}"  # noqa: E731
    lines = ["| variant | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---|" * len(names)]
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
        lines.append(f"| `{variant}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", default="checkpoints/study", help="run directories go here")
    parser.add_argument("--out", default="study/results", help="compare reports go here")
    parser.add_argument("--figures", default="study/figures", help="copies of the key plots, <task>_<plot>.png")
    parser.add_argument("--no-llc", dest="llc", action="store_false", default=None, help="skip the LLC everywhere")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--restat", action="store_true",
                        help="only rebuild the reports' statistics from the values in <out>/<task>/report.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    root, out = Path(args.root), Path(args.out)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.restat:
        restat(out, Path(args.figures), log=log)
    for task in ([] if args.restat else args.tasks):
        plan = PLANS[task]
        start = time.time()
        train(plan, task, args.seeds, root, log=log)
        log(f"[{task}] training finished after {time.time() - start:.0f} s")
        if args.train_only:
            continue
        start = time.time()
        result = compare(plan, task, args.seeds, root, out, llc=args.llc, progress=False)
        log(f"[{task}] compare finished after {time.time() - start:.0f} s: {out / task / 'report.md'}")
        log(summary_table(result.report))
        figures = Path(args.figures)
        figures.mkdir(parents=True, exist_ok=True)
        for name in result.files:
            if name.endswith(".png"):
                shutil.copyfile(out / task / name, figures / f"{task}_{name}")
    reports = [(t, out / t / "report.json") for t in PLANS if (out / t / "report.json").is_file()]
    if reports:
        import json

        text = ["# Study summary (generated by study/run_study.py)", "",
                "Δ = variant − baseline; p: Welch t-test over seeds, Holm-adjusted over each report's comparisons "
                "(raw p beside); ✓/✗: significant after the correction, in / against the interpretable direction.", ""]
        for task, path in reports:
            text += [f"## {task}", "", summary_table(json.loads(path.read_text())), ""]
        (out / "summary.md").write_text("\n".join(text))
        log(f"wrote {out / 'summary.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
