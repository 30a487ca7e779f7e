"""docs/DESIGN.md §4.15 reference figures on a trained modular-addition transformer, LIB next to PCA, and
the Fourier content of the top directions (issue 5; evaluation.metrics.fourier).

    python benchmarks/lib_modular_reference.py [--run-dir RUN | --variant cpu|baseline [--max-steps N]]
        [--stop-at ACC] [--threads 1] [--batch-size 1024] [--out results.json]

Loads a trained recipe run (``--run-dir``, via interp_train.recipes.load_recipe) or trains the
recipe ``recipes/modular_addition/<variant>.yaml`` through the ``interp-train fit`` path into
``--root`` (default: a temporary folder). Then fits LIB + PCA (evaluation.lib.fit.fit_lib, default
LIBConfig) on ALL p² inputs with node layers resid_pre, resid_mid, resid_post, logits, and prints

* per node layer: directions for 99 % of ∑Λ (LIB) / of the variance (PCA), constant excluded;
* per section: edges for 90 % of the total edge weight (LIB / PCA), constant node excluded;
* per node layer: Fourier fraction (best 1, 2 and 3 frequencies over cos/sin of k·a, k·b, k·(a+b))
  of the top LIB and PCA directions and of random directions (evaluation.metrics.fourier.fourier_table).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]
SHORT = {"blocks.0.hook_resid_pre": "resid_pre", "blocks.0.hook_resid_mid": "resid_mid",
         "blocks.0.hook_resid_post": "resid_post", "output": "logits"}
RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "modular_addition"
# docs/DESIGN.md §4.15, full config (p = 113): (LIB low, high), (PCA low, high) per layer / section
REFERENCE_99 = {"resid_pre": ((7, 11), (10, 21)), "resid_mid": ((11, 16), (12, 17)), "resid_post": ((6, 10), (10, 19))}
REFERENCE_E90 = {"resid_pre": ((17, 40), (23, 75)), "resid_mid": ((18, 49), (24, 85))}


class StopAtAccuracy(L.Callback):
    """Stops training once val/acc ≥ target (after ``extra_steps`` more steps); records the step."""

    def __init__(self, target: float, extra_steps: int = 0):
        self.target, self.extra_steps, self.hit_step = target, extra_steps, None

    def on_validation_end(self, trainer, pl_module):
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and float(acc) >= self.target and self.hit_step is None:
            self.hit_step = trainer.global_step
        if self.hit_step is not None and trainer.global_step >= self.hit_step + self.extra_steps:
            trainer.should_stop = True


def train_recipe(variant: str, root: str, max_steps: int | None, stop_at: float | None = None,
                 extra_steps: int = 0, val_every: int | None = None):
    """Trains recipes/modular_addition/<variant>.yaml via InterpTrainCLI; returns (module, datamodule,
    info) with held-out accuracy, steps and seconds."""
    from interp_train.cli import InterpTrainCLI

    args = ["--config", str(RECIPES / f"{variant}.yaml"), "--checkpoint_root", root,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    if val_every is not None:
        args += ["--trainer.check_val_every_n_epoch", str(val_every)]
    cli = InterpTrainCLI(args=args, run=False)
    stop = StopAtAccuracy(stop_at, extra_steps) if stop_at is not None else None
    if stop is not None:
        cli.trainer.callbacks.append(stop)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.model.eval()
    info = {"variant": variant, "steps": int(cli.trainer.global_step), "train_seconds": round(seconds, 1),
            "held_out_acc": float(test["test/acc"]), "grokked_at_step": stop.hit_step if stop else None,
            "run_dir": str(cli.run_directory)}
    return cli.model, cli.datamodule, info


def fit_reference(model, p: int, batch_size: int = 1024, progress: bool = False):
    """LIB + PCA (default LIBConfig) on all p² inputs; node layers LAYERS."""
    from evaluation.lib.fit import LIBConfig, fit_lib
    from interp_train.data.modular import modular_addition_table

    tokens, targets = modular_addition_table(p)
    batches = [(tokens[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(tokens), batch_size)]
    return fit_lib(model, batches, LAYERS, LIBConfig(), progress=progress)


def reference_figures(result) -> dict:
    """{"directions_99": {layer: {"lib", "pca"}}, "edges_90": {layer: {"lib", "pca"}}} (constant excluded)."""
    from evaluation.metrics.lib_summary import edges_for_fraction, feature_count

    dirs = {SHORT[l]: {"lib": feature_count(result.lib[l].Lambda, 0.99), "pca": feature_count(result.pca[l].Lambda, 0.99),
                       "kept_lib": int(result.lib[l].Lambda.numel() - 1), "kept_pca": int(result.pca[l].Lambda.numel() - 1)}
            for l in LAYERS[:-1]}
    edges = {SHORT[l]: {"lib": edges_for_fraction(result.lib_edges[l], 0.9)[0],
                        "pca": edges_for_fraction(result.pca_edges[l], 0.9)[0]} for l in LAYERS[:-1]}
    return {"directions_99": dirs, "edges_90": edges}


def format_tables(figures: dict, fourier: dict) -> str:
    lines = ["| layer | LIB dirs 99 % ∑Λ | PCA dirs 99 % var | LIB edges 90 % | PCA edges 90 % | DESIGN (full p=113) dirs LIB / PCA; edges LIB / PCA |",
             "|---|---|---|---|---|---|"]
    for layer, d in figures["directions_99"].items():
        e = figures["edges_90"][layer]
        ref_d = REFERENCE_99.get(layer)
        ref_e = REFERENCE_E90.get(layer)
        ref = (f"{ref_d[0][0]}–{ref_d[0][1]} / {ref_d[1][0]}–{ref_d[1][1]}" if ref_d else "–")
        ref += "; " + (f"{ref_e[0][0]}–{ref_e[0][1]} / {ref_e[1][0]}–{ref_e[1][1]}" if ref_e else "–")
        lines.append(f"| {layer} | {d['lib']} (of {d['kept_lib']}) | {d['pca']} (of {d['kept_pca']}) | {e['lib']} | {e['pca']} | {ref} |")
    lines += ["", "| layer (positions) | basis | best-1 frequency fraction per direction | best-2 | best-3 | best k | variance share at positions |",
              "|---|---|---|---|---|---|---|"]
    for layer, entry in fourier.items():
        for basis in ("lib", "pca", "random"):
            rows = entry[basis]
            f1 = " ".join(f"{r['top_1']:.2f}" for r in rows)
            f2 = " ".join(f"{r['top_2']:.2f}" for r in rows)
            f3 = " ".join(f"{r['top_3']:.2f}" for r in rows)
            ks = " ".join(str(r["frequencies"][0]) for r in rows)
            share = " ".join(f"{r['variance_share']:.2f}" for r in rows)
            lines.append(f"| {SHORT.get(layer, layer)} {tuple(entry['positions'])} | {basis} | {f1} | {f2} | {f3} | {ks} | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None, help="a trained recipe run (load instead of training)")
    parser.add_argument("--variant", default="cpu", choices=["cpu", "baseline"])
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's trainer.max_steps")
    parser.add_argument("--stop-at", type=float, default=None, help="stop once held-out accuracy reaches this")
    parser.add_argument("--root", default=None, help="checkpoint root for training (default: temporary)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n-top", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from evaluation.metrics.fourier import fourier_table
    from interp_train.recipes import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        if args.run_dir:
            module, datamodule = load_recipe(args.run_dir)
            datamodule.setup("test")
            x, y = datamodule.splits["test"].tensors
            with torch.no_grad():
                acc = (module.model(x)[:, -1].argmax(-1) == y).double().mean().item()
            info = {"run_dir": args.run_dir, "held_out_acc": round(acc, 4)}
        else:
            module, datamodule, info = train_recipe(args.variant, args.root or tmp, args.max_steps, args.stop_at)
        print(json.dumps(info), flush=True)
        model, p = module.model, datamodule.p
        start = time.perf_counter()
        result = fit_reference(model, p, args.batch_size)
        info["lib_seconds"] = round(time.perf_counter() - start, 1)
        figures = reference_figures(result)
        fourier = fourier_table(model, result, p, LAYERS[:-1], n_top=args.n_top, Ks=(1, 2, 3))
    out = {"info": info, "p": p, **figures, "fourier": fourier}
    print(format_tables(figures, fourier))
    print(json.dumps(info))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
