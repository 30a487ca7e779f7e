"""HardConcreteL0 on modular addition over seeds (recipes/modular_addition/cpu_l0.yaml): what the
recipe's weight gives — test accuracy, and the evaluation density (share of gated weight entries
whose deterministic gate is non-zero) overall and per matrix — next to the dense ``cpu`` recipe.

    python benchmarks/l0_calibration.py [--seeds 0 1 2 3 4] [--weight W] [--steps N] [--init-log-alpha A]
                                        [--gate-lr-scale S] [--target-density T] [--dual-lr D] [--root DIR] [--threads 1] [--out results.json]
    python benchmarks/l0_calibration.py --runs RUN_DIR [RUN_DIR ...]     # measure trained runs only

Weight, steps, starting log α and gate learning-rate scale default to the recipe's. Each run goes
through the real ``interp-train fit`` path into ``<root>/modular_addition/cpu_l0_w<weight>_s<steps>[_a<init>][_g<scale>]/
seed<k>``; a run that has its ``metrics.json`` is reused, so the script can be stopped and resumed.
Not a timed test.

A gate's evaluation value clamp(sigmoid(log α)(ζ − γ) + γ, 0, 1) is 0 once
log α ≤ log(−γ / ζ) = −2.40 (γ = −0.1, ζ = 1.1). Adam moves a parameter by about its learning rate
per step while the gradient keeps its sign, so no gate starting at log α = 2 can close before
(2 + 2.40) / (lr · gate_lr_scale) steps (printed as "earliest close"): ~1470 at lr 3e-3 without a
scale, which is why the recipe trains log α at 10× the learning rate (~150 steps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def derived_recipe(overrides: dict) -> dict:
    """cpu_l0.yaml with HardConcreteL0's arguments in ``overrides`` replaced (a None value keeps the
    recipe's)."""
    recipe = yaml.safe_load((RECIPES / "modular_addition" / "cpu_l0.yaml").read_text())
    recipe["model"]["regularizers"][0]["init_args"].update({k: v for k, v in overrides.items() if v is not None})
    return recipe


def train(root: Path, seed: int, recipe: dict, variant: str, steps: int) -> Path:
    from interp_train.cli import InterpTrainCLI

    run_dir = root / "modular_addition" / variant / f"seed{seed}"
    if not (run_dir / "metrics.json").is_file():
        config = root / f"{variant}.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump(recipe))
        InterpTrainCLI(args=["fit", "--config", str(config), "--seed_everything", str(seed), "--variant", variant,
                             "--checkpoint_root", str(root), "--trainer.max_steps", str(steps),
                             "--trainer.enable_progress_bar", "false"])
    return run_dir


def short_name(name: str) -> str:
    """model.net.blocks.0._original_component.attn._original_component.q._original_component.weight -> blocks.0.attn.q"""
    parts = [p for p in name.split(".") if p not in ("_original_component", "weight")]
    return ".".join(parts[2:] if parts[:2] == ["model", "net"] else parts)


def measure(run_dir: Path) -> dict:
    from interp_train.recipes import load_recipe

    module, _ = load_recipe(run_dir)
    module.eval()
    reg = module.regularizers[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    per_matrix, log_alpha = {}, []
    with torch.no_grad():
        for name, gate in reg.gates(module):
            per_matrix[short_name(name)] = float((gate.gates(sample=False) > 0).double().mean())
            log_alpha.append(gate.log_alpha.detach().flatten())
    log_alpha = torch.cat(log_alpha)
    return {"run_dir": str(run_dir), "step": int(metrics["global_step"]), "test_acc": float(metrics["test/acc"]),
            # from the final gates: the logged l0 term stops at the last step with a non-zero weight
            "eval_density": reg.density(module), "expected_density": float(reg.expected_density(module).detach()),
            "final_weight": reg.current_weight(), "settings": reg.extra_repr(),
            "per_matrix": per_matrix, "min_log_alpha": float(log_alpha.min()),
            "median_log_alpha": float(log_alpha.median())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--weight", type=float, default=None, help="the l0 term's weight (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--init-log-alpha", type=float, default=None,
                        help="the gates' starting log α (default: the recipe's)")
    parser.add_argument("--gate-lr-scale", type=float, default=None,
                        help="log α's learning rate as a multiple of the recipe's (default: the recipe's)")
    parser.add_argument("--target-density", type=float, default=None,
                        help="HardConcreteL0's target_density: λ follows the evaluation density (default: the recipe's)")
    parser.add_argument("--dual-lr", type=float, default=None, help="λ's step size with a target (default: the recipe's)")
    parser.add_argument("--root", default=None, help="checkpoint root (default: a temporary directory)")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="measure these trained run directories (e.g. the study's <root>/modular_addition/l0_x1/"
                             "seed<k>) instead of training; the first run's settings are printed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.weight is not None and (args.weight < 0 or not math.isfinite(args.weight)):
        raise SystemExit(f"--weight must be a finite number >= 0, got {args.weight}")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    from interp_train.regularizers.hard_concrete import HardConcreteL0

    recipe = derived_recipe({"weight": args.weight, "init_log_alpha": args.init_log_alpha,
                             "gate_lr_scale": args.gate_lr_scale, "target_density": args.target_density,
                             "dual_lr": args.dual_lr})
    init_args = recipe["model"]["regularizers"][0]["init_args"]
    try:
        reg = HardConcreteL0(**init_args)  # validates the settings
    except ValueError as err:
        raise SystemExit(f"l0_calibration: {err}")
    args.weight = float(init_args["weight"])
    args.steps = int(recipe["trainer"]["max_steps"] if args.steps is None else args.steps)
    variant = (f"cpu_l0_w{args.weight:g}_s{args.steps}"
               + ("" if args.init_log_alpha is None else f"_a{args.init_log_alpha:g}")
               + ("" if reg.gate_lr_scale == 1.0 else f"_g{reg.gate_lr_scale:g}")
               + ("" if reg.target_density is None else f"_t{reg.target_density:g}_d{reg.dual_lr:g}"))
    if args.runs:
        missing = [d for d in args.runs if not (Path(d) / "metrics.json").is_file()]
        if missing:
            raise SystemExit(f"l0_calibration: not a trained run directory (no metrics.json): {', '.join(missing)}")
        rows = {Path(d).name: measure(Path(d)) for d in args.runs}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(args.root or tmp)
            rows = {f"seed{seed}": measure(train(root, seed, recipe, variant, args.steps)) for seed in args.seeds}
    lr, cutoff = recipe["model"]["lr"] * reg.gate_lr_scale, math.log(-reg.gamma / reg.zeta)  # eval gate 0 below cutoff
    earliest = (reg.init_log_alpha - cutoff) / lr
    target = "" if reg.target_density is None else (f" (starting λ), target density {reg.target_density:g}, "
                                                    f"dual lr {reg.dual_lr:g}")
    if args.runs:  # the runs' own settings, not the recipe's
        print(f"HardConcreteL0 of {args.runs[0]}: {next(iter(rows.values()))['settings']}")
    print(f"{'recipe: ' if args.runs else ''}HardConcreteL0 weight {args.weight:g}{target}, {args.steps} steps, runs {', '.join(rows)}; "
          f"earliest close ≈ {earliest:.0f} steps "
          f"(log α {reg.init_log_alpha:g} -> {cutoff:.2f} at log α's lr {lr:g})")
    matrices = list(next(iter(rows.values()))["per_matrix"])
    print(f"{'run':>8s} {'test acc':>9s} {'eval density':>13s} {'expected':>9s} {'weight':>8s} {'min log α':>10s}  "
          + " ".join(f"{m.rsplit('.', 1)[-1]:>6s}" for m in matrices))
    for seed, r in rows.items():
        print(f"{seed:>8s} {r['test_acc']:9.4f} {r['eval_density']:13.4f} {r['expected_density']:9.4f} "
              f"{r['final_weight']:8.3g} "
              f"{r['min_log_alpha']:10.3f}  " + " ".join(f"{r['per_matrix'][m]:6.3f}" for m in matrices))
    for key in ("test_acc", "eval_density"):
        values = [r[key] for r in rows.values()]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{key}: {statistics.mean(values):.4f} ± {spread:.4f} (mean ± std over {len(values)} runs)")
    if args.out:
        Path(args.out).write_text(json.dumps({"weight": args.weight, "steps": args.steps,
                                              "init_log_alpha": reg.init_log_alpha,
                                              "gate_lr_scale": reg.gate_lr_scale,
                                              "target_density": reg.target_density, "dual_lr": reg.dual_lr,
                                              "earliest_close_steps": earliest,
                                              "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
