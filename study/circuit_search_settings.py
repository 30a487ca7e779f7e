"""How much a circuit's size depends on the Lagrangian search's settings.

    python study/circuit_search_settings.py TASK_DIR --cells baseline weight_sparsity_d0.1_x1 --out rows.jsonl

For each run ``TASK_DIR/<cell>/seed<k>`` (recipe runs, as ``interp-eval compare`` finds them), prunes
the circuit on compare's evaluation subset (``MeasureOptions`` defaults: 512 seeded test examples)
once per setting in SETTINGS, each a change to ``CircuitConfig(search="lagrangian")``'s defaults,
and appends one JSON line per search (nodes, edges, loss, target, CPU seconds). Runs already in
``--out`` are not searched again. Every result meets the loss bound, so the smallest circuit of a run
over all settings is still an upper bound on its smallest circuit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SETTINGS = ({"lr": 0.02}, {"lr": 0.2}, {"dual_lr": 0.03}, {"dual_lr": 0.3}, {"steps": 1000}, {"init_logit": 3.0})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task_dir", type=Path, help="a task directory of recipe runs <cell>/seed<k>/")
    parser.add_argument("--cells", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per search")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    from evaluation.compare import MeasureOptions, discover_runs
    from evaluation.compare.context import RunContext
    from evaluation.metrics.circuit import CircuitConfig, prune_circuit

    torch.set_num_threads(args.threads)
    runs = discover_runs(args.task_dir)
    unknown = [c for c in args.cells if c not in runs]
    if unknown:
        raise SystemExit(f"no runs of cell(s) {unknown} in {args.task_dir}; found: {', '.join(sorted(runs))}")
    done = set()
    if args.out.is_file():
        done = {(r["cell"], r["seed"], json.dumps(r["settings"], sort_keys=True))
                for r in map(json.loads, filter(None, args.out.read_text().splitlines()))}
    for cell in args.cells:
        for run in runs[cell]:
            todo = [s for s in SETTINGS if (cell, run.seed, json.dumps(s, sort_keys=True)) not in done]
            if not todo:
                continue
            ctx = RunContext(run, MeasureOptions(alignment=False))
            inputs, targets = ctx.eval_set[0], ctx.eval_set[1]
            for settings in todo:
                start = time.process_time()
                result = prune_circuit(ctx.module, inputs, targets, CircuitConfig(search="lagrangian", **settings))
                row = {"cell": cell, "seed": run.seed, "settings": settings, "nodes": result.nodes_kept,
                       "edges": result.edges, "loss": result.loss, "target": result.target_loss,
                       "cpu_s": round(time.process_time() - start, 2)}
                print(json.dumps(row), flush=True)
                with args.out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
