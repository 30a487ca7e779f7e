"""BIMT-style neuron swaps that lower the connection cost without changing the function.

For consecutive Linear layers A (hidden neurons = its outputs, the rows of W_A and b_A) and B
(the hidden neurons are its inputs, the columns of W_B) with an *elementwise* nonlinearity σ
between them, swapping hidden neurons i and j permutes rows i, j of W_A and b_A and columns
i, j of W_B: B(σ(A x)) is unchanged (up to float summation order). Neuron positions are fixed
by index (see ``regularizers.connection_cost``), so a swap moves the neurons' weights to each
other's position and changes the cost by

    Δ(i, j) = M[i, j] + M[j, i] − M[i, i] − M[j, j],
    M[i, p] = Σ_k |W_A[i, k]| dist(p, in_k) + Σ_o |W_B[o, i]| dist(out_o, p)

(M[i, p]: the cost of neuron i's weights if it sat at position p). ``swap_neurons`` greedily
applies the most negative Δ, sweeping over the hidden layers until no swap lowers the cost
(or ``max_swaps`` swaps were made). The search terminates: every swap strictly lowers the cost.

Restriction: the structure check accepts two Linear layers that are children of the same
``nn.Sequential`` with only elementwise modules (activations, Dropout, Identity) between them.
For other models (e.g. a TransformerLens MLP) pass ``assume_elementwise=True`` after making sure
only an elementwise function sits between the two layers; otherwise a ValueError is raised.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import lightning as L
import torch
from torch import nn

from interp_train.regularizers.connection_cost import (
    ConnectionCost, Layout, check_layout, distance_matrix, linear_layers,
)

ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU,
    nn.SELU, nn.CELU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.Dropout,
)


def _parent_and_index(model: nn.Module, path: str) -> tuple[nn.Module | None, int | None]:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if isinstance(parent, nn.Sequential) and child.isdigit():
        return parent, int(child)
    return None, None


def check_consecutive(model: nn.Module, first: str, second: str, assume_elementwise: bool = False) -> None:
    """Raises ValueError unless Linear ``first`` feeds Linear ``second`` through elementwise modules only."""
    a, b = linear_layers(model, [first, second])
    if a.out_features != b.in_features:
        raise ValueError(f"layers {first!r} ({a.out_features} outputs) and {second!r} ({b.in_features} inputs) "
                         "are not consecutive: neuron swaps need the first layer's outputs to be the second's inputs")
    if assume_elementwise:
        return
    parent_a, ia = _parent_and_index(model, first)
    parent_b, ib = _parent_and_index(model, second)
    if parent_a is None or parent_a is not parent_b or ib <= ia:
        raise ValueError(f"cannot verify that {first!r} feeds {second!r} through an elementwise function (they are not "
                         "in order in one nn.Sequential); pass assume_elementwise=True if it does")
    between = [parent_a[k] for k in range(ia + 1, ib)]
    bad = [type(m).__name__ for m in between if not isinstance(m, ELEMENTWISE)]
    if bad:
        raise ValueError(f"between {first!r} and {second!r} sit non-elementwise modules {bad}; swapping neurons "
                         "would change the function (allowed in between: elementwise activations, Dropout, Identity)")


def _swap_in_place(t: torch.Tensor, i: int, j: int, dim: int) -> None:
    idx = torch.tensor([i, j], device=t.device)
    t.index_copy_(dim, idx, t.index_select(dim, idx.flip(0)))


def _swap_tensor_and_state(p: torch.Tensor, i: int, j: int, dim: int, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Swaps entries i, j along ``dim`` of a parameter, its .grad and its same-shaped optimizer state."""
    _swap_in_place(p.data, i, j, dim)
    if p.grad is not None:
        _swap_in_place(p.grad, i, j, dim)
    for opt in optimizers:
        for value in opt.state.get(p, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                _swap_in_place(value, i, j, dim)


def swap_cost_matrix(a: nn.Linear, b: nn.Linear, layout: Layout, layer_gap: float) -> torch.Tensor:
    """M (n × n), float64: M[i, p] = cost of hidden neuron i's in- and out-weights at position p."""
    n = a.out_features
    d_in = distance_matrix(n, a.in_features, layout, layer_gap).to(a.weight.device)      # (n, n_in)
    d_out = distance_matrix(b.out_features, n, layout, layer_gap).to(a.weight.device)    # (n_out, n)
    w_in = a.weight.detach().abs().to(torch.float64)
    w_out = b.weight.detach().abs().to(torch.float64)
    return w_in @ d_in.T + w_out.T @ d_out


@torch.no_grad()
def swap_neurons(model: nn.Module, layers: Sequence[str], layout: Layout = "1d", layer_gap: float = 1.0,
                 max_swaps: int | None = None, optimizers: Iterable[torch.optim.Optimizer] = (),
                 assume_elementwise: bool = False, rel_tol: float = 1e-9) -> int:
    """Greedy cost-lowering swaps of the hidden neurons between each consecutive pair of
    ``layers`` (nn.Linear module paths, in forward order); returns the number of swaps.

    Every swap strictly lowers ``connection_cost(model, layers, layout, layer_gap)`` (by more than
    rel_tol × the pair's cost) and leaves the model's function unchanged. ``max_swaps``: at most
    this many swaps in this call (default: until no swap lowers the cost). ``optimizers``: their per-parameter state (e.g. Adam moments) is
    permuted along with the weights.
    """
    check_layout(layout, layer_gap)
    optimizers = list(optimizers)
    for first, second in zip(layers, layers[1:]):
        check_consecutive(model, first, second, assume_elementwise)
    pairs = list(zip(linear_layers(model, layers), linear_layers(model, layers)[1:]))
    total, swapped = 0, True
    # swapping one hidden layer moves weights of the neighbouring ones, so sweep until a pass swaps nothing
    while swapped and (max_swaps is None or total < max_swaps):
        swapped = False
        for a, b in pairs:
            while max_swaps is None or total < max_swaps:
                cost = swap_cost_matrix(a, b, layout, layer_gap)
                own = cost.diagonal()
                delta = cost + cost.T - own.unsqueeze(0) - own.unsqueeze(1)
                i, j = divmod(int(delta.argmin()), delta.shape[1])
                if not delta[i, j] < -rel_tol * (own[i] + own[j]):
                    break
                _swap_tensor_and_state(a.weight, i, j, 0, optimizers)
                if a.bias is not None:
                    _swap_tensor_and_state(a.bias, i, j, 0, optimizers)
                _swap_tensor_and_state(b.weight, i, j, 1, optimizers)
                total, swapped = total + 1, True
    return total


class NeuronSwapCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps, calls ``swap_neurons`` on the LightningModule
    (permuting the optimizers' state too) and logs ``train/neuron_swaps`` (the running total).

    layers/layout/layer_gap: default to those of the single ``ConnectionCost`` regularizer
    attached to the module (``attach_regularizers``); otherwise pass them.
    """

    def __init__(self, every_n_steps: int = 100, layers: Sequence[str] | None = None, layout: Layout | None = None,
                 layer_gap: float | None = None, max_swaps: int | None = None, assume_elementwise: bool = False):
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.layers = list(layers) if layers is not None else None
        self.layout = layout
        self.layer_gap = layer_gap
        self.max_swaps = max_swaps
        self.assume_elementwise = assume_elementwise
        self.total_swaps = 0

    def _geometry(self, pl_module: nn.Module) -> tuple[list[str], Layout, float]:
        costs = [r for r in getattr(pl_module, "regularizers", []) if isinstance(r, ConnectionCost)]
        if self.layers is None and len(costs) != 1:
            raise ValueError(f"NeuronSwapCallback needs layers=...: found {len(costs)} ConnectionCost regularizers "
                             "on the module to take them from (need exactly one)")
        source = costs[0] if self.layers is None else None
        layers = self.layers if source is None else source.layers
        layout = self.layout or (source.layout if source is not None else "1d")
        gap = self.layer_gap if self.layer_gap is not None else (source.layer_gap if source is not None else 1.0)
        return layers, layout, gap

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers, layout, gap = self._geometry(pl_module)
        check_layout(layout, gap)
        for first, second in zip(layers, layers[1:]):
            check_consecutive(pl_module, first, second, self.assume_elementwise)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == 0 or trainer.global_step % self.every_n_steps != 0:
            return
        layers, layout, gap = self._geometry(pl_module)
        self.total_swaps += swap_neurons(pl_module, layers, layout, gap, max_swaps=self.max_swaps,
                                         optimizers=trainer.optimizers, assume_elementwise=self.assume_elementwise)
        pl_module.log("train/neuron_swaps", float(self.total_swaps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"total_swaps": self.total_swaps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_swaps = int(state_dict["total_swaps"])
