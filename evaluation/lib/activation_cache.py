"""Activations kept between LIB's passes over the data, under a memory budget.

A closed-form section (evaluation.lib.sections) needs only the activation at its input site,
every position, float64. The moments pass computes those activations anyway, so it keeps them
here while their total stays within ``budget_bytes``; the Jacobian-Gram and edge passes then read
them instead of running the model again (one forward pass over the data instead of 1 + 2 per
section). Past the budget the cache empties itself and every pass runs the model as before, so
memory stays bounded for any dataset size; the results are the same either way.
"""

from __future__ import annotations

from torch import Tensor

DEFAULT_BUDGET_BYTES = 2 ** 29  # 512 MiB


class ActivationCache:
    """{site: [activation (B, T, d) float64 of batch 0, 1, ...]} while within ``budget_bytes``."""

    def __init__(self, sites, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.sites = list(dict.fromkeys(sites))
        self.budget = budget_bytes
        self.used = 0
        self.store: dict[str, list[Tensor]] | None = {site: [] for site in self.sites} if self.sites else None

    def add(self, site: str, activation: Tensor) -> None:
        if self.store is None:
            return
        self.used += activation.numel() * activation.element_size()
        if self.used > self.budget:
            self.store = None  # over budget: the passes run the model instead
            return
        self.store[site].append(activation)

    def get(self, site: str) -> list[Tensor] | None:
        """The activations of every batch at ``site``, or None (not cached or over budget)."""
        return None if self.store is None else self.store.get(site)


__all__ = ["ActivationCache", "DEFAULT_BUDGET_BYTES"]
