"""Recipe 2: scikit-learn's bundled 8x8 handwritten digits (1797 images, offline, real data)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import TensorDataset

from interp_train.recipes import SplitDataModule, split_indices


class DigitsDataModule(SplitDataModule):
    """8x8 digits as (x, y): x in [0, 1]^64 (pixel / 16), y in {0..9}.

    The split is seeded by ``split_seed`` (not by the training seed), so every seed and variant
    of a recipe sees the same train/val/test examples.
    """

    task = "digits"

    def __init__(
        self,
        batch_size: Optional[int] = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = 512,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be > 0 with sum < 1"
            )
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def build(self) -> dict[str, TensorDataset]:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        train_f = 1.0 - self.val_fraction - self.test_fraction
        parts = split_indices(len(y), [train_f, self.val_fraction, self.test_fraction], self.split_seed)
        return {name: TensorDataset(x[idx], y[idx]) for name, idx in zip(("train", "val", "test"), parts)}
