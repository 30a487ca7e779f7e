"""Argument checks shared by the regularizers: each raises with the bad value and what is allowed."""

from __future__ import annotations

import math
from typing import Iterable

from interp_train.losses import TARGET_KINDS


def check_choice(value, allowed: Iterable[str], what: str):
    """``value`` if it is one of ``allowed``, else ValueError("unknown <what> 'x'; allowed: a, b")."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return value


def check_target(target: str) -> str:
    """A target score kind of ``losses.target_score``: "loss", "logit" or "logprob"."""
    return check_choice(target, TARGET_KINDS, "target")


def check_site(at) -> str:
    """A site name (TypeError otherwise)."""
    if not isinstance(at, str) or not at:
        raise TypeError(f"at must be a site name (a non-empty string such as 'input' or 'hook_embed'), got {at!r}")
    return at


def check_layer(layer, what: str) -> str:
    """A layer name for argument ``what`` (ValueError otherwise)."""
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"{what} must name a layer (module path or TransformerLens hook name), got {layer!r}")
    return layer


def check_number(value, what: str, *, positive: bool) -> float:
    """A finite number > 0 (``positive``) or >= 0, as a float; TypeError for a non-number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (positive and number == 0):
        allowed = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be a finite number {allowed}, got {value!r}")
    return number


def check_nonnegative(value, what: str) -> float:
    """An int or float that is finite and >= 0 (ValueError for anything else, a string included)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return value


def check_count(value, what: str, minimum: int = 1) -> int:
    """An integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def check_positive_int(value, what: str) -> int:
    """An integer (not a bool) > 0, with the message "<what> must be a positive integer"."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


__all__ = ["check_choice", "check_count", "check_layer", "check_nonnegative", "check_number", "check_positive_int",
           "check_site", "check_target"]
