"""Small models and data shared by tests."""

from __future__ import annotations

import torch
import lightning as L
from torch import nn
from torch.nn import functional as F

from interp_train import regularized_loss
from interp_train.regularizers.base import Regularizer


class ActivationL2(Regularizer):
    """Test-only: mean_i ||a_i||^2 at one site."""

    def __init__(self, at="input", weight=1.0, name=None):
        super().__init__(weight, name)
        self.at = at

    def terms(self, ctx):
        a = ctx.activation(self.at)
        return {"l2": a.pow(2).flatten(1).sum(1).mean()}


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


def digits(n_train: int = 1024, n_test: int = 512):
    """scikit-learn's 8x8 digits scaled to [0, 1]: (x, y) train and held-out splits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return (x[:n_train], y[:n_train]), (x[n_train:n_train + n_test], y[n_train:n_train + n_test])


def train_digits(regs, steps: int = 150, seed: int = 0) -> nn.Sequential:
    """Adam on an MLP 64-32-32-10 (digits, batch 128) through ``regularized_loss``; returns the model."""
    (x, y), _ = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        regularized_loss(model, x[idx], y[idx], regs).total.backward()
        opt.step()
    return model


class SideBranch(nn.Module):
    """A module whose 'side' layer runs but does not reach the output (no gradient path)."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(4, 3)
        self.side = nn.Linear(4, 2)

    def forward(self, x):
        self.side(x)
        return self.main(x)


def model_at_a_freed_id(make, remember):
    """(first model's remembered value, a second model that CPython placed at the first's freed id), or
    None when no reuse was seen in 500 tries. ``remember(model)`` runs on the first model before it is
    freed (e.g. a regularizer caching its parameters); the test then checks the cache on the second."""
    import gc
    for _ in range(500):
        first = make()
        freed_id, kept = id(first), remember(first)
        del first
        gc.collect()
        second = make()
        if id(second) == freed_id:
            return kept, second
    return None
