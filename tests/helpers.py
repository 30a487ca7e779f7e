"""Small models and data shared by tests."""

from __future__ import annotations

import torch
import lightning as L
from torch import nn
from torch.nn import functional as F


def tiny_mlp(d_in: int = 6, d_hidden: int = 8, d_out: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out))


class PlainClassifier(L.LightningModule):
    """An ordinary LightningModule, written without knowledge of interp-train."""

    def __init__(self, d_in: int = 6, n_classes: int = 3, lr: float = 0.05):
        super().__init__()
        self.net = tiny_mlp(d_in, 8, n_classes)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def toy_loader(n: int = 64, d_in: int = 6, n_classes: int = 3, batch_size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    defaults.update(kwargs)
    return L.Trainer(**defaults)
