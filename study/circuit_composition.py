"""What the pruned circuits keep, node group by node group (issue 15): from the measurement cache
of a compare (``<root>/<task>/compare`` in the study), per variant, the mean ± std over seeds of the
nodes kept at each site (residual channels, heads, MLP neurons), for mean and zero ablation.

    python study/circuit_composition.py /work/study_root/modular_addition/compare [--runs ROOT/TASK]
    python study/circuit_composition.py NARROW_OUT WIDE_OUT --reference baseline

A circuit_nodes record holds its kept node indices per site (evaluation.metrics.circuit.CircuitResult).
With ``--runs`` (the directory holding ``<variant>/seed<k>/``), an entry whose run was retrained
since it was measured (a different checkpoint digest) is left out and named; without it, every
cached entry is read as it is. Nothing is measured.

Several compare directories are read as one table: that is how circuits of models of different
widths are set side by side (``interp-eval compare`` refuses to mix architectures in one report,
rightly for its other metrics; a circuit's size in nodes is what Gao et al. compare across widths).
``--reference VARIANT`` adds each variant's total against that variant's: the ratio of means, the
Welch p-value and its Holm adjustment over every comparison of the table, next to the accuracy.
Circuits found by different searches are not compared (an error names them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (metric, its details key, its ablation where the record does not state one): circuit_nodes searches
# with compare's --circuit-ablation (mean by default), circuit_nodes_zero with zero ablation
# (evaluation/compare/metrics/_circuit.py)
RECORDS = (("circuit_nodes", "circuit", "mean"), ("circuit_nodes_zero", "circuit_zero", "zero"))


def short_site(site: str) -> str:
    """blocks.0.mlp.hook_post -> 0.neurons; blocks.0.attn.hook_z -> 0.heads; blocks.0.hook_resid_mid -> 0.resid_mid."""
    parts = site.split(".")
    if parts[0] != "blocks" or len(parts) < 3:
        return site
    kind = {"hook_post": "neurons", "hook_z": "heads"}.get(parts[-1], parts[-1].removeprefix("hook_"))
    return f"{parts[1]}.{kind}"


_ORDER = {"hook_resid_pre": 0, "hook_z": 1, "hook_resid_mid": 2, "hook_post": 3, "hook_resid_post": 4}


def site_order(site: str) -> tuple:
    """Forward order for TransformerLens sites (block, then resid_pre, heads, resid_mid, neurons,
    resid_post); other sites after them, by name."""
    parts = site.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[1].isdigit() and parts[-1] in _ORDER:
        return (0, int(parts[1]), _ORDER[parts[-1]], "")
    return (1, 0, 0, site)


def _current(entry_path: Path, runs: Path | None) -> bool:
    if runs is None:
        return True
    from evaluation.compare import cache
    from evaluation.compare.runs import runs_from_paths

    run_dir = runs / entry_path.parent.name / entry_path.stem
    if not run_dir.is_dir():
        return False
    try:
        run = runs_from_paths(entry_path.parent.name, [run_dir])[0]
    except (OSError, ValueError):  # not a run directory (no config.yaml / checkpoint)
        return False
    return cache.read_entry(entry_path, cache.run_digest(run.checkpoint, run.config)) is not None


def _entries(compare_dirs: Sequence[Path]) -> list[Path]:
    """Every cache entry of the directories; a variant cached in two of them raises (which one is meant is unknown)."""
    owner: dict[str, Path] = {}
    paths = []
    for compare_dir in compare_dirs:
        for path in sorted(Path(compare_dir, "cache").glob("*/*.json")):
            variant = path.parent.name
            if owner.setdefault(variant, Path(compare_dir)) != Path(compare_dir):
                raise ValueError(f"variant {variant!r} is cached in both {str(owner[variant])!r} and "
                                 f"{str(compare_dir)!r}; give each variant from one compare directory")
            paths.append(path)
    return paths


def composition(compare_dirs: Path | Sequence[Path], runs: Path | None = None) -> tuple[dict, list[str]]:
    """({ablation: {variant: {"sites": {site: [kept per seed]}, "total": [...], "of": nodes, "search": name,
    "accuracy": [...]}}}, skipped entries), the ablation as each record states it; a run measured with
    ``--circuit-ablation zero`` and ``--circuit-zero`` (the same search twice) counts once. ``runs``
    checks the entries of one compare directory only."""
    dirs = [Path(compare_dirs)] if isinstance(compare_dirs, (str, Path)) else [Path(d) for d in compare_dirs]
    if runs is not None and len(dirs) != 1:
        raise ValueError(f"--runs checks the entries of one compare directory, not {len(dirs)}")
    out: dict[str, dict] = {"mean": {}, "zero": {}}
    skipped = []
    for path in _entries(dirs):
        try:
            measured = json.loads(path.read_text()).get("measured", {})
        except (OSError, json.JSONDecodeError):
            skipped.append(f"{path} (unreadable)")
            continue
        if not _current(path, runs):
            skipped.append(f"{path.parent.name}/{path.stem} (retrained or gone since measured)")
            continue
        counted = set()
        for metric, detail, default in RECORDS:
            circuit = (measured.get(metric, {}).get("details") or {}).get(detail)
            if not circuit or "kept" not in circuit:
                continue
            ablation = circuit.get("ablation", default)
            if ablation in counted:
                continue
            counted.add(ablation)
            row = out[ablation].setdefault(path.parent.name, {"sites": {}, "total": [], "of": circuit["nodes_total"],
                                                               "accuracy": []})
            search = circuit.get("search", "penalty")  # records older than the option are the default's
            if row.setdefault("search", search) != search:
                raise ValueError(f"{path.parent.name}: circuits of both the {row['search']!r} and the {search!r} "
                                 "search; compare circuits found by one search")
            for site, kept in circuit["kept"].items():
                row["sites"].setdefault(site, []).append(len(kept))
            row["total"].append(circuit["nodes_kept"])
            accuracy = measured.get("accuracy", {}).get("value")
            if accuracy is not None:
                row["accuracy"].append(accuracy)
    searches = {row["search"] for variants in out.values() for row in variants.values()}
    if len(searches) > 1:
        raise ValueError(f"the circuits were found by different searches ({', '.join(sorted(searches))}); "
                         "compare circuits found by one search")
    return out, skipped


def against_reference(table: dict, reference: str) -> dict:
    """{(ablation, variant): compare_groups result} of each variant's total nodes against
    ``reference``'s (lower is better), Holm-adjusted over all of them."""
    from evaluation.compare.stats import apply_correction, compare_groups

    if not any(reference in variants for variants in table.values()):
        known = sorted({v for variants in table.values() for v in variants})
        raise ValueError(f"--reference {reference!r}: no circuit of that variant; the table has {', '.join(known)}")
    tests = {(ablation, variant): compare_groups(variants[reference]["total"], row["total"], higher_is_better=False)
             for ablation, variants in table.items() if reference in variants
             for variant, row in variants.items() if variant != reference}
    apply_correction(list(tests.values()), "holm")
    return tests


def _cell(values: list[int]) -> str:
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def _versus(test: dict | None) -> str:
    if test is None:
        return "reference"
    if test.get("p") is None:
        return "not tested"
    ratio = test["mean_baseline"] / test["mean_variant"] if test["mean_variant"] else math.inf
    size = f"{ratio:.2f}× fewer" if ratio >= 1 else f"{1 / ratio:.2f}× more"
    return f"{size}, p = {test['p']:.2g}, Holm {test['p_adjusted']:.2g}"


def render(table: dict, tests: dict | None = None) -> str:
    lines = []
    for ablation, variants in table.items():
        if not variants:
            continue
        sites = sorted({s for row in variants.values() for s in row["sites"]}, key=site_order)
        search = next(iter(variants.values()))["search"]
        extra = " | accuracy | vs reference" if tests is not None else ""
        lines += [f"Circuit nodes kept per site, {ablation} ablation, {search} search (mean ± std over seeds):", "",
                  "| variant | n | " + " | ".join(short_site(s) for s in sites) + f" | all{extra} |",
                  "|---" * (len(sites) + 3 + (2 if tests is not None else 0)) + "|"]
        for variant, row in variants.items():
            line = (f"| `{variant}` | {len(row['total'])} | " + " | ".join(_cell(row["sites"].get(s, [0])) for s in sites)
                    + f" | {_cell(row['total'])} of {row['of']}")
            if tests is not None:
                accuracy = _cell([100 * a for a in row["accuracy"]]) + " %" if row["accuracy"] else "—"
                line += f" | {accuracy} | {_versus(tests.get((ablation, variant)))}"
            lines.append(line + " |")
        lines.append("")
    if tests:
        lines.append(f"Welch's t-test on the total against the reference; Holm over {len(tests)} comparisons.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dirs", nargs="+", metavar="compare_dir",
                        help="compare output directories (holding cache/), read as one table")
    parser.add_argument("--runs", default=None, help="the directory holding <variant>/seed<k>/ (checks the entries; "
                        "one compare directory only)")
    parser.add_argument("--reference", default=None, metavar="VARIANT",
                        help="test every variant's total nodes against this one's (Welch, Holm)")
    args = parser.parse_args(argv)
    for compare_dir in args.compare_dirs:
        if not Path(compare_dir, "cache").is_dir():
            raise SystemExit(f"circuit_composition: {compare_dir!r} has no cache/ directory (a compare output "
                             "directory is expected, e.g. <root>/<task>/compare)")
    try:
        table, skipped = composition([Path(d) for d in args.compare_dirs], None if args.runs is None else Path(args.runs))
        if not any(table.values()):
            raise SystemExit(f"circuit_composition: no circuit measured in {', '.join(args.compare_dirs)} "
                             "(compare --circuit)")
        tests = None if args.reference is None else against_reference(table, args.reference)
    except ValueError as err:
        raise SystemExit(f"circuit_composition: {err}") from None
    print(render(table, tests))
    for s in skipped:
        print(f"left out: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
