"""The edge pass of a LIB fit: E (k_{l+1}, k_l) per section in every named basis (docs/DESIGN.md §4.6).

E_ij = 1/(N·P) ∑_x ∑_t (∑_α w_α ∑_s ∂ĥ_{t,i}(αf̂)/∂f̂_{s,j} f̂_{s,j}(x))², f̂ = [1, f^l] C^l and
ĥ = f^{l+1} C^{l+1} in the same named basis (lib, pca, neuron, ...); the rule (α, w_α) is
``LIBConfig.integration``. Every section computes all bases from one pass over its batch (the
autograd section shares its backward passes between them). A section is first checked on the
first batch (``Section.check_edges``) and replaced by autograd where it fails.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from evaluation.lib.bases import LayerBasis, Reduce
from evaluation.lib.edges import integration_rule
from evaluation.lib.passes import DataPasses
from evaluation.lib.sections import ProbeStreams, Section, fall_back


def compute_edges(sections: list[Section], passes: DataPasses, bases: Mapping[str, Mapping[str, LayerBasis]],
                  config, probes: ProbeStreams, rows: Mapping[str, int] | None = None,
                  reduce: Reduce | None = None) -> dict[str, dict[str, Tensor]]:
    """{basis name: {section input layer: E}}; ``sections`` is updated in place where a check fails.

    bases: {name: {node layer: LayerBasis}} (every node layer of the sections); rows: N·P per node
    layer (the normaliser, over all processes), counted from the data when None; reduce: applied
    to each section's edge sums and row count (see ``fit_lib``). Runs on the device of ``passes``.
    """
    device = passes.device
    names = list(bases)
    rule = integration_rule(config.integration, config.n_intervals)
    on = lambda t: t.to(device)  # noqa: E731
    triples = {s.l_in: [(on(bases[n][s.l_in].C), on(bases[n][s.l_in].C_pinv), on(bases[n][s.l_out].C))
                        for n in names] for s in sections}
    first = None
    for index, section in enumerate(sections):  # every closed form checked against autograd on the first batch
        if section.reads is None:
            continue
        first = first or passes.first()
        problem = section.check_edges(first, triples[section.l_in], rule)
        if problem:
            sections[index] = fall_back(section, problem, config, probes)
    sums: dict[str, list] = {s.l_in: [0.0] * len(names) for s in sections}
    counted = {s.l_in: 0 for s in sections}
    for batch in passes.batches(sections, "LIB edges"):
        for section in sections:
            parts, n_rows = section.edges(batch, triples[section.l_in], rule)
            sums[section.l_in] = [acc + part for acc, part in zip(sums[section.l_in], parts)]
            counted[section.l_in] += n_rows
    if reduce is not None:
        for l_in in sums:
            sums[l_in] = [reduce(torch.as_tensor(acc, dtype=torch.float64, device=device)) for acc in sums[l_in]]
            counted[l_in] = int(reduce(torch.tensor(float(counted[l_in]), dtype=torch.float64, device=device)).item())
    norm = rows if rows is not None else counted
    return {name: {l_in: sums[l_in][b] / norm[l_in] for l_in in sums} for b, name in enumerate(names)}


def sections_of(node_layers: Sequence[str]) -> list[tuple[str, str]]:
    """(l_in, l_out) of consecutive node layers."""
    return list(zip(node_layers[:-1], node_layers[1:]))


__all__ = ["compute_edges", "sections_of"]
