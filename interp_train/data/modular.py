"""Recipe 1: modular addition, tokens (a, b, =) -> (a + b) mod p (Nanda et al.; the LIB paper)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import TensorDataset

from interp_train.recipes import SplitDataModule, split_indices


def modular_addition_table(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p^2 pairs: tokens (p^2, 3) = [a, b, p] (token p is "="), targets (p^2,) = (a + b) mod p."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


class ModularAdditionDataModule(SplitDataModule):
    """A seeded random ``train_fraction`` of all p^2 pairs for training, the rest for val and test.

    Val and test are the same held-out pairs (the grokking measurement is accuracy on all pairs
    not trained on). Vocabulary: p + 1 tokens in, p classes out. Default: full batch.
    """

    task = "modular_addition"

    def __init__(
        self,
        p: int = 113,
        train_fraction: float = 0.3,
        batch_size: Optional[int] = None,
        split_seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = None,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        if p < 2:
            raise ValueError(f"p must be an integer >= 2, got {p!r}")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
        self.p = p
        self.train_fraction = train_fraction
        self.split_seed = split_seed

    def build(self) -> dict[str, TensorDataset]:
        tokens, targets = modular_addition_table(self.p)
        train, held_out = split_indices(len(targets), [self.train_fraction, 1 - self.train_fraction], self.split_seed)
        held = TensorDataset(tokens[held_out], targets[held_out])
        return {"train": TensorDataset(tokens[train], targets[train]), "val": held, "test": held}
