"""Connection cost (BIMT: Liu, Gan & Tegmark 2023, "Seeing is believing"), docs/DESIGN.md §3.7.

Every chosen ``nn.Linear`` layer W (out × in) connects its input neurons to its output
neurons. Neurons get fixed positions by their index: the n neurons of one side lie in the unit
interval (``layout="1d"``: p_k = (k + ½)/n) or on a near-square grid in the unit square
(``layout="2d"``: c = ceil(sqrt n) columns, r = ceil(n/c) rows, p_k = ((k mod c + ½)/c,
(⌊k/c⌋ + ½)/r)); the output side sits ``layer_gap`` above the input side. The distance is

    dist(i, j) = sqrt(||p_i − p_j||² + layer_gap²)     (i an output neuron, j an input neuron)

and the penalty is Σ_layers Σ_ij |W_ij| · dist(i, j) (biases are free). With layer_gap > 0 it
is at least layer_gap times the L1 norm of the weights, plus a locality part that favours
short connections; ``callbacks.neuron_swap`` permutes hidden neurons to lower it further.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import nn

from interp_train.checks import check_choice, check_nonnegative
from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.schedules import WeightLike
from interp_train.sites import resolve_site

Layout = Literal["1d", "2d"]
LAYOUTS = ("1d", "2d")


def check_layout(layout: str, layer_gap: float) -> None:
    check_choice(layout, LAYOUTS, "layout")
    check_nonnegative(layer_gap, "layer_gap")


def neuron_positions(n: int, layout: Layout = "1d") -> torch.Tensor:
    """(n, 1) positions (k + ½)/n for "1d"; (n, 2) grid positions in the unit square for "2d"."""
    k = torch.arange(n, dtype=torch.float64)
    if layout == "1d":
        return ((k + 0.5) / n).unsqueeze(1)
    if layout == "2d":
        cols = math.ceil(math.sqrt(n))
        rows = math.ceil(n / cols)
        return torch.stack([(k % cols + 0.5) / cols, (torch.div(k, cols, rounding_mode="floor") + 0.5) / rows], dim=1)
    raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")


def distance_matrix(n_out: int, n_in: int, layout: Layout = "1d", layer_gap: float = 1.0) -> torch.Tensor:
    """(n_out, n_in) float64: dist(i, j) = sqrt(||p_out_i − p_in_j||² + layer_gap²)."""
    diff = neuron_positions(n_out, layout).unsqueeze(1) - neuron_positions(n_in, layout).unsqueeze(0)
    return (diff.pow(2).sum(-1) + layer_gap ** 2).sqrt()


def linear_layers(model: nn.Module, layers: Sequence[str]) -> list[nn.Linear]:
    """The ``nn.Linear`` modules at the given module paths (KeyError for unknown names)."""
    if isinstance(layers, str) or not layers:
        raise ValueError(f"layers must be a non-empty list of nn.Linear module paths, got {layers!r}")
    modules = []
    for name in layers:
        module = resolve_site(model, name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"connection cost needs nn.Linear layers, but {name!r} is a {type(module).__name__}")
        modules.append(module)
    return modules


def layer_cost(linear: nn.Linear, layout: Layout = "1d", layer_gap: float = 1.0) -> torch.Tensor:
    """Σ_ij |W_ij| · dist(i, j) for one Linear layer (in the weight's dtype)."""
    w = linear.weight
    dist = distance_matrix(w.shape[0], w.shape[1], layout, layer_gap).to(device=w.device, dtype=w.dtype)
    return (w.abs() * dist).sum()


def connection_cost(model: nn.Module, layers: Sequence[str], layout: Layout = "1d",
                    layer_gap: float = 1.0) -> torch.Tensor:
    """Σ over the named Linear layers of Σ_ij |W_ij| · dist(i, j)."""
    check_layout(layout, layer_gap)
    return sum(layer_cost(lin, layout, layer_gap) for lin in linear_layers(model, layers))


class ConnectionCost(Regularizer):
    """Term ``cost`` = Σ_layers Σ_ij |W_ij| · dist(i, j) (module docstring); a weight penalty, so
    it reads no activations. ``layers``: module paths of nn.Linear layers, relative to the model
    the regularizer is attached to (e.g. "net.0"). The sum grows with the number of weights:
    choose ``weight`` accordingly. Pair with ``NeuronSwapCallback`` for BIMT-style swaps.
    """

    def __init__(self, weight: WeightLike = 1.0, layers: Sequence[str] = (), layout: Layout = "1d",
                 layer_gap: float = 1.0, name: str | None = None):
        super().__init__(weight, name)
        check_layout(layout, layer_gap)
        if isinstance(layers, str) or not layers:
            raise ValueError(f"layers must be a non-empty list of nn.Linear module paths, got {layers!r}")
        self.layers = list(layers)
        self.layout = layout
        self.layer_gap = float(layer_gap)
        self.at = []
        self._distances: dict[tuple, torch.Tensor] = {}

    def setup(self, model: nn.Module, datamodule=None) -> None:
        linear_layers(model, self.layers)  # fail early on bad names or non-Linear layers

    def _distance(self, w: torch.Tensor) -> torch.Tensor:
        key = (tuple(w.shape), w.device, w.dtype)
        if key not in self._distances:
            self._distances[key] = distance_matrix(w.shape[0], w.shape[1], self.layout, self.layer_gap).to(
                device=w.device, dtype=w.dtype)
        return self._distances[key]

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        weights = [lin.weight for lin in linear_layers(ctx.model, self.layers)]
        return {"cost": sum((w.abs() * self._distance(w)).sum() for w in weights)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layers={self.layers}, layout={self.layout!r}, layer_gap={self.layer_gap}"
