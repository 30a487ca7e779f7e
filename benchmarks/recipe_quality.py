"""Quality targets of the recipes, measured (not timed tests):

* digits baseline: test accuracy (target >= 95 %) and wall time;
* modular addition CPU variant: wall time and step at which held-out accuracy first reaches
  >= 99 % (grokked; target < 10 minutes on 2 CPU cores), with the train/test accuracy then.

    python benchmarks/recipe_quality.py [--threads 1] [--only digits|modular] [--out results.json]

Each run goes through the real ``interp-train fit`` path (InterpTrainCLI) into a temporary
checkpoint root. Modular addition is validated every 50 (full-batch) steps and stops at 99 %.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from interp_train.cli import InterpTrainCLI

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


class StopAtAccuracy(L.Callback):
    """Records the wall time and step when val/acc first reaches ``target``; then stops training."""

    def __init__(self, target: float):
        self.target, self.start, self.hit = target, None, None

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and float(acc) >= self.target and self.hit is None and not trainer.sanity_checking:
            self.hit = {"step": trainer.global_step, "seconds": time.perf_counter() - self.start,
                        "val_acc": float(acc), "train_acc": float(trainer.callback_metrics.get("train/acc", float("nan")))}
            trainer.should_stop = True


def run(config: str, root: str, extra: list[str], callbacks: list[L.Callback] = ()) -> tuple[dict, float]:
    cli = InterpTrainCLI(args=["--config", str(RECIPES / config), "--checkpoint_root", root,
                               "--trainer.enable_progress_bar", "false", *extra], run=False)
    cli.trainer.callbacks.extend(callbacks)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - start
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {k: float(v) for k, v in result.items()}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["digits", "modular"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory() as root:
        if args.only in (None, "digits"):
            test, seconds = run("digits/baseline.yaml", root, [])
            results["digits_baseline"] = {"test_acc": test["test/acc"], "seconds": round(seconds, 1)}
            print(json.dumps(results["digits_baseline"]), flush=True)
        if args.only in (None, "modular"):
            stop = StopAtAccuracy(0.99)
            test, seconds = run("modular_addition/cpu.yaml", root, ["--trainer.max_steps", "5000"], [stop])
            results["modular_cpu"] = {"grokked": stop.hit, "test_acc": test["test/acc"], "seconds": round(seconds, 1)}
            print(json.dumps(results["modular_cpu"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
