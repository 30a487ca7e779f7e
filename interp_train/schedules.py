"""Weight schedules for regularizers: constant, linear warm-up, cosine.

A schedule is a pure function of the training step; the step itself is state kept by the
regularizer that owns the schedule (saved in checkpoints through ``Regularizer.get_extra_state``).
"""

from __future__ import annotations

import math
from typing import Union


def _check_weight(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def _check_steps(value: int, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Schedule:
    """Base class: ``schedule(step) -> weight``."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """w(step) = value."""

    def __init__(self, value: float = 1.0):
        self.value = _check_weight(value, "weight")

    def __call__(self, step: int) -> float:
        return self.value


class LinearWarmup(Schedule):
    """w(step) = start + (value - start) * min(1, step / warmup_steps)."""

    def __init__(self, value: float = 1.0, warmup_steps: int = 100, start: float = 0.0):
        self.value = _check_weight(value, "weight")
        self.start = _check_weight(start, "start weight")
        self.warmup_steps = _check_steps(warmup_steps, "warmup_steps")

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0 or step >= self.warmup_steps:
            return self.value
        return self.start + (self.value - self.start) * step / self.warmup_steps


class Cosine(Schedule):
    """Linear warm-up to ``value`` over ``warmup_steps``, then cosine decay to ``final`` at ``total_steps``.

    w(step) = final + (value - final) * (1 + cos(pi * t)) / 2,  t = (step - warmup) / (total - warmup).
    """

    def __init__(self, value: float = 1.0, total_steps: int = 1000, warmup_steps: int = 0, final: float = 0.0):
        self.value = _check_weight(value, "weight")
        self.final = _check_weight(final, "final weight")
        self.total_steps = _check_steps(total_steps, "total_steps", minimum=1)
        self.warmup_steps = _check_steps(warmup_steps, "warmup_steps")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.value * step / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.final + (self.value - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))


WeightLike = Union[float, int, Schedule]


def as_schedule(weight: WeightLike) -> Schedule:
    """A number becomes ``Constant(number)``; a schedule is returned as is."""
    if isinstance(weight, Schedule):
        return weight
    if isinstance(weight, bool):
        raise TypeError(f"weight must be a number or a Schedule, got {weight!r}")
    if isinstance(weight, (int, float)):
        return Constant(weight)
    raise TypeError(
        f"weight must be a number or a Schedule (Constant, LinearWarmup, Cosine), got {weight!r}"
    )
