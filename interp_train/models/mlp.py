"""Plain MLP and a small CNN for the recipe data sets."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class MLP(nn.Module):
    """f(x) = W_L σ(... σ(W_1 flatten(x) + b_1) ...) + b_L.

    Layers are ``layers.0`` (Linear), ``layers.1`` (activation), ...; e.g. site
    ``model.layers.1`` is the first hidden activation inside a RecipeModule.
    """

    def __init__(self, d_in: int = 64, hidden: list[int] = [64, 64], d_out: int = 10,
                 activation: Literal["relu", "tanh", "gelu"] = "relu"):
        super().__init__()
        dims = [d_in, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), _activation(activation)]
        layers.append(nn.Linear(dims[-1], d_out))
        self.layers = nn.Sequential(*layers)
        self.d_in = d_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.d_in:
            raise ValueError(f"MLP expects inputs with {self.d_in} features, got {tuple(x.shape)}")
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two conv blocks (conv 3x3, ReLU, max-pool 2) then an MLP head; for 28x28 or 32x32 images."""

    def __init__(self, in_channels: int = 3, channels: list[int] = [32, 64], hidden: int = 128,
                 n_classes: int = 10, image_size: int = 32):
        super().__init__()
        blocks: list[nn.Module] = []
        c, size = in_channels, image_size
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, size = out, size // 2
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
