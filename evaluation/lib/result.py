"""The result of a LIB fit: bases per node layer and edges per section, in named bases (docs/DESIGN.md §4.7).

Named bases (``BASES``): "lib" (the Local Interaction Basis), "pca" (the PCA baseline) and
"neuron" (the unrotated layer, C = I: rib's "neuron" basis, the one in which weight sparsity
lives). ``bases[name][layer]`` is a ``LayerBasis``; ``edges[name][input layer]`` the edge matrix
E (k_{l+1}, k_l) of the section out of that layer, both ends in basis ``name``. The final node
layer is the same in every basis unless ``rotate_final`` (then LIB and PCA use its PCA basis).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from evaluation.lib.bases import LayerBasis
from evaluation.lib.config import LIBConfig

BASES = ("lib", "pca", "neuron")


@dataclass
class LIBResult:
    """Bases per node layer and edges per section (keyed by the section's input layer), per named basis.

    ``lib``, ``pca``, ``lib_edges``, ``pca_edges`` (and ``neuron``, ``neuron_edges``) are views of
    ``bases`` and ``edges``.
    """

    node_layers: list[str]
    bases: dict[str, dict[str, LayerBasis]]
    edges: dict[str, dict[str, Tensor]]      # E (k_{l+1}, k_l) float64
    config: LIBConfig
    methods: dict[str, str] = field(default_factory=dict)  # per section (input layer): closed form used, or "autograd (…)"

    @property
    def lib(self) -> dict[str, LayerBasis]:
        return self.bases["lib"]

    @property
    def pca(self) -> dict[str, LayerBasis]:
        return self.bases["pca"]

    @property
    def neuron(self) -> dict[str, LayerBasis]:
        return self.bases["neuron"]

    @property
    def lib_edges(self) -> dict[str, Tensor]:
        return self.edges["lib"]

    @property
    def pca_edges(self) -> dict[str, Tensor]:
        return self.edges["pca"]

    @property
    def neuron_edges(self) -> dict[str, Tensor]:
        return self.edges["neuron"]

    def to(self, device) -> "LIBResult":
        """The same result with every tensor on ``device``."""
        return LIBResult(self.node_layers,
                         {name: {k: b.to(device) for k, b in bases.items()} for name, bases in self.bases.items()},
                         {name: {k: torch.as_tensor(v).to(device) for k, v in edges.items()}
                          for name, edges in self.edges.items()},
                         self.config, dict(self.methods))


__all__ = ["BASES", "LIBResult"]
