"""Time of the circuit-pruning search (evaluation.metrics.circuit.prune_circuit) on trained
modular-addition models, with the circuit it finds.

Prunes each given run (a run directory of ``interp-train fit``, e.g. the CPU recipe
``recipes/modular_addition/cpu.yaml`` and its ``cpu_weight_sparsity.yaml`` variant) on
``--samples`` held-out examples (seeded subset), nodes = residual channels at resid_pre,
resid_mid and the final resid_post, the 4 attention heads and the MLP neurons (452 for the CPU
recipe). Reports the gradient search and the greedy refinement separately; one thread, process
CPU time and wall time.

    python benchmarks/circuit_pruning.py RUN_DIR [RUN_DIR ...] [--ablation mean zero] [--samples 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from evaluation.metrics.circuit import CircuitConfig, prune_circuit
from interp_train.recipes import load_recipe


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (or checkpoints) of trained modular-addition models")
    parser.add_argument("--ablation", nargs="+", default=["mean", "zero"], choices=["mean", "zero"])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--steps", type=int, default=CircuitConfig.steps)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); delta {CircuitConfig.delta}, "
          f"{args.steps} search steps, {args.samples} held-out examples\n")
    print("| run | ablation | nodes kept / total | edges kept / total | loss (full) | search CPU s | "
          "search + refine CPU s | wall s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for run in args.runs:
        module, data = load_recipe(run)
        data.setup("fit")
        x, y = data.splits["test"].tensors
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: args.samples]
        for ablation in args.ablation:
            times = {}
            for refine in (False, True):
                cpu, wall = time.process_time(), time.perf_counter()
                result = prune_circuit(module, x[idx], y[idx], CircuitConfig(ablation=ablation, steps=args.steps,
                                                                             refine=refine))
                times[refine] = (time.process_time() - cpu, time.perf_counter() - wall)
            print(f"| {run} | {ablation} | {result.nodes_kept} / {result.nodes_total} | {result.edges} / "
                  f"{result.edges_total} | {result.loss:.4f} ({result.full_loss:.2e}) | {times[False][0]:.1f} | "
                  f"{times[True][0]:.1f} | {times[True][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
