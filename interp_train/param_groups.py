"""Optimizer parameter groups that honour what a regularizer asks of its own parameters.

A regularizer that adds parameters to the model (HardConcreteL0's log α) marks them with two
attributes, read here and nowhere else:

* ``no_weight_decay`` (True): the group's weight decay is 0 (decaying log α would pull every gate
  towards half open, whatever the task);
* ``lr_scale`` (a float > 0): the group's learning rate is ``lr · lr_scale``. With Adam a parameter
  moves by about lr per step whatever its gradient's size, so a gate started at log α = 2 needs
  ~(2 + 2.4) / lr steps to close (1470 at lr 3e-3); scaling its learning rate is how it closes
  within a short run (benchmarks/l0_calibration.py).

Plain loop: ``torch.optim.AdamW(param_groups(model.parameters(), lr=3e-3, weight_decay=1.0), lr=3e-3)``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def _lr_scale(param: torch.Tensor) -> float:
    scale = getattr(param, "lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"a parameter of shape {tuple(param.shape)} has lr_scale {scale!r}; allowed: a finite "
                         "number > 0")
    return float(scale)


def param_groups(params: Iterable[torch.Tensor], lr: float, weight_decay: float) -> list[dict]:
    """One group per distinct (weight decay, learning rate), in first-seen order: parameters without
    the attributes form the first group (``lr``, ``weight_decay``)."""
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = (0.0 if getattr(p, "no_weight_decay", False) else float(weight_decay), float(lr) * _lr_scale(p))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": group_lr} for (wd, group_lr), ps in groups.items()]
