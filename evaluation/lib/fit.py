"""Fit the Local Interaction Basis (LIB, "jacobian" variant) and a PCA baseline (docs/DESIGN.md §4).

For each node layer l (activation f, viewed as (B, P, d)) with augmented activation a = [1, f]:

1. μ = mean of f over examples and positions; Y = [[1, −μ], [0, I]] centres (a Y = [1, f − μ]);
   G = blockdiag(1, Cov(f)) — the constant keeps its own unit-eigenvalue direction.
2. Cov(f) = U D Uᵀ (float64 eigh), drop D ≤ truncation·max D; U_full = blockdiag(1, U),
   D_full = [1, D]; R = Y U_full D_full^{-1/2}, R⁺ = D_full^{1/2} U_fullᵀ Y⁻¹ (so Rᵀ G_raw R = I,
   G_raw = E[aᵀa]).
3. M′ = the Jacobian Gram of ĥ = f^{l+1} C^{l+1} w.r.t. f (``Section.jacobian_gram``), padded
   with a zero constant row/column.
4. M = R⁺ M′ R⁺ᵀ. The constant direction is kept first as its own direction (Λ_0 = M_00, the
   derivative along the mean); M[1:, 1:] = V Λ Vᵀ sorted descending, Λ ≤ truncation·max Λ dropped.
   C = R V Λ^{1/2}, C⁺ = Λ^{-1/2} Vᵀ R⁺, so Cᵀ G_raw C = diag(Λ), C⁺ C = I, and LIB features
   f̂ = a C have f̂_0 = sqrt(Λ_0) (constant) and mean 0 for every other feature.
   If Λ_0 ≤ truncation·max Λ (no derivative along the mean), the constant column is left
   unscaled (f̂_0 = 1) so that C⁺ stays finite; Lambda[0] still reports M_00.
5. Edges (edges_pass.compute_edges, ``Section.edges``): gradient, trapezoid or Gauss–Legendre
   rule, in every named basis: LIB, PCA and the neuron basis (evaluation.lib.result).
6. PCA baseline: C = Y U_full (no whitening), Lambda = D_full (1 for the constant, then variances).

The final node layer is kept in the neuron basis (C = I, Lambda = E[a_k²]) unless
``rotate_final``, in which case LIB and PCA both use its PCA basis. Steps 1, 2, 4, 6 are
bases.py; the passes over the data passes.py; sections (what maps one node layer to the next)
are chosen once each by evaluation.lib.sections and used through their protocol only.

Cost: sections that evaluation.lib.sections recognises (``jacobians="auto"``, the default) are
computed in closed form, checked against autograd on the first batch. By autograd, per section,
M′ needs G·(k_{l+1} − 1) vector-Jacobian products per example, where G ≤ T_out is the number of
groups of output positions with disjoint input supports (edges.position_groups: 1 for a
position-wise section such as an MLP or the unembedding, T_out for causal attention); with
``stochastic_sources=S`` it needs S·(k − 1) ("positions") or S ("positions_and_hidden"). The edges
need as many again per integration point (G, or S with ``edge_sources=S``; the named bases share
them: at most G·d_{l+1}). Each is one backward pass of the section (the forward stops at its output
layer), so the time grows linearly with the samples and roughly with width³; memory is bounded
by the batch size and ``chunk_elements``.
"""

from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor, nn

from interp_train.sites import eval_mode, resolve_site
from evaluation.lib.activation_cache import ActivationCache
from evaluation.lib.bases import (  # noqa: F401 - DegenerateLayerError: re-exported
    DegenerateLayerError, LayerBasis, Moments, Reduce, lib_basis, neuron_basis, pca_basis, reduced_moments,
)
from evaluation.lib.config import LIBConfig
from evaluation.lib.edges import OUTPUT
from evaluation.lib.edges_pass import compute_edges, sections_of
from evaluation.lib.passes import DataPasses, gather_moments, model_device, section_model
from evaluation.lib.positions import split_layer
from evaluation.lib.result import BASES, LIBResult
from evaluation.lib.sections import ClosedFormFallbackWarning, ProbeStreams, choose_section, fall_back


def _check_inputs(model: nn.Module, data: Iterable, node_layers: list[str]) -> None:
    """Re-iterable data; layer names, sites and index syntax (the index range is checked on the
    first batch, _gather_moments)."""
    if iter(data) is data:
        raise TypeError("data must be re-iterable (e.g. a DataLoader or a list of batches), not an iterator")
    if not isinstance(node_layers, (list, tuple)) or len(node_layers) < 2:
        raise ValueError(f"node_layers must list at least two layers, got {node_layers!r}")
    if len(set(node_layers)) != len(node_layers):
        raise ValueError(f"node_layers contains duplicates: {node_layers!r}")
    sites = [split_layer(name)[0] for name in node_layers]  # ValueError for a malformed position index
    for name, site in zip(node_layers[:-1], sites):
        if site == OUTPUT:
            raise ValueError(f"'output' (the model's logits) can only be the last node layer, got {node_layers!r}")
        resolve_site(model, site)  # KeyError listing the available names
    if sites[-1] != OUTPUT:
        resolve_site(model, sites[-1])


def fit_lib(model: nn.Module, data: Iterable, node_layers: list[str], config: LIBConfig = LIBConfig(),
            input_fn: Callable | None = None, progress: bool = True, reduce: Reduce | None = None) -> LIBResult:
    """Fits LIB and PCA bases for ``node_layers`` (forward order; "output" = the logits) and edges.

    data: re-iterable batches (tensors, or tuples whose first element is the model input;
    ``input_fn(batch)`` overrides that). Passes: one for moments, one per section for M′
    (from the output backwards), one for the edges of every section in both bases.
    reduce: for a fit split over processes (``evaluation.lib.distributed.fit_lib_distributed``):
    ``data`` is this process's shard, and ``reduce`` (e.g. an all-reduce sum) is applied, in the
    same order on every process, to every accumulated float64 sum and row count before it is
    used, so every process gets the bases and edges of all the data. None: one process.
    With ``stochastic_sources`` or ``edge_sources`` every process draws its own probes (unbiased,
    not identical to a single-process fit); the exact default is identical up to rounding.
    Device: the fit runs on the model's device (``model_device``): batches are moved there, every
    accumulator lives there in float64; the returned bases and edges are on the CPU.
    Node layers may carry a position index, e.g. "blocks.0.hook_resid_mid[-1]" (evaluation.lib.positions).
    """
    _check_inputs(model, data, node_layers)
    with eval_mode(model):
        return _fit(model, data, list(node_layers), config, input_fn, progress, reduce).to("cpu")


def _fit(model, data, node_layers, config, input_fn, progress, reduce=None) -> LIBResult:
    device = model_device(model)
    runner, dtype = section_model(model, config.jacobian_dtype)
    probes = ProbeStreams.from_seed(config.seed)
    sections = [choose_section(runner, l_in, l_out, config, probes) for l_in, l_out in sections_of(node_layers)]
    # the closed forms read their input sites' activations; kept from the moments pass when the
    # sections run on the model itself (not on a copy in another dtype)
    cache = ActivationCache([s.reads for s in sections if s.reads is not None] if runner is model else [])
    moments = gather_moments(model, data, node_layers, input_fn, progress, device, cache)
    if reduce is not None:
        moments = {name: reduced_moments(name, moments[name], reduce) for name in node_layers}
    passes = DataPasses(data, input_fn, runner, dtype, device, cache, progress)
    last = node_layers[-1]
    neuron = {name: neuron_basis(name, moments[name]) for name in node_layers}
    final = pca_basis(last, moments[last], config) if config.rotate_final else neuron[last]
    lib, pca = {last: final}, {last: final}
    first = passes.first()
    for index in reversed(range(len(sections))):  # from the output backwards: M′ needs the next layer's basis
        section = sections[index]
        C_out = lib[section.l_out].C
        problem = section.check_gram(first, C_out)
        if problem:
            section = sections[index] = fall_back(section, problem, config, probes)
        M_dash = None
        for batch in passes.batches([section], f"LIB Jacobian Gram {section.l_in}"):
            part = section.jacobian_gram(batch, C_out)
            M_dash = part if M_dash is None else M_dash + part
        if reduce is not None:
            M_dash = reduce(M_dash)
        l_in = section.l_in
        lib[l_in] = lib_basis(l_in, moments[l_in], M_dash / moments[l_in].n, config)
        pca[l_in] = pca_basis(l_in, moments[l_in], config)
    bases = {"lib": {n: lib[n] for n in node_layers}, "pca": {n: pca[n] for n in node_layers}, "neuron": neuron}
    edge_bases = {name: bases[name] for name in BASES if name != "neuron" or config.neuron_edges}
    edges = compute_edges(sections, passes, edge_bases, config, probes, {n: m.n for n, m in moments.items()}, reduce)
    return LIBResult(node_layers, bases, edges, config, {s.l_in: s.method for s in sections})


def fit_edges(model: nn.Module, data: Iterable, node_layers: list[str], bases: dict[str, dict[str, LayerBasis]],
              config: LIBConfig = LIBConfig(), input_fn: Callable | None = None,
              progress: bool = False) -> dict[str, dict[str, Tensor]]:
    """The edge pass alone (§4.6): {basis name: {section input layer: E}} for given named bases
    ({name: {node layer: LayerBasis}}, e.g. the neuron bases of an earlier fit), normalised by the
    rows counted over ``data``; on the model's device, returned on the CPU."""
    _check_inputs(model, data, node_layers)
    with eval_mode(model):
        device = model_device(model)
        runner, dtype = section_model(model, config.jacobian_dtype)
        probes = ProbeStreams.from_seed(config.seed)
        sections = [choose_section(runner, l_in, l_out, config, probes) for l_in, l_out in sections_of(node_layers)]
        passes = DataPasses(data, input_fn, runner, dtype, device, None, progress)
        on = {name: {layer: b.to(device) for layer, b in named.items()} for name, named in bases.items()}
        edges = compute_edges(sections, passes, on, config, probes)
    return {name: {k: v.cpu() for k, v in named.items()} for name, named in edges.items()}


__all__ = ["BASES", "ClosedFormFallbackWarning", "LIBConfig", "LIBResult", "LayerBasis", "Moments", "compute_edges",
           "fit_edges", "fit_lib", "lib_basis", "model_device", "neuron_basis", "pca_basis"]
