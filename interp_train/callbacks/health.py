"""Detects a training run that has gone wrong and says so, instead of finishing "successfully".

Two failures, handled differently:

* **Divergence — stop.** The training loss is NaN/inf or exceeds ``max_loss`` (default 1e6;
  a cross-entropy task loss starts at log C ≈ 2–5, so a total this large means some weighted
  regularizer term dominates the gradient by orders of magnitude). Nothing useful can come of
  the remaining steps, so training stops with :class:`TrainingDiverged`, naming the step, the
  loss and the largest weighted term; ``interp-train`` reports it in one paragraph (exit code 2)
  and writes ``failure.json`` beside the history kept in ``metrics.csv``.
* **Accuracy at chance — warn.** At the end of fit (and whenever validation accuracy falls back
  from above to within ``chance_margin`` of chance, 1/C for C classes) a warning is printed and
  ``health/at_chance`` = 1 is recorded in ``metrics.json``. Only a warning: a short run, or a
  grokking run before it generalises (modular addition sits at chance validation accuracy for
  hundreds of steps), is legitimately at chance, and stopping it would be wrong.

"Within the margin" means accuracy ≤ 1/C + chance_margin · (1 − 1/C): the bottom 10 % (default)
of the way from chance to perfect.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
import torch


class TrainingDiverged(FloatingPointError):
    """The training loss became non-finite or exceeded the bound."""


class TrainingHealth(L.Callback):
    """Stops a diverging run (loss > ``max_loss`` or non-finite) and warns when accuracy is at chance."""

    def __init__(self, max_loss: float = 1e6, chance_margin: float = 0.1):
        if not (max_loss > 0):
            raise ValueError(f"max_loss must be > 0, got {max_loss!r}")
        if not (0 <= chance_margin < 1):
            raise ValueError(f"chance_margin must be in [0, 1), got {chance_margin!r}")
        self.max_loss = float(max_loss)
        self.chance_margin = float(chance_margin)
        self.n_classes: int | None = None
        self.best_val_acc: tuple[float, int] | None = None
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ divergence
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.n_classes is None:
            self.n_classes = _output_classes(pl_module, batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        value = float(loss.detach())
        if math.isfinite(value) and value <= self.max_loss:
            return
        why = "became non-finite" if not math.isfinite(value) else f"exceeded the bound max_loss = {self.max_loss:g}"
        raise TrainingDiverged(
            f"training stopped at step {trainer.global_step}: the loss {why} (loss = {value:.3g}"
            f"{_task_loss(trainer)}){_largest_term(trainer)}. A regularizer weight is probably too large "
            "or the learning rate too high; lower it (or raise --max_loss if such a loss is intended).")

    # ------------------------------------------------------------------ accuracy at chance
    def chance(self) -> float | None:
        return None if not self.n_classes else 1.0 / self.n_classes

    def at_chance(self, acc: float) -> bool:
        chance = self.chance()
        return chance is not None and acc <= chance + self.chance_margin * (1 - chance)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        acc = _metric(trainer, "val/acc")
        if acc is None or self.chance() is None:
            return
        if not self.at_chance(acc):
            if self.best_val_acc is None or acc > self.best_val_acc[0]:
                self.best_val_acc = (acc, trainer.global_step)
        elif self.best_val_acc is not None:
            best, step = self.best_val_acc
            self.warn(f"validation accuracy collapsed to {acc:.3f} at step {trainer.global_step} "
                      f"(chance 1/{self.n_classes} = {self.chance():.3f}; it was {best:.3f} at step {step})")
            self.best_val_acc = None  # warn once per collapse

    def final_report(self, metrics: dict[str, float]) -> dict[str, float]:
        """Health entries for metrics.json; warns when the final accuracy is at chance."""
        chance = self.chance()
        key = next((k for k in ("test/acc", "val/acc", "train/acc") if k in metrics), None)
        if chance is None or key is None:
            return {}
        at_chance = self.at_chance(metrics[key])
        if at_chance:
            self.warn(f"final {key} = {metrics[key]:.3f} is at chance level (1/{self.n_classes} = {chance:.3f}): "
                      "the model learned nothing usable. Too few steps, a regularizer weight that dominates the "
                      "task loss, or a learning rate that is too high or too low?")
        return {"health/chance_acc": chance, "health/at_chance": float(at_chance)}

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"interp-train: warning: {message}", file=sys.stderr, flush=True)


def _output_classes(module, batch: Any) -> int | None:
    """C, the width of the model's last output dimension, from a forward pass on two examples."""
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch.get("x") if isinstance(batch, dict) else None
    if not isinstance(inputs, torch.Tensor):
        return None
    with torch.no_grad():
        was_training = module.training
        module.eval()
        try:
            out = module(inputs[:2])
        finally:
            module.train(was_training)
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.ndim >= 2 else None


def _metric(trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


def _task_loss(trainer) -> str:
    task = _metric(trainer, "reg/task_loss") or _metric(trainer, "train/loss")
    return f", task loss = {task:.3g}" if task is not None else ""


def _largest_term(trainer) -> str:
    weighted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_weighted")}
    if not weighted:
        return ""
    key = max(weighted, key=lambda k: abs(weighted[k]) if math.isfinite(weighted[k]) else math.inf)
    return f"; largest weighted regularizer term: {key} = {weighted[key]:.3g}"
