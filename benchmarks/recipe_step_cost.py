"""Cost of a regularized recipe step through Lightning, with and without a shared forward pass.

For each recipe variant, builds the recipe's module and data exactly as ``interp-train fit`` does
(``InterpTrainCLI(run=False)``), trains ``--steps`` steps with a quiet Trainer (no validation, no
logger, no checkpoint) and times every training batch from ``on_train_batch_start`` to
``on_train_batch_end`` (forward, backward and optimizer step) by the process's CPU time. Prints
the median step after ``--warmup`` steps, and its ratio to the baseline recipe's:

* ``shared``: ``RecipeModule(shared_forward=True)``, the default: the task loss is computed on
  the regularizers' clean forward pass (one forward and backward pass);
* ``separate``: ``shared_forward=False``, the task loss on a forward pass of its own, as every
  study run committed up to 2026-12-04 was trained.

    python benchmarks/recipe_step_cost.py [--recipes recipes/text] [--variants degeneracy activation_sparsity]
        [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch


class StepTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds.append(time.process_time() - self._start)


def median_step(recipe: Path, steps: int, warmup: int, shared: bool) -> float:
    from interp_train.cli import InterpTrainCLI

    cli = InterpTrainCLI(args=["--config", str(recipe), "--seed_everything", "0",
                               "--model.shared_forward", str(shared).lower()], run=False)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        callbacks=[timer])
    trainer.fit(cli.model, datamodule=cli.datamodule)
    return statistics.median(timer.seconds[warmup:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", type=Path, default=Path("recipes/text"))
    parser.add_argument("--baseline", default="baseline")
    parser.add_argument("--variants", nargs="+", default=["degeneracy", "activation_sparsity"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    torch.set_num_threads(args.threads)
    base = median_step(args.recipes / f"{args.baseline}.yaml", args.steps, args.warmup, True)
    print(f"{args.recipes}, {args.threads} threads, median of steps {args.warmup}-{args.steps} by CPU time")
    print(f"{args.baseline:>24}: {1000 * base:7.1f} ms")
    for variant in args.variants:
        recipe = args.recipes / f"{variant}.yaml"
        shared = median_step(recipe, args.steps, args.warmup, True)
        separate = median_step(recipe, args.steps, args.warmup, False)
        print(f"{variant:>24}: shared {1000 * shared:7.1f} ms ({shared / base:.2f}x), "
              f"separate {1000 * separate:7.1f} ms ({separate / base:.2f}x); separate / shared {separate / shared:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
