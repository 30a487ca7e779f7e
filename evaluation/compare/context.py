"""``RunContext``: what the compare metrics of one run share, computed once and only on demand.

A metric's ``measure(ctx)`` asks the context for what it needs — the loaded model and data
module, the train/test tensors, the LIB fit and its summary, the tangent spaces — and the
context computes each of these the first time any metric asks (``functools.cached_property``).
Shared computations that leave details or notes for the report (the LIB fit: node layers and
cumulative edge curves; the embedding tangents of token models: their k, d, baseline) record
them under their own name; the measuring code (evaluation.compare.measure) attributes to a
metric the details of every shared computation it used, so a metric's cached record is complete
on its own, whichever metric happened to trigger the computation.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import numpy as np
import torch

from evaluation.compare.data import batches, split_tensors, subset
from evaluation.compare.options import MeasureOptions
from evaluation.compare.runs import Run

CURVE_POINTS = 200  # cumulative edge-weight curves are stored at this many log-spaced ranks


class RunContext:
    """One run under ``options``; lazily loaded and shared by every metric measured on it.

    Attributes for metrics: ``run``, ``options``, ``progress`` and the cached properties
    ``module`` (eval mode), ``datamodule`` (set up for "fit"), ``task``, ``train`` / ``test``
    (tuples of all tensors of the split), ``eval_set`` (seeded ``max_samples`` test subset),
    ``node_layers``, ``lib`` (``fit_lib`` result), ``lib_summary`` (``summarize`` of it),
    ``tangents`` ((provider, site)). ``batches(tensors)`` cuts tensors into ``batch_size`` rows.
    """

    def __init__(self, run: Run, options: MeasureOptions, progress: bool = False):
        self.run = run
        self.options = options
        self.progress = progress
        self.used: set[str] = set()  # shared computations read since the last reset (see measure)
        self.shared_details: dict[str, dict[str, Any]] = {}
        self.shared_notes: dict[str, list[str]] = {}

    def _use(self, name: str, details: dict | None = None, notes: list[str] | None = None) -> None:
        self.used.add(name)
        if details is not None:
            self.shared_details[name] = details
        if notes is not None:
            self.shared_notes[name] = notes

    def batches(self, tensors: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
        return batches(tensors, self.options.batch_size)

    @cached_property
    def _loaded(self):
        from evaluation.io.checkpoints import load_checkpoint
        from evaluation.io.device import resolve_device

        device = resolve_device(self.options.device)
        loaded = load_checkpoint(self.run.checkpoint)
        if loaded.datamodule is None:
            raise ValueError(f"{str(self.run.checkpoint)!r} carries no data module; compare needs recipe checkpoints")
        loaded.datamodule.setup("fit")
        return loaded.model.to(device).eval(), loaded.datamodule

    @property
    def device(self) -> torch.device:
        """The device the run is measured on (``options.device``); the split tensors are moved there."""
        from evaluation.lib.fit import model_device

        return model_device(self.module)

    @property
    def module(self):
        return self._loaded[0]

    @property
    def datamodule(self):
        return self._loaded[1]

    @cached_property
    def task(self) -> str:
        return getattr(self.datamodule, "task", type(self.datamodule).__name__)

    @cached_property
    def train(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in split_tensors(self.datamodule, "train"))

    @cached_property
    def test(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device) for t in split_tensors(self.datamodule, "test"))

    @cached_property
    def eval_set(self) -> tuple[torch.Tensor, ...]:
        """``max_samples`` test examples (seeded subset) for alignment and robustness."""
        return subset(self.test, self.options.max_samples, self.options.seed)

    @cached_property
    def node_layers(self) -> list[str]:
        opts = self.options
        if opts.node_layers:
            return list(opts.node_layers)
        from evaluation.lib.positions import loss_reads_last_position

        train = self.train
        return default_node_layers(self.module, last_position=len(train) > 1 and loss_reads_last_position(train[1]))

    @property
    def lib(self):
        """``fit_lib`` on ``max_samples`` training inputs (seeded subset); details: node_layers, edge_curves."""
        result = self._lib
        self._use("lib")
        return result

    @cached_property
    def _lib(self):
        from evaluation.lib.fit import LIBConfig, fit_lib

        opts = self.options
        layers = self.node_layers
        lib_data = [b[:1] for b in self.batches(subset(self.train, opts.max_samples, opts.seed))]
        config = LIBConfig(truncation=opts.truncation, seed=opts.seed, stochastic_sources=opts.lib_sources,
                           stochastic_over="positions_and_hidden" if opts.lib_sources else "positions",
                           edge_sources=opts.lib_edge_sources, jacobian_dtype=opts.lib_jacobian_dtype)
        result = fit_lib(self.module, lib_data, layers, config, progress=self.progress)
        self.shared_details["lib"] = {"node_layers": layers,
                                      "edge_curves": {l: cumulative_curve(result.lib_edges[l]) for l in layers[:-1]}}
        return result

    @property
    def lib_summary(self) -> dict:
        """``evaluation.metrics.lib_summary.summarize`` of ``lib`` (edges, layers, modularity)."""
        self._use("lib")
        return self._lib_summary

    @cached_property
    def _lib_summary(self) -> dict:
        from evaluation.metrics.lib_summary import summarize

        return summarize(self._lib, seed=self.options.seed)

    @property
    def tangents(self):
        """(tangent provider, site): at the input from the data module (``options.tangents``), or for
        token inputs at "hook_embed" from local PCA of the training embeddings (details: tangents)."""
        value = self._tangents
        self._use("tangents")
        return value

    @cached_property
    def _tangents(self):
        from evaluation.compare.tangents import EMBED_SITE, embedding_tangents, tangent_provider

        if torch.is_floating_point(self.eval_set[0]):
            return tangent_provider(self.datamodule, self.options.tangents), "input"
        provider, info = embedding_tangents(self.module, self.train[0], self.options)
        self.shared_details["tangents"] = {"tangents": info}
        self.shared_notes["tangents"] = [
            f"token inputs: alignment and robustness at site {EMBED_SITE} with local-PCA tangents of the "
            f"training embeddings (k = {info['k']} of d = {info['d']}, random baseline {info['baseline']:.3g})"]
        return provider, EMBED_SITE


def default_node_layers(module, last_position: bool = False) -> list[str]:
    """LIB node layers of a recipe module: MLP → "input", every hidden activation, "output";
    SmallCNN → "input", each conv block's pooled output (one position of all its units), the
    head's hidden activation, "output"; TransformerLens model → resid_pre, resid_mid/resid_post of
    each block, "output", with the layers after the last attention at position -1 when
    ``last_position`` (one target per sequence, e.g. modular addition:
    evaluation.lib.positions.residual_layers)."""
    from torch import nn

    from evaluation.lib.positions import residual_layers
    from interp_train.models.mlp import MLP, SmallCNN

    for name, sub in module.named_modules():
        if isinstance(sub, MLP):
            acts = [f"{name}.layers.{i}" for i, m in enumerate(sub.layers) if not isinstance(m, nn.Linear)]
            return ["input", *acts, "output"]
        if isinstance(sub, SmallCNN):
            pools = [f"{name}.features.{i}" for i, m in enumerate(sub.features) if isinstance(m, nn.MaxPool2d)]
            hidden = [f"{name}.head.{i}" for i, m in enumerate(sub.head) if isinstance(m, nn.ReLU)]
            return ["input", *pools, *hidden, "output"]
        n_layers = getattr(getattr(sub, "cfg", None), "n_layers", None)
        if isinstance(n_layers, int) and isinstance(getattr(sub, "hook_dict", None), dict):
            return residual_layers(n_layers, last_position)
    raise ValueError(f"cannot choose LIB node layers for {type(module).__name__}; pass node_layers (--layers)")


def cumulative_curve(E, points: int = CURVE_POINTS) -> dict[str, list]:
    """c_n = (sum of the n largest non-constant edges)/(their total) at ≤ ``points`` log-spaced n."""
    from evaluation.lib.plots import cumulative_edge_weight

    c = cumulative_edge_weight(E)
    if c.size == 0:
        return {"n": [], "c": []}
    ns = np.unique(np.round(np.geomspace(1, c.size, num=min(points, c.size))).astype(int))
    return {"n": ns.tolist(), "c": [float(v) for v in c[ns - 1]]}


def finite_or_none(x) -> float | None:
    """float(x) when finite, else None (the report shows "–")."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


