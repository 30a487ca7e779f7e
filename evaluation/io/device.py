"""Where evaluation runs: ``--device auto|cpu|cuda`` (auto = a CUDA GPU when one is present); docs/DESIGN.md §4.16."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device for ``spec`` ("auto", "cpu", "cuda" or "cuda:N"); ValueError when it is absent."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if isinstance(spec, str) and (spec == "cuda" or spec.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} is not available: this machine has no CUDA GPU usable by torch "
                             f"(torch.cuda.is_available() is False); use 'cpu' or 'auto'")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} is not available: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return device
    raise ValueError(f"unknown device {spec!r}; use one of {DEVICES} (or 'cuda:N')")


__all__ = ["DEVICES", "resolve_device"]
