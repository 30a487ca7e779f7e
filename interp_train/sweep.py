"""``interp-train sweep``: train one recipe over several variants and seeds, one run after another.

    interp-train sweep --recipe recipes/digits --variants baseline grad_norm --seeds 0 1 2 \
        [--dry_run] [-- --trainer.max_epochs 5 --trainer.devices 4 --trainer.strategy ddp]

Each run is ``interp-train fit --config <recipe>/<variant>.yaml --seed_everything <seed> <extra>``
in its own Python process (``--launcher subprocess``, the default), so Lightning's multi-GPU
strategies (ddp, ...) launch normally; ``--launcher inprocess`` runs them in this process
(CPU, quicker start). Runs land in checkpoints/<task>/<variant>/seed<k>/ as usual.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

LAUNCHERS = ("subprocess", "inprocess")


def variant_configs(recipe: str | Path, variants: Sequence[str] | None) -> list[Path]:
    """The YAML files of the named variants (all *.yaml in the recipe folder when None)."""
    folder = Path(recipe)
    if not folder.is_dir():
        raise FileNotFoundError(f"recipe folder {str(folder)!r} does not exist")
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    names = list(variants) if variants else available
    unknown = [v for v in names if v not in available]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} in {str(folder)!r}; available: {', '.join(available)}")
    return [folder / f"{v}.yaml" for v in names]


def sweep_commands(recipe: str | Path, variants: Sequence[str] | None, seeds: Sequence[int],
                   extra: Sequence[str] = ()) -> list[list[str]]:
    """``fit`` argument lists, variants outer and seeds inner."""
    return [["fit", "--config", str(cfg), "--seed_everything", str(seed), *extra]
            for cfg in variant_configs(recipe, variants) for seed in seeds]


def run_sweep(recipe: str | Path, variants: Sequence[str] | None, seeds: Sequence[int], extra: Sequence[str] = (),
              launcher: str = "subprocess", dry_run: bool = False) -> list[list[str]]:
    """Runs every (variant, seed) sequentially; stops at the first failing run. Returns the commands."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"unknown launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")
    commands = sweep_commands(recipe, variants, seeds, extra)
    for i, args in enumerate(commands, 1):
        print(f"[sweep {i}/{len(commands)}] interp-train {' '.join(args)}", flush=True)
        if dry_run:
            continue
        if launcher == "subprocess":
            result = subprocess.run([sys.executable, "-m", "interp_train.cli", *args])
            if result.returncode != 0:
                raise RuntimeError(f"sweep run failed (exit {result.returncode}): interp-train {' '.join(args)}")
        else:
            from interp_train.cli import InterpTrainCLI

            InterpTrainCLI(args=list(args))
    return commands


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="interp-train sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="recipe folder, e.g. recipes/digits")
    parser.add_argument("--variants", nargs="*", default=None, help="variant names (default: all in the folder)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--launcher", choices=LAUNCHERS, default="subprocess")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    run_sweep(args.recipe, args.variants, args.seeds, extra, launcher=args.launcher, dry_run=args.dry_run)


if __name__ == "__main__":
    main()
