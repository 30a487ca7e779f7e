"""What the pruned circuits keep, node group by node group (issue 15): from the measurement cache
of a compare (``<root>/<task>/compare`` in the study), per variant, the mean ± std over seeds of the
nodes kept at each site (residual channels, heads, MLP neurons), for mean and zero ablation.

    python study/circuit_composition.py /work/study_root/modular_addition/compare [--runs ROOT/TASK]

A circuit_nodes record holds its kept node indices per site (evaluation.metrics.circuit.CircuitResult).
With ``--runs`` (the directory holding ``<variant>/seed<k>/``), an entry whose run was retrained
since it was measured (a different checkpoint digest) is left out and named; without it, every
cached entry is read as it is. Nothing is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

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


def composition(compare_dir: Path, runs: Path | None = None) -> tuple[dict, list[str]]:
    """({ablation: {variant: {"sites": {site: [kept per seed]}, "total": [...], "of": nodes}}}, skipped
    entries), the ablation as each record states it; a run measured with ``--circuit-ablation zero``
    and ``--circuit-zero`` (the same search twice) counts once."""
    out: dict[str, dict] = {"mean": {}, "zero": {}}
    skipped = []
    for path in sorted(Path(compare_dir, "cache").glob("*/*.json")):
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
            row = out[ablation].setdefault(path.parent.name, {"sites": {}, "total": [], "of": circuit["nodes_total"]})
            for site, kept in circuit["kept"].items():
                row["sites"].setdefault(site, []).append(len(kept))
            row["total"].append(circuit["nodes_kept"])
    return out, skipped


def _cell(values: list[int]) -> str:
    return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")


def render(table: dict) -> str:
    lines = []
    for ablation, variants in table.items():
        if not variants:
            continue
        sites = sorted({s for row in variants.values() for s in row["sites"]}, key=site_order)
        lines += [f"Circuit nodes kept per site, {ablation} ablation (mean ± std over seeds):", "",
                  "| variant | n | " + " | ".join(short_site(s) for s in sites) + " | all |",
                  "|---" * (len(sites) + 3) + "|"]
        for variant, row in variants.items():
            lines.append(f"| `{variant}` | {len(row['total'])} | "
                         + " | ".join(_cell(row["sites"].get(s, [0])) for s in sites)
                         + f" | {_cell(row['total'])} of {row['of']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare_dir", help="a compare output directory (holding cache/)")
    parser.add_argument("--runs", default=None, help="the directory holding <variant>/seed<k>/ (checks the entries)")
    args = parser.parse_args(argv)
    if not Path(args.compare_dir, "cache").is_dir():
        raise SystemExit(f"circuit_composition: {args.compare_dir!r} has no cache/ directory (a compare output "
                         "directory is expected, e.g. <root>/<task>/compare)")
    table, skipped = composition(Path(args.compare_dir), None if args.runs is None else Path(args.runs))
    if not any(table.values()):
        raise SystemExit(f"circuit_composition: no circuit measured in {args.compare_dir!r} (compare --circuit)")
    print(render(table))
    for s in skipped:
        print(f"left out: {s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
