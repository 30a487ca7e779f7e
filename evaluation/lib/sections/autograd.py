"""The autograd section: any section, by backward passes through the model (evaluation.lib.edges).

The reference every closed form is checked against, and the fallback where none is recognised.
M′ needs G·(k_{l+1} − 1) vector-Jacobian products per example (G groups of output positions with
disjoint input supports, edges.position_groups), or S·(k − 1) / S with ``stochastic_sources``; the
edges as many per integration point (S with ``edge_sources``), docs/DESIGN.md §4.4, §4.6, §4.11.
Rademacher probes are drawn from the fit's two streams (``ProbeStreams``), in the order the fit
visits sections and batches, so a fit is reproducible from ``LIBConfig.seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from evaluation.lib.edges import as_positions, edges_for_batch, jacobian_gram_for_batch, rademacher, section_forward
from evaluation.lib.sections.base import Basis, Batch, Rule

EDGE_SEED_OFFSET = 0x5EED  # the edge probes get a stream of their own, independent of the M′ probes


@dataclass
class ProbeStreams:
    """The CPU generators of the M′ probes and of the edge probes (the same probes on every device)."""

    gram: torch.Generator
    edges: torch.Generator

    @classmethod
    def from_seed(cls, seed: int) -> "ProbeStreams":
        return cls(torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + EDGE_SEED_OFFSET))


class AutogradSection:
    """A section l_in -> l_out of ``model`` by batched vector-Jacobian products (see the module docstring).

    config: the fit's LIBConfig (chunk_elements, stochastic_sources, stochastic_over, edge_sources).
    """

    reads = None

    def __init__(self, model: nn.Module, l_in: str, l_out: str, config, probes: ProbeStreams, why: str):
        self.model, self.l_in, self.l_out, self.config, self.probes = model, l_in, l_out, config, probes
        self.method = f"autograd ({why})"

    def check_gram(self, batch: Batch, C_out: Tensor) -> str | None:
        return None

    def check_edges(self, batch: Batch, bases: Sequence[Basis], rule: Rule) -> str | None:
        return None

    def jacobian_gram(self, batch: Batch, C_out: Tensor) -> Tensor:
        cfg = self.config
        sp = section_forward(self.model, batch.inputs, self.l_in, self.l_out)
        probes = None
        if cfg.stochastic_sources is not None:
            out = as_positions(sp.out)
            hidden = C_out.shape[1] - 1 if cfg.stochastic_over == "positions_and_hidden" else None
            probes = rademacher(cfg.stochastic_sources, out.shape[0], out.shape[1], self.probes.gram,
                                hidden).to(sp.clean.device)
        return jacobian_gram_for_batch(sp, C_out, cfg.chunk_elements, probes)

    def edges(self, batch: Batch, bases: Sequence[Basis], rule: Rule) -> tuple[list[Tensor], int]:
        cfg = self.config
        passes = [(w, section_forward(self.model, batch.inputs, self.l_in, self.l_out, alpha))
                  for alpha, w in zip(*rule)]
        clean = passes[0][1].clean
        probes = None
        if cfg.edge_sources is not None:  # one draw shared by every integration point
            out = as_positions(passes[0][1].out)
            probes = rademacher(cfg.edge_sources, out.shape[0], out.shape[1], self.probes.edges).to(clean.device)
        return edges_for_batch(passes, list(bases), cfg.chunk_elements, probes), clean.shape[0] * clean.shape[1]


__all__ = ["AutogradSection", "EDGE_SEED_OFFSET", "ProbeStreams"]
