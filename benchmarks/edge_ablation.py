"""Time of edge-ablation sparsity (evaluation.metrics.edge_ablation) on trained modular-addition
models, with the figures it finds, in the LIB, PCA and neuron bases, mean and zero ablation.

    python benchmarks/edge_ablation.py [RUN_DIR ...] [--rib-ref DIR] [--fit-samples 512]
        [--samples 512] [--bases lib pca neuron] [--ablation mean zero] [--tolerance 0.001] [--threads 1]
        [--pass-timing] [--lib-sources K] [--fit-batch 256]

RUN_DIR: an ``interp-train fit`` run directory (e.g. of ``recipes/modular_addition/cpu.yaml``):
LIB is fitted on ``--fit-samples`` training examples and ablation is measured on ``--samples``
held-out examples (seeded subsets), node layers as ``interp-eval compare`` picks them (resid_pre,
then resid_mid, resid_post and the logits at the last position). ``--rib-ref DIR``: rib's published
p = 113 checkpoint (its README), fitted and measured on seeded subsets of all 113² pairs. Prints, per
basis and ablation: n*/N per section, the total and its fraction, the accuracy kept, the number of
accuracy evaluations, CPU and wall seconds (the fit, and the neuron basis's edge pass, timed
apart; it includes the neuron basis's edges), with the load average (timings on a shared machine are inflated).

``--pass-timing`` times one ablated forward pass per section instead (``ablated_logits``, half of
the section's edges kept, so every output feature has its own pass) with the batch repeated from
the section's input layer on (what edge ablation does once its check passes) against the batch
stacked from the model's input, and prints the ratio; the search itself costs about ⌈log₂ N⌉ + 1
such passes per section. Any recipe run works here (e.g. the byte LM of ``recipes/text``: every
position is a node; ``--lib-sources K`` fits with K Rademacher probes and float32 Jacobians, as
``interp-eval compare`` does for it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RIB_CONFIG = {"n_layers": 1, "d_model": 128, "n_heads": 4, "d_head": 32, "d_mlp": 512, "d_vocab": 114,
              "d_vocab_out": 114, "n_ctx": 3, "act_fn": "relu", "normalization_type": None}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def seeded(tensors, n, seed=0):
    idx = torch.randperm(tensors[0].shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return tuple(t[idx] for t in tensors)


def recipe_run(path: str, fit_samples: int, samples: int):
    from evaluation.compare.context import default_node_layers
    from evaluation.lib.positions import loss_reads_last_position
    from interp_train.recipes import load_recipe

    module, data = load_recipe(path)
    data.setup("fit")
    train, test = data.splits["train"].tensors, data.splits["test"].tensors
    layers = default_node_layers(module, last_position=loss_reads_last_position(train[1]))
    return module.eval(), seeded(train, fit_samples), seeded(test, samples), layers


def rib_reference(ref: Path, fit_samples: int, samples: int):
    from evaluation.lib_command import modular_addition_data
    from evaluation.io.checkpoints import load_checkpoint
    from evaluation.lib.positions import residual_layers

    model = load_checkpoint(ref / "model_epoch_60000.pt", config=RIB_CONFIG).model.eval()
    pairs = modular_addition_data(113)
    return model, seeded(pairs, fit_samples), seeded(pairs, samples, seed=1), residual_layers(1, last_position=True)


def clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def pass_timing(model, test, layers, result, args) -> None:
    """Seconds of one ``ablated_logits`` call per section and basis, batch repeated vs stacked."""
    from evaluation.metrics.edge_ablation import ablated_logits, basis_set, keep_mask, repeat_site

    print("| basis | section | output features | stacked CPU s | repeated CPU s | ratio | max |Δ logits| |")
    print("|---|---|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for basis in args.bases:
        bases, edges = basis_set(result, basis)
        for l_in, l_out in zip(layers[:-1], layers[1:]):
            E = edges[l_in]
            keep = keep_mask(E, (E.shape[0] - 1) * (E.shape[1] - 1) // 2)
            seconds, logits = [], []
            with torch.no_grad():
                ablated_logits(model, test[0], l_in, l_out, bases[l_in], bases[l_out], keep)  # the one-time check
                site = repeat_site(model, l_in, l_out)
                for stacked in (True, False):
                    c0, _ = clock()
                    logits.append(ablated_logits(model, test[0], l_in, l_out, bases[l_in], bases[l_out], keep,
                                                 stacked=stacked))
                    seconds.append(clock()[0] - c0)
            totals = [t + s for t, s in zip(totals, seconds)]
            delta = float((logits[0] - logits[1]).abs().max())
            print(f"| {basis} | {l_in} → {l_out} | {E.shape[0] - 1} | {seconds[0]:.2f} | {seconds[1]:.2f} "
                  f"({site or 'not repeated'}) | {seconds[0] / seconds[1]:.2f} | {delta:.1e} |", flush=True)
    print(f"all sections and bases: stacked {totals[0]:.1f} s, repeated {totals[1]:.1f} s CPU, "
          f"ratio {totals[0] / totals[1]:.2f}; load {load_average()}")


def measure(name, model, fit, test, layers, args) -> None:
    from evaluation.lib.fit import LIBConfig, fit_lib
    from evaluation.metrics.edge_ablation import EdgeAblationConfig, basis_set, edge_ablation

    batch = args.fit_batch
    fit_batches = [tuple(t[i:i + batch] for t in fit) for i in range(0, fit[0].shape[0], batch)]
    config = LIBConfig() if args.lib_sources is None else LIBConfig(
        stochastic_sources=args.lib_sources, stochastic_over="positions_and_hidden", edge_sources=1,
        jacobian_dtype="float32")
    c0, w0 = clock()
    result = fit_lib(model, fit_batches, layers, config, progress=False)
    c1, w1 = clock()
    print(f"\n{name}: {sum(p.numel() for p in model.parameters())} parameters, fit {fit[0].shape[0]} examples, "
          f"ablation on {test[0].shape[0]}; fit_lib CPU {c1 - c0:.1f} s, wall {w1 - w0:.1f} s; load {load_average()}")
    if args.pass_timing:
        pass_timing(model, test, layers, result, args)
        return
    print("| basis | ablation | n*/N per section | total n*/N | fraction | accuracy (full) | evaluations | "
          "CPU s | wall s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for basis in args.bases:
        bases, edges = basis_set(result, basis)
        for ablation in args.ablation:
            c0, w0 = clock()
            out = edge_ablation(model, [test], layers, bases, edges,
                                EdgeAblationConfig(tolerance=args.tolerance, ablation=ablation), basis)
            c1, w1 = clock()
            per = ", ".join(f"{s.n_kept}/{s.n_edges}" for s in out.sections.values())
            evals = sum(len(s.probes) - 1 for s in out.sections.values())
            worst = min(s.accuracy for s in out.sections.values())
            print(f"| {basis} | {ablation} | {per} | {out.total_kept}/{out.total_edges} | {out.fraction:.4f} | "
                  f"{worst:.4f} ({out.accuracy:.4f}) | {evals} | {c1 - c0:.1f} | {w1 - w0:.1f} |", flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps({"model": name, **out.to_dict(), "cpu_s": c1 - c0, "wall_s": w1 - w0}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", help="interp-train run directories of modular-addition models")
    parser.add_argument("--rib-ref", type=Path, help="folder of rib's model_epoch_60000.pt (p = 113)")
    parser.add_argument("--fit-samples", type=int, default=512)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--bases", nargs="+", default=["lib", "pca", "neuron"], choices=["lib", "pca", "neuron"])
    parser.add_argument("--ablation", nargs="+", default=["mean", "zero"], choices=["mean", "zero"])
    parser.add_argument("--tolerance", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="append one JSON line per measurement to this file")
    parser.add_argument("--pass-timing", action="store_true",
                        help="time one ablated pass per section, batch repeated vs stacked, instead of the search")
    parser.add_argument("--fit-batch", type=int, default=256, help="examples per LIB fit batch")
    parser.add_argument("--lib-sources", type=int, help="fit LIB with this many Rademacher probes (large models)")
    args = parser.parse_args(argv)
    if not args.runs and args.rib_ref is None:
        parser.error("give a run directory or --rib-ref")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tolerance {args.tolerance}")
    for run in args.runs:
        measure(run, *recipe_run(run, args.fit_samples, args.samples), args)
    if args.rib_ref is not None:
        measure(f"rib p=113 ({args.rib_ref})", *rib_reference(args.rib_ref, args.fit_samples, args.samples), args)


if __name__ == "__main__":
    main()
