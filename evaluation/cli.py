"""``interp-eval``: evaluation commands.

    interp-eval lib CHECKPOINT [--config HT_CONFIG.json] [--layers L ...] [--data SPEC]
                    [--truncation T] [--integration RULE] [--n-intervals N] [--max-samples N]
                    [--batch-size B] [--no-ablation] [--edge-ablation [--edge-ablation-tolerance T]
                    [--edge-ablation-mode mean|zero]] [--nproc N] --out DIR

    interp-eval compare [ROOT] [--variant NAME RUN [RUN ...]]... [--baseline NAME] [--test welch|permutation]
                        [--alpha A] [--correction holm|bonferroni|none] [--max-samples N] [--layers L ...]
                        [--tangents KIND] [--eps E ...] [--ratio-eps E] [--no-alignment] [--llc]
                        [--circuit ...] [--edge-ablation [--edge-ablation-tolerance T] [--edge-ablation-mode M]] --out DIR

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
``python -m torch.distributed.run --nproc_per_node N`` (equivalently, start it yourself:
``torchrun --nproc_per_node N -m evaluation.cli lib ...``). Process r takes batches r, r + N, ...;
the sums of the fit are all-reduced (evaluation.lib.distributed); rank 0 alone runs the ablation
curves and writes the report.

Errors are one paragraph on stderr with exit code 2 (evaluation.errors); add ``--debug`` (or set
``INTERP_DEBUG=1``) for the full traceback. SIGTERM cleans up like Ctrl-C (no temporary folders left).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

# torch, TransformerLens and matplotlib are imported by the commands that need them, so that
# ``interp-eval --help`` and argument errors answer at once
from evaluation.errors import run_command


def modular_addition_data(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs: inputs (p², 3) rows (a, b, p) ('=' is token p), targets (a + b) mod p."""
    import torch

    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    inputs = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return inputs, (a + b) % p


def parse_data(spec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, targets or None) from a --data spec."""
    import torch

    if spec.startswith("modular-addition"):
        _, _, params = spec.partition(":")
        fields = dict(kv.split("=", 1) for kv in params.split(",") if "=" in kv)
        unknown = set(fields) - {"p"}
        if unknown or (params and not fields):
            raise ValueError(f"bad --data {spec!r}: modular-addition takes only p, e.g. 'modular-addition:p=113'")
        try:
            p = int(fields.get("p", 113))
        except ValueError:
            raise ValueError(f"bad --data {spec!r}: p must be an integer") from None
        if p < 2:
            raise ValueError(f"bad --data {spec!r}: p must be >= 2")
        return modular_addition_data(p)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"bad --data {spec!r}: expected 'modular-addition:p=P' or an existing torch file "
                         "holding {'inputs': ..., 'targets': ...}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read --data file {spec!r}: {type(err).__name__}: {err}") from err
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, dict) and isinstance(obj.get("inputs"), torch.Tensor):
        return obj["inputs"], obj.get("targets")
    raise ValueError(f"--data file {spec!r} must hold a tensor of inputs or {{'inputs': ..., 'targets': ...}}")


def default_layers(model, last_position: bool = False) -> list[str]:
    """The node layers ``interp-eval compare`` chooses (evaluation.compare.context.default_node_layers):
    for a TransformerLens model the residual stream around every block, then the logits ("output"),
    with ``last_position`` (one target per sequence) the layers after the last attention at
    position -1; for a recipe MLP the input, every hidden activation and the output."""
    from evaluation.compare.context import default_node_layers

    try:
        return default_node_layers(model, last_position)
    except ValueError:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"cannot choose node layers for {type(model).__name__}; pass --layers with module "
                         f"paths in forward order, e.g. from: input, {', '.join(names)}, output") from None


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint file; an interp-train run directory stands for its checkpoints/last.ckpt."""
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return path  # a Hugging Face model directory (evaluation.io.checkpoints reads it)
    if path.is_dir():
        from interp_train.recipes import find_run_files

        try:
            return find_run_files(path)[1]
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{str(path)!r} is a directory but not an interp-train run directory ({err}); "
                                    "pass a run directory, a Hugging Face model directory or a .pt/.pth/.ckpt/.safetensors "
                                    "file") from None
    return path


def check_data_fits(model, inputs: torch.Tensor, targets: torch.Tensor | None, spec: str) -> None:
    """Inputs and targets pair up, and token ids fit the model's vocabulary (before any fitting)."""
    if targets is not None and targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"--data {spec!r} holds {inputs.shape[0]} inputs but {targets.shape[0]} targets; "
                         "they must pair up (same first dimension)")
    cfg = getattr(model, "cfg", None) or next((getattr(m, "cfg", None) for m in model.modules()
                                               if getattr(getattr(m, "cfg", None), "d_vocab", None)), None)
    d_vocab, d_vocab_out = getattr(cfg, "d_vocab", None), getattr(cfg, "d_vocab_out", None)
    if d_vocab and not inputs.is_floating_point() and inputs.numel() and int(inputs.max()) >= d_vocab:
        hint = f"; for modular addition the model's p is {d_vocab - 1}" if spec.startswith("modular-addition") else ""
        raise ValueError(f"--data {spec!r} has token ids up to {int(inputs.max())}, but the model's vocabulary has "
                         f"{d_vocab} tokens (ids 0..{d_vocab - 1}){hint}")
    if d_vocab_out and targets is not None and targets.numel() and int(targets.max()) >= d_vocab_out:
        raise ValueError(f"--data {spec!r} has targets up to {int(targets.max())}, but the model has only "
                         f"{d_vocab_out} outputs")


def _subsample(inputs, targets, max_samples: int | None):
    if max_samples is None or max_samples >= inputs.shape[0]:
        return inputs, targets
    import torch

    idx = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(0))[:max_samples]
    return inputs[idx], (targets[idx] if targets is not None else None)


def _batches(inputs, targets, batch_size):
    out = []
    for i in range(0, inputs.shape[0], batch_size):
        x = inputs[i:i + batch_size]
        out.append((x, targets[i:i + batch_size]) if targets is not None else (x,))
    return out


def _recipe_batches(datamodule, max_samples):
    if datamodule is None:
        raise ValueError("no --data given and the checkpoint carries no data module; pass --data")
    datamodule.setup("fit")
    batches, n = [], 0
    for batch in datamodule.train_dataloader():
        if not isinstance(batch, (tuple, list)):
            raise ValueError(f"the recipe's batches are {type(batch).__name__}; expected (inputs, targets)")
        batches.append(tuple(batch[:2]))
        n += batch[0].shape[0]
        if max_samples is not None and n >= max_samples:
            break
    return batches


def _ablation_ks(n: int) -> list[int]:
    ks = [0] + [2 ** i for i in range(n.bit_length()) if 2 ** i < n] + [n]
    return sorted(set(ks))


def run_lib(args) -> dict:
    from evaluation.startup import collector_paused, keep_freed_memory

    keep_freed_memory()  # the fit's temporaries reuse freed heap instead of fresh pages: see evaluation.startup
    with collector_paused():  # the imports and the model load build ~0.5 M objects: see evaluation.startup
        from evaluation.lib.distributed import fit_lib_distributed, init_from_env, launched_by_torchrun
        from evaluation.lib.fit import LIBConfig, fit_lib
        from evaluation.metrics.lib_summary import edge_table, node_ablation_curve

        import torch

        from evaluation.io.checkpoints import load_checkpoint
        from evaluation.io.device import resolve_device
        from evaluation.lib.positions import loss_reads_last_position
        from evaluation.lib.report import check_out_dir, write_lib_report

        out_dir = check_out_dir(args.out)  # fail before the expensive fit
        edge_config = None
        if args.edge_ablation:
            from evaluation.metrics.edge_ablation import EdgeAblationConfig

            edge_config = EdgeAblationConfig(tolerance=args.edge_ablation_tolerance, ablation=args.edge_ablation_mode)
        device = resolve_device(args.device)  # ValueError for an absent device, before anything is written
        rank = init_from_env()[0] if launched_by_torchrun() else 0
        if launched_by_torchrun() and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # this process's GPU (init_from_env: LOCAL_RANK)
        config = None
        if args.config is not None:
            try:
                config = json.loads(Path(args.config).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read --config {args.config!r} as JSON: {err}") from err
        loaded = load_checkpoint(resolve_checkpoint(args.checkpoint), config=config)
        model = loaded.model.to(device)
        if args.dtype is not None:
            model = model.to(getattr(torch, args.dtype))
    if args.data is not None:
        inputs, targets = parse_data(args.data)
        check_data_fits(model, inputs, targets, args.data)
        inputs, targets = _subsample(inputs, targets, args.max_samples)
        batches = _batches(inputs, targets, args.batch_size)
    else:
        batches = _recipe_batches(loaded.datamodule, args.max_samples)
    if edge_config is not None and not all(len(b) == 2 for b in batches):
        raise ValueError("--edge-ablation needs targets (it measures accuracy): give --data with targets "
                         "or a recipe checkpoint")
    layers = args.layers or default_layers(model, last_position=all(
        len(b) == 2 and loss_reads_last_position(b[1]) for b in batches))
    lib_config = LIBConfig(truncation=args.truncation, integration=args.integration, n_intervals=args.n_intervals,
                           neuron_edges=args.neuron_edges)
    if launched_by_torchrun():
        result = fit_lib_distributed(model, batches, layers, lib_config, progress=not args.quiet and rank == 0)
        if rank != 0:  # every rank holds the same result; rank 0 writes it
            return {}
    else:
        result = fit_lib(model, batches, layers, lib_config, progress=not args.quiet)
    ablation = {}
    has_targets = all(len(b) == 2 for b in batches)
    if args.ablation and has_targets:
        for layer in layers[:-1]:
            curves = {"metric": "accuracy", "ks": {}}
            for basis, bases in (("lib", result.lib), ("pca", result.pca)):
                ks = _ablation_ks(int(torch.as_tensor(bases[layer].Lambda).numel()) - 1)
                curves["ks"][basis] = ks
                curves[basis] = node_ablation_curve(model, batches, result, layer, ks, basis, "accuracy")
            ablation[layer] = curves
    metadata = {"checkpoint": str(args.checkpoint), "checkpoint_kind": loaded.kind, "model_config": loaded.config,
                "data": args.data, "n_samples": sum(b[0].shape[0] for b in batches), "node_layers": layers}
    if edge_config is not None:
        from evaluation.metrics.edge_ablation import BASES, edge_ablation_sparsity

        metadata["edge_ablation"] = {b: edge_ablation_sparsity(model, batches, result, b, edge_config).to_dict()
                                     for b in BASES}
    report = write_lib_report(result, out_dir, metadata, ablation)
    print(f"wrote {out_dir}: {', '.join(report['files'])}")
    if not args.quiet:
        print(edge_table(report["summary"]))
    return report


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
                             llc=args.llc, edge_ablation=args.edge_ablation,
                             edge_ablation_tolerance=args.edge_ablation_tolerance,
                             edge_ablation_mode=args.edge_ablation_mode, device=str(device),
                             **{k: v for k, v in (("llc_draws", args.llc_draws), ("llc_chains", args.llc_chains))
                                if v is not None})
    result = run_compare(variants, args.out, options, baseline=args.baseline, test=args.test, alpha=args.alpha,
                         progress=not args.quiet, correction=args.correction)
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
    parser.add_argument("--edge-ablation-mode", choices=["mean", "zero"], default="mean",
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
    cmp.add_argument("--circuit-ablation", choices=["mean", "zero"], default="mean",
                     help="circuit: pruned nodes take their mean activation (default) or zero")
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
    lib.set_defaults(func=run_lib)
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


if __name__ == "__main__":
    sys.exit(main())
