"""Calibrates evaluation.metrics.llc.estimate_llc's SGLD settings on two recipes (issue 6).

    python benchmarks/llc_calibration.py [--tasks digits modular] [--lrs 1e-5 3e-5 1e-4 3e-4]
        [--localizations 1 10 100] [--chains 4] [--draws 200] [--burnin 0] [--batch-size 256] [--threads 1]
        [--out results.json]

Models: the digits MLP baseline (checkpoints/study/digits/baseline/seed0) and the modular-addition
CPU transformer (checkpoints/study/modular_addition/baseline/seed0) when those runs exist, otherwise
the recipe trained briefly (``--train-steps``) through ``interp-train fit`` into a temporary folder.
The estimator sees exactly what ``interp-eval compare`` gives it: the training split in fixed
batches of ``--batch-size``, per-example cross-entropy, nβ = B / log B.

For every (lr, γ) of the grid, and for lr/2 at the same γ (the stability check), it prints λ̂
(mean over chains), its std over chains, the chain health (devinterp SGLD; evaluation.metrics.llc's
checks: non-finite, negative, diverging) and the relative change of λ̂ when lr halves:
    stable = |λ̂(lr/2) − λ̂(lr)| / |λ̂(lr)|.
A setting is usable when both runs are healthy, λ̂ > 0 and the change is small (< 0.2); the
table ends with the usable settings. One torch thread by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"digits": ROOT / "checkpoints/study/digits/baseline/seed0",
        "modular": ROOT / "checkpoints/study/modular_addition/baseline/seed0"}
RECIPES = {"digits": ROOT / "recipes/digits/baseline.yaml", "modular": ROOT / "recipes/modular_addition/cpu.yaml"}
STABLE_REL = 0.2


def load_or_train(task: str, train_steps: int, tmp: str):
    """(model in eval mode, datamodule) from the study run if present, else trained briefly."""
    from evaluation.io.checkpoints import load_checkpoint

    ckpt = RUNS[task] / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        from interp_train.cli import main as train_main

        run_dir = Path(tmp) / task
        train_main(["fit", "--config", str(RECIPES[task]), "--run_dir", str(run_dir), "--test_after_fit", "false",
                    "--trainer.max_steps", str(train_steps), "--trainer.max_epochs", "-1",
                    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
        ckpt = run_dir / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    loaded.datamodule.setup("fit")
    return loaded.model.eval(), loaded.datamodule, str(ckpt)


def train_batches(datamodule, batch_size: int):
    from evaluation.compare.data import batches, split_tensors

    return batches(split_tensors(datamodule, "train"), batch_size)


def run_one(model, batches, lr: float, localization: float, chains: int, draws: int, burnin: int) -> dict:
    from evaluation.metrics.llc import estimate_llc
    from interp_train.losses import per_example_cross_entropy

    start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the health verdicts are in the result
        res = estimate_llc(model, batches, per_example_cross_entropy, lr=lr, localization=localization,
                           num_chains=chains, num_draws=draws, num_burnin_steps=burnin, progress=False)
    return {"lr": lr, "localization": localization, "llc": res.mean, "std": res.std, "per_chain": res.per_chain,
            "healthy": res.healthy, "health": res.chain_health, "init_loss": res.init_loss, "nbeta": res.nbeta,
            "cpu_s": time.process_time() - start}


def _fmt(x) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4g}"


def calibrate(task: str, args, tmp: str) -> dict:
    model, dm, source = load_or_train(task, args.train_steps, tmp)
    batches = train_batches(dm, args.batch_size)
    rows = []
    print(f"\n## {task}: {source}, {sum(p.numel() for p in model.parameters())} parameters, "
          f"{sum(b[0].shape[0] for b in batches)} training examples in batches of {args.batch_size}")
    print("| lr | γ | λ̂ | std (chains) | health | λ̂ at lr/2 | health at lr/2 | rel. change | cpu s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loc in args.localizations:
        for lr in args.lrs:
            full = run_one(model, batches, lr, loc, args.chains, args.draws, args.burnin)
            half = run_one(model, batches, lr / 2, loc, args.chains, args.draws, args.burnin)
            change = abs(half["llc"] - full["llc"]) / abs(full["llc"]) if full["llc"] else math.nan
            usable = (full["healthy"] and half["healthy"] and full["llc"] > 0 and math.isfinite(change)
                      and change < STABLE_REL)
            row = {**full, "half": half, "rel_change_half_lr": change, "usable": usable}
            rows.append(row)
            health = "ok" if full["healthy"] else "; ".join(sorted(set(h for h in full["health"] if h != "ok")))
            health_half = "ok" if half["healthy"] else "; ".join(sorted(set(h for h in half["health"] if h != "ok")))
            print(f"| {lr:g} | {loc:g} | {_fmt(full['llc'])} | {_fmt(full['std'])} | {health} | "
                  f"{_fmt(half['llc'])} | {health_half} | {_fmt(change)}{' ✓' if usable else ''} | "
                  f"{full['cpu_s'] + half['cpu_s']:.1f} |", flush=True)
    usable = [(r["lr"], r["localization"]) for r in rows if r["usable"]]
    print(f"usable (healthy at lr and lr/2, λ̂ > 0, change < {STABLE_REL}): {usable or 'none'}")
    return {"task": task, "source": source, "batch_size": args.batch_size, "chains": args.chains,
            "draws": args.draws, "burnin": args.burnin, "rows": rows, "usable": usable}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "modular"], choices=sorted(RUNS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 3e-5, 1e-4, 3e-4])
    parser.add_argument("--localizations", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--burnin", type=int, default=0, help="SGLD steps discarded before the draws")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=1000, help="steps when no study run is found")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=str, default=None, help="write all rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        results = [calibrate(task, args, tmp) for task in args.tasks]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
