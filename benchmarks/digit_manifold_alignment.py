"""Gradient alignment on the decoder-generated digit manifold, per recipe variant (measured, not a test).

For each variant of recipes/digit_manifold: train it through the real ``interp-train fit`` path
(InterpTrainCLI) into a checkpoint root, then report test accuracy, the mean over test points of
the gradient alignment ||U Uᵀ ∇_x ℓ|| / ||∇_x ℓ|| with exact tangents U (decoder Jacobian), the
random-direction value √(k/d), the training wall time and the load average.

    python benchmarks/digit_manifold_alignment.py [--variants baseline adversarial ...] [--seed 0]
        [--root /tmp/digit_manifold_runs] [--threads 1] [--out results.json] [interp-train fit overrides]

The VAE decoder is trained once and cached ($INTERP_TRAIN_CACHE or ~/.cache/interp_train).
Reference (Bordt et al. 2023, MNIST32): standard training 0.31, L2-adversarial 0.68, random 0.10.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evaluation.metrics.alignment import gradient_alignment
from interp_train.cli import InterpTrainCLI
from interp_train.io import write_json_atomic

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "digit_manifold"


def measure(variant: str, seed: int, root: str, extra: list[str]) -> dict:
    cli = InterpTrainCLI(args=["--config", str(RECIPES / f"{variant}.yaml"), "--checkpoint_root", root,
                               "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
                               "--trainer.enable_model_summary", "false", *extra], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    dm = cli.datamodule
    result = gradient_alignment(cli.model.model, dm.test_dataloader(), dm.tangent_provider("exact"), progress=False)
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    return {"variant": variant, "seed": seed, "test_acc": float(test["test/acc"]), "alignment": result.mean,
            "alignment_median": result.median, "random": result.baseline, "k": result.k, "d": result.d,
            "train_seconds": seconds, "loadavg": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["baseline", "adversarial", "grad_norm", "off_manifold_grad"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default="/tmp/digit_manifold_runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()  # the rest goes to interp-train fit (e.g. --trainer.max_epochs 5)
    missing = [v for v in args.variants if not (RECIPES / f"{v}.yaml").is_file()]
    if missing:
        raise SystemExit(f"unknown variant(s) {missing}; allowed: {sorted(p.stem for p in RECIPES.glob('*.yaml'))}")
    torch.set_num_threads(args.threads)
    rows = []
    for variant in args.variants:
        rows.append(measure(variant, args.seed, args.root, extra))
        r = rows[-1]
        print(f"{variant:22s} acc {100 * r['test_acc']:5.1f} %  alignment {r['alignment']:.3f} "
              f"(random {r['random']:.3f}, k={r['k']}, d={r['d']})  {r['train_seconds']:.0f} s  load {' '.join(r['loadavg'])}",
              flush=True)
    if args.out:
        write_json_atomic(args.out, rows)


if __name__ == "__main__":
    main()
