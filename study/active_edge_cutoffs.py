"""How the active-edge sparsity depends on its cut-off (docs/DESIGN.md §5.1): the compare metric
counts the edges between each layer's features for 99 % of its ΣΛ; this refits LIB on each run as
the study's plan measures it and reports the LIB and PCA active fractions and their ratio at several
cut-offs, each variant against the baseline (Welch's t-test, raw p: an exploration beside the
reports, not part of their family of comparisons).

    python study/active_edge_cutoffs.py ROOT/text_3000 --variants baseline weight_sparsity_d0.25_x1 \\
        [--task text_3000] [--cutoffs 0.9 0.99 0.999] [--seeds 0 1 2 3 4]

``ROOT/<task dir>/<variant>/seed<k>/`` are the runs (as ``run_study.py`` lays them out); the first
variant is the baseline. One JSON line per run, then a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cutoff_fractions(fit, cutoffs: Sequence[float]) -> dict[str, float]:
    """{"lib@c", "pca@c"}: ∑_l n90_active_l / ∑_l N_active_l of a LIB fit with the active features
    of each layer those for a fraction c of its ΣΛ (variance for PCA), per cut-off c."""
    from evaluation.metrics.lib_summary import active_edges

    out = {}
    for cutoff in cutoffs:
        for side, per_layer in active_edges(fit, cutoff).items():
            if len(per_layer) != len(fit.node_layers) - 1:
                raise ValueError(f"the {side} edges of sections {sorted(per_layer)} only match their bases; "
                                 f"node layers: {list(fit.node_layers)}")
            stats = per_layer.values()
            out[f"{side}@{cutoff:g}"] = sum(s["edges_90"] for s in stats) / sum(s["n_edges"] for s in stats)
    return out


def table(rows: list[dict], cutoffs: Sequence[float], baseline: str) -> str:
    """Markdown: per cut-off and variant, mean LIB / PCA active fractions and their per-run ratio,
    with Welch's p against the baseline for the LIB fraction and the ratio."""
    from scipy import stats as scipy_stats

    by: dict[str, list[dict]] = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(row)
    lines = ["| cut-off | variant | seeds | LIB active | PCA active | LIB / PCA | p (LIB) | p (ratio) |",
             "|---|---|---|---|---|---|---|---|"]
    for cutoff in cutoffs:
        key = f"{cutoff:g}"
        ratio = {v: [r[f"lib@{key}"] / r[f"pca@{key}"] for r in rs] for v, rs in by.items()}
        lib = {v: [r[f"lib@{key}"] for r in rs] for v, rs in by.items()}
        for variant, rs in by.items():
            p_lib = p_ratio = "–"
            if variant != baseline and len(rs) > 1 and len(by[baseline]) > 1:
                p_lib = f"{scipy_stats.ttest_ind(lib[baseline], lib[variant], equal_var=False).pvalue:.2g}"
                p_ratio = f"{scipy_stats.ttest_ind(ratio[baseline], ratio[variant], equal_var=False).pvalue:.2g}"
            lines.append(f"| {key} | `{variant}` | {len(rs)} | {statistics.mean(lib[variant]):.3f} | "
                         f"{statistics.mean(r[f'pca@{key}'] for r in rs):.3f} | "
                         f"{statistics.mean(ratio[variant]):.3f} | {p_lib} | {p_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_dir", type=Path, help="ROOT/<task>: holds <variant>/seed<k>/")
    parser.add_argument("--variants", nargs="+", required=True, help="the first is the baseline")
    parser.add_argument("--task", default="text_3000", help="the study plan whose measurement options to use")
    parser.add_argument("--cutoffs", nargs="+", type=float, default=[0.9, 0.99, 0.999])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    bad = [c for c in args.cutoffs if not 0 < c <= 1]
    if bad:
        raise SystemExit(f"active_edge_cutoffs: --cutoffs {bad}: each must be in (0, 1]")
    import torch

    from evaluation.compare import runs_from_paths
    from evaluation.compare.context import RunContext
    from study.plans import PLANS
    from study.run_study import measure_options

    if args.task not in PLANS:
        raise SystemExit(f"active_edge_cutoffs: --task {args.task!r}: not a study task; tasks: {', '.join(PLANS)}")
    torch.set_num_threads(args.threads)
    options = measure_options(PLANS[args.task])
    rows = []
    for variant in args.variants:
        for seed in args.seeds:
            directory = args.task_dir / variant / f"seed{seed}"
            if not directory.is_dir():
                raise SystemExit(f"active_edge_cutoffs: no run at {directory}")
            run = runs_from_paths(variant, [directory])[0]
            rows.append({"variant": variant, "seed": seed,
                         **cutoff_fractions(RunContext(run, options).lib, args.cutoffs)})
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows, args.cutoffs, args.variants[0]))


if __name__ == "__main__":
    main()
