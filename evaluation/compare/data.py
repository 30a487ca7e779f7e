"""The tensors of a run's data: whole splits, seeded subsets, fixed-size batches."""

from __future__ import annotations

from typing import Mapping

import torch


def split_tensors(datamodule, split: str) -> tuple[torch.Tensor, ...]:
    """All tensors of a split: from ``datamodule.splits`` when it has them, else from its loader."""
    splits = getattr(datamodule, "splits", None)
    if isinstance(splits, Mapping) and split in splits and hasattr(splits[split], "tensors"):
        return tuple(splits[split].tensors)
    loader = getattr(datamodule, f"{split}_dataloader")()
    parts = [b if isinstance(b, (tuple, list)) else (b,) for b in loader]
    return tuple(torch.cat(col) for col in zip(*parts))


def subset(tensors: tuple[torch.Tensor, ...], n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded random subset of ``n`` rows (all rows, in order, when there are at most ``n``)."""
    if tensors[0].shape[0] <= n:
        return tensors
    idx = torch.randperm(tensors[0].shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return tuple(t[idx] for t in tensors)


def batches(tensors: tuple[torch.Tensor, ...], batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Consecutive batches of ``batch_size`` rows (the last one may be shorter)."""
    n = tensors[0].shape[0]
    return [tuple(t[i:i + batch_size] for t in tensors) for i in range(0, n, batch_size)]
