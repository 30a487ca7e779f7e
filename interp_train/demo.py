"""`make demo`: train an MLP on scikit-learn's 8x8 digits with and without a regularizer.

Prints, for each variant, the final task loss, the input-gradient-norm penalty
mean_i ||∇_x ℓ_i||² on held-out data, and the test accuracy. Offline and CPU-only.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from interp_train import attach_regularizers
from interp_train.regularizers.smoothness import GradientNorm


def digits_loaders(batch_size: int = 128, seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    make = lambda idx, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        torch.utils.data.TensorDataset(x[idx], y[idx]), batch_size=batch_size, shuffle=shuffle)
    return make(train, True), (x[test], y[test])


class DigitsMLP(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about regularizers."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/task_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def input_gradient_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """mean_i ||∇_x ℓ(x_i, y_i)||² on the given data."""
    x = x.clone().requires_grad_(True)
    losses = F.cross_entropy(model(x), y, reduction="none")
    (grad,) = torch.autograd.grad(losses.sum(), x)
    return float(grad.pow(2).sum(1).mean())


def run(epochs: int, weight: float, seed: int = 0) -> list[dict]:
    rows = []
    for variant, regs in [("baseline", []), (f"grad_norm (w={weight:g})", [GradientNorm(weight=weight)])]:
        L.seed_everything(seed, verbose=False)
        train, (x_test, y_test) = digits_loaders(seed=seed)
        model = DigitsMLP()
        if regs:
            attach_regularizers(model, regs)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_model_summary=False)
        trainer.fit(model, train)
        model.eval()
        with torch.no_grad():
            logits = model(x_test)
        rows.append({
            "variant": variant,
            "task_loss": float(F.cross_entropy(logits, y_test)),
            "grad_penalty": input_gradient_penalty(model, x_test, y_test),
            "accuracy": float((logits.argmax(-1) == y_test).float().mean()),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--weight", type=float, default=1.0, help="weight of the gradient-norm penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = run(args.epochs, args.weight, args.seed)
    print("\nDigits MLP, held-out data (360 images):")
    print(f"{'variant':<24} {'task loss':>10} {'mean ||grad_x loss||^2':>24} {'accuracy':>9}")
    for r in rows:
        print(f"{r['variant']:<24} {r['task_loss']:>10.4f} {r['grad_penalty']:>24.4f} {r['accuracy']:>9.3f}")


if __name__ == "__main__":
    main()
