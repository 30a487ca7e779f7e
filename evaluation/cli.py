"""``interp-eval``: evaluation commands.

    interp-eval lib CHECKPOINT [--config HT_CONFIG.json] [--layers L ...] [--data SPEC]
                    [--truncation T] [--integration RULE] [--n-intervals N] [--max-samples N]
                    [--batch-size B] [--no-ablation] [--edge-ablation [--edge-ablation-tolerance T]
                    [--edge-ablation-mode mean|zero]] [--nproc N] --out DIR

    interp-eval compare [ROOT] [--variant NAME RUN [RUN ...]]... [--baseline NAME] [--test welch|permutation]
                        [--alpha A] [--correction holm|bonferroni|none] [--max-samples N] [--layers L ...]
                        [--tangents KIND] [--eps E ...] [--ratio-eps E] [--no-alignment] [--llc]
                        [--circuit [--circuit-search penalty|lagrangian] ...] [--edge-ablation [--edge-ablation-tolerance T] [--edge-ablation-mode M]] --out DIR

compare: ROOT is a task directory of recipe runs ``<variant>/seed<k>/`` (evaluation.compare);
--variant adds or names runs explicitly. DIR keeps a per-checkpoint cache, so a re-run only
measures new or changed checkpoints and metrics; report.md/report.json/plots are replaced.

CHECKPOINT: an interp-train run directory (``checkpoints/<task>/<variant>/seed<k>``, read through
its ``checkpoints/last.ckpt`` and ``config.yaml``), a HookedTransformer-format state dict (with --config, or with a stored config),
a TransformerBridge state dict, or an interp-train recipe's Lightning .ckpt (see
evaluation.io.checkpoints). SPEC: ``modular-addition:p=113`` (all p² inputs ``a b =`` with
target (a + b) mod p; ``=`` is token p) or a torch file holding ``{"inputs": X, "targets": y}``;
a recipe's own data module is used when --data is omitted.

lib --nproc N: fit on N processes of this machine; the command re-launches itself with
``python -m torch.distributed.run --standalone --nproc_per_node N`` (equivalently, start it yourself:
``torchrun --standalone --nproc_per_node N -m evaluation.cli lib ...``). Process r takes batches r, r + N, ...;
the sums of the fit are all-reduced (evaluation.lib.distributed); rank 0 alone runs the ablation
curves and writes the report.

Errors are one paragraph on stderr with exit code 2 (evaluation.errors); add ``--debug`` (or set
``INTERP_DEBUG=1``) for the full traceback. SIGTERM cleans up like Ctrl-C (no temporary folders left).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

# torch, TransformerLens and matplotlib are imported by the commands that need them, so that
# ``interp-eval --help`` and argument errors answer at once
from evaluation.compare.options import CIRCUIT_ABLATIONS, CIRCUIT_SEARCHES, EDGE_ABLATION_MODES
from evaluation.errors import run_command


def _run_lib(args) -> dict:
    from evaluation.lib_command import run_lib

    return run_lib(args)


def run_compare_command(args):
    from evaluation.startup import collector_paused

    with collector_paused():  # torch, Lightning, matplotlib, scipy: see evaluation.startup
        from evaluation.compare import MeasureOptions, discover_runs, run_compare, runs_from_paths

    if args.root is None and not args.variant:
        raise ValueError("give a task directory of runs (ROOT) or at least one --variant NAME RUN [RUN ...]")
    variants = dict(discover_runs(args.root)) if args.root is not None else {}
    for name, *paths in args.variant or []:
        if not paths:
            raise ValueError(f"--variant {name} lists no runs; use --variant NAME RUN [RUN ...]")
        variants[name] = runs_from_paths(name, paths)
    from evaluation.io.device import resolve_device

    device = resolve_device(args.device)  # ValueError for an absent device, before anything is written
    eps = tuple(args.eps)
    options = MeasureOptions(max_samples=args.max_samples, batch_size=args.batch_size,
                             node_layers=tuple(args.layers) if args.layers else None,
                             alignment=args.alignment, tangents=args.tangents, robustness_eps=eps,
                             ratio_eps=args.ratio_eps if args.ratio_eps is not None else eps[len(eps) // 2],
                             lib_sources=args.lib_sources, lib_edge_sources=args.lib_edge_sources,
                             lib_jacobian_dtype="float32" if args.lib_float32 else None,
                             circuit=args.circuit, circuit_delta=args.circuit_delta,
                             circuit_ablation=args.circuit_ablation, circuit_zero=args.circuit_zero,
                             circuit_search=args.circuit_search,
                             llc=args.llc, edge_ablation=args.edge_ablation,
                             edge_ablation_tolerance=args.edge_ablation_tolerance,
                             edge_ablation_mode=args.edge_ablation_mode, device=str(device),
                             **{k: v for k, v in (("llc_draws", args.llc_draws), ("llc_chains", args.llc_chains))
                                if v is not None})
    result = run_compare(variants, args.out, options, baseline=args.baseline, test=args.test, alpha=args.alpha,
                         progress=not args.quiet, correction=args.correction, metrics=args.metrics)
    if not args.quiet:
        from evaluation.compare.table import LEGEND, format_table

        for message in result.report["messages"]:
            print(f"note: {message}", file=sys.stderr)
        print(format_table(result.report))
        print(LEGEND)
    print(f"report: {result.out_dir / 'report.md'} (also {', '.join(f for f in result.files if f != 'report.md')})")
    return result


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the whole usage and exiting: main() reports the
    error in one paragraph like every other bad input."""

    def error(self, message: str):
        hint = f" (see `{self.prog} --help`)"
        raise argparse.ArgumentError(None, message if "--help`)" in message else message + hint)


HELP = argparse.ArgumentDefaultsHelpFormatter


def _add_edge_ablation_settings(parser) -> None:
    """--edge-ablation-tolerance and --edge-ablation-mode, shared by `lib` and `compare`."""
    parser.add_argument("--edge-ablation-tolerance", type=float, default=0.001,
                        help="edge ablation: allowed accuracy drop from the unablated model (default 0.001)")
    parser.add_argument("--edge-ablation-mode", choices=list(EDGE_ABLATION_MODES), default="mean",
                        help="edge ablation: ablated basis features take their mean (default) or zero")


def _add_compare_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="compare regularized variants with the baseline over seeds",
                         formatter_class=HELP)
    cmp.add_argument("root", nargs="?", help="task directory holding <variant>/seed<k>/ run directories")
    cmp.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "RUN"),
                     help="a variant and its run directories (repeatable)")
    cmp.add_argument("--out", required=True, help="output directory (its cache/ is reused on re-runs)")
    cmp.add_argument("--baseline", default="baseline", help="name of the standard-training variant")
    cmp.add_argument("--test", default="welch", choices=["welch", "permutation"])
    cmp.add_argument("--alpha", type=float, default=0.05)
    cmp.add_argument("--correction", default="holm", choices=["holm", "bonferroni", "none"],
                     help="multiple-comparison correction of the p-values over the report (default: holm)")
    cmp.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                     help="measure and report only these metrics (default: every metric the options turn on), "
                          "e.g. one added to the code since the runs were measured")
    cmp.add_argument("--max-samples", type=int, default=512, help="examples for LIB / alignment / robustness")
    cmp.add_argument("--batch-size", type=int, default=256)
    cmp.add_argument("--layers", nargs="+", help="LIB node layers, position index allowed: 'output[-1]' "
                     "(default: per architecture; for one target per sequence, the last position after "
                     "the last attention)")
    cmp.add_argument("--device", default="auto", help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")
    cmp.add_argument("--tangents", default="auto", choices=["auto", "exact", "local_pca", "global_pca"])
    cmp.add_argument("--eps", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="robustness radii")
    cmp.add_argument("--ratio-eps", type=float, help="radius of the reported off/on ratio (default: middle --eps)")
    cmp.add_argument("--no-alignment", dest="alignment", action="store_false",
                     help="skip gradient alignment and robustness")
    cmp.add_argument("--lib-sources", type=int, default=None,
                     help="Rademacher probes over positions and hidden units for LIB's Jacobian Gram (long sequences)")
    cmp.add_argument("--lib-edge-sources", type=int, default=None, help="Rademacher probes over positions for the edges")
    cmp.add_argument("--lib-float32", action="store_true", help="LIB Jacobian passes in float32 (sums stay float64)")
    cmp.add_argument("--llc", action="store_true", help="also estimate the LLC (SGLD; slow)")
    cmp.add_argument("--llc-draws", type=int, default=None, help="SGLD draws per chain (default: calibrated, 200)")
    cmp.add_argument("--llc-chains", type=int, default=None, help="SGLD chains (default: 4)")
    cmp.add_argument("--circuit", action="store_true",
                     help="also measure the pruned circuit's nodes and edges (a gradient search per run)")
    cmp.add_argument("--circuit-delta", type=float, default=0.01,
                     help="circuit: allowed loss increase over the full model, nats (default 0.01)")
    cmp.add_argument("--circuit-ablation", choices=list(CIRCUIT_ABLATIONS), default="mean",
                     help="circuit: pruned nodes take their mean activation (default) or zero")
    cmp.add_argument("--circuit-search", choices=list(CIRCUIT_SEARCHES), default="penalty",
                     help="circuit: the gate search; 'lagrangian' keeps the loss term on (dual ascent); on "
                          "transformers the default 'penalty' search's gates stay tied and its circuit is its "
                          "greedy pass's (the byte LM's: ~1.5x larger); neither is smaller on every model "
                          "(docs/DESIGN.md 6.2)")
    cmp.add_argument("--circuit-zero", action="store_true",
                     help="also the zero-ablation circuit (circuit_nodes_zero / circuit_edges_zero), a second search")
    cmp.add_argument("--edge-ablation", action="store_true",
                     help="also measure edge-ablation sparsity in the LIB, PCA and neuron bases (bisection per section)")
    _add_edge_ablation_settings(cmp)
    cmp.add_argument("--quiet", action="store_true", help="no progress bars or table; only the report path")
    cmp.set_defaults(func=run_compare_command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="interp-eval", description="Evaluate trained checkpoints. Add --debug (or set "
                     "INTERP_DEBUG=1) for full tracebacks instead of one-paragraph errors.")
    sub = parser.add_subparsers(dest="command", required=True)
    lib = sub.add_parser("lib", help="fit LIB and PCA bases, measure sparsity/modularity, write a report",
                         formatter_class=HELP)
    lib.add_argument("checkpoint", help="an interp-train run directory (checkpoints/<task>/<variant>/seed<k>), a "
                     "checkpoint file (.pt/.pth/.safetensors state dict or recipe .ckpt) or a local Hugging Face "
                     "model directory (config.json + weights)")
    lib.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    lib.add_argument("--config", help="JSON config of a HookedTransformer-format state dict")
    lib.add_argument("--layers", nargs="+", help="node layers in forward order; 'output' = the logits; "
                     "a position index picks one position, e.g. 'blocks.0.hook_resid_mid[-1]' 'output[-1]' "
                     "(default, as compare: recipe MLPs input, every hidden activation, output; transformers resid_pre, resid_mid/resid_post of each block, output; "
                     "when the targets are one per sequence, the layers after the last attention at [-1])")
    lib.add_argument("--device", default="auto", help="auto (a CUDA GPU when present), cpu, cuda or cuda:N")
    lib.add_argument("--dtype", choices=["float32", "float64"], help="run the model in this dtype "
                     "(default: the checkpoint's; float64 for exact comparisons with other implementations)")
    lib.add_argument("--data", help="'modular-addition:p=113' or a torch file {'inputs', 'targets'} "
                     "(default: the recipe's own training data)")
    lib.add_argument("--truncation", type=float, default=1e-12, help="relative eigenvalue cut-off")
    lib.add_argument("--integration", default="gradient", choices=["gradient", "trapezoid", "gauss-legendre"])
    lib.add_argument("--n-intervals", type=int, default=1)
    lib.add_argument("--max-samples", type=int, help="use a random subset (seed 0) of this many inputs (default: all)")
    lib.add_argument("--batch-size", type=int, default=512)
    lib.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip node-ablation curves")
    lib.add_argument("--no-neuron-edges", dest="neuron_edges", action="store_false",
                     help="skip the edges in the neuron (unrotated) basis: LIB and PCA edges only (the fit was 1.5-2x faster on the rib model)")
    lib.add_argument("--edge-ablation", action="store_true", help="also measure edge-ablation sparsity (LIB, PCA "
                     "and neuron bases, bisection per section, on the same data) into lib.json's metadata")
    _add_edge_ablation_settings(lib)
    lib.add_argument("--quiet", action="store_true", help="no progress bars; only the report path")
    lib.add_argument("--nproc", type=int, default=1,
                     help="fit on N local processes (re-launches itself with torch.distributed.run)")
    lib.set_defaults(func=_run_lib)
    _add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``interp-eval {lib,compare} ... [--debug]``; returns the exit code (2: bad input, reported in
    one paragraph on stderr; 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = _sigterm_as_interrupt()
    try:
        return run_command("interp-eval", _run, argv)
    finally:
        _end_process_group()
        from evaluation.startup import release, skip_exit_collection

        release()  # objects frozen by run_lib's collector_paused: collectable again in a long-lived process
        skip_exit_collection()  # a command line exits next: no collection walks the imported libraries
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "max_samples", None) is not None and args.max_samples < 1:
        raise ValueError(f"--max-samples must be >= 1, got {args.max_samples}")
    if getattr(args, "batch_size", 1) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "nproc", 1) < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if getattr(args, "nproc", 1) > 1 and not _in_torchrun():
        from evaluation.lib.report import check_out_dir

        check_out_dir(args.out)  # fail here rather than in every process
        return _relaunch(args.nproc, argv)
    args.func(args)
    return 0


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt, so that temporary outputs are removed as on Ctrl-C."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        return None


def _in_torchrun() -> bool:
    from evaluation.lib.distributed import launched_by_torchrun

    return launched_by_torchrun()


def _relaunch(nproc: int, argv: list[str]) -> int:
    from evaluation.lib.distributed import relaunch_with_torchrun

    # torch.distributed.run would read "--nproc" as an abbreviation of its own options
    child, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        child.append(arg)
    return relaunch_with_torchrun(nproc, "evaluation.cli", child)


def _end_process_group() -> None:
    if "torch.distributed" not in sys.modules:  # nothing started one (and --help stays torch-free)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def console_main() -> None:
    """The ``interp-eval`` command: ``main()``, then exit with its code; a process started by
    torchrun (``--nproc``) leaves through ``evaluation.lib.distributed.leave_worker``, which skips
    interpreter finalization (where gloo can abort a finished worker)."""
    code = main()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # launched_by_torchrun(), without importing torch
        from evaluation.lib.distributed import leave_worker

        leave_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()
