"""``interp-eval lib``: load a checkpoint, read its data, fit LIB (evaluation.lib.fit) on one process
or all-reduced over torchrun's (evaluation.lib.distributed), optional ablation curves and edge-ablation
sparsity, and write the report (evaluation.lib.report). The argument parser is in evaluation.cli."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a command needs it (fast --help)
    import torch


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
