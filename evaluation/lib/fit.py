"""Fit the Local Interaction Basis (LIB, "jacobian" variant) and a PCA baseline (docs/DESIGN.md §4).

For each node layer l (activation f, viewed as (B, P, d)) with augmented activation a = [1, f]:

1. μ = mean of f over examples and positions; Y = [[1, −μ], [0, I]] centres (a Y = [1, f − μ]);
   G = blockdiag(1, Cov(f)) — the constant keeps its own unit-eigenvalue direction.
2. Cov(f) = U D Uᵀ (float64 eigh), drop D ≤ truncation·max D; U_full = blockdiag(1, U),
   D_full = [1, D]; R = Y U_full D_full^{-1/2}, R⁺ = D_full^{1/2} U_fullᵀ Y⁻¹ (so Rᵀ G_raw R = I,
   G_raw = E[aᵀa]).
3. M′ = the Jacobian Gram of ĥ = f^{l+1} C^{l+1} w.r.t. f (edges.jacobian_gram_for_batch), padded
   with a zero constant row/column.
4. M = R⁺ M′ R⁺ᵀ. The constant direction is kept first as its own direction (Λ_0 = M_00, the
   derivative along the mean); M[1:, 1:] = V Λ Vᵀ sorted descending, Λ ≤ truncation·max Λ dropped.
   C = R V Λ^{1/2}, C⁺ = Λ^{-1/2} Vᵀ R⁺, so Cᵀ G_raw C = diag(Λ), C⁺ C = I, and LIB features
   f̂ = a C have f̂_0 = sqrt(Λ_0) (constant) and mean 0 for every other feature.
   If Λ_0 ≤ truncation·max Λ (no derivative along the mean), the constant column is left
   unscaled (f̂_0 = 1) so that C⁺ stays finite; Lambda[0] still reports M_00.
5. Edges: edges.edges_for_batch (gradient, trapezoid or Gauss–Legendre rule).
6. PCA baseline: C = Y U_full (no whitening), Lambda = D_full (1 for the constant, then variances).

The final node layer is kept in the neuron basis (C = I, Lambda = E[a_k²]) unless
``rotate_final``, in which case LIB and PCA both use its PCA basis.

Cost: sections that evaluation.lib.sections recognises (``jacobians="auto"``, the default) are
computed in closed form, checked against autograd on the first batch (about 9 s for the p = 113
modular-addition transformer on 2 CPU cores). By autograd, per section, M′ needs G·(k_{l+1} − 1) vector-Jacobian products per example, where G ≤ T_out
is the number of groups of output positions with disjoint input supports (edges.position_groups:
1 for a position-wise section such as an MLP or the unembedding, T_out for causal attention);
with ``stochastic_sources=S`` it needs S·(k − 1) ("positions") or S ("positions_and_hidden").
The edges need as many again per integration point (G, or S with ``edge_sources=S``; LIB and PCA
share them: at most G·d_{l+1}). Each is one backward pass of the section (the forward stops at
its output layer), so the time grows linearly with the samples and roughly with width³; memory
is bounded by the batch size and ``chunk_elements``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from interp_train.sites import resolve_site, run_model
from evaluation.errors import DegenerateModelError
from evaluation.lib.edges import (
    INTEGRATION_RULES, OUTPUT, as_positions, edges_for_batch, integration_rule, jacobian_gram_for_batch,
    rademacher, section_forward,
)
from evaluation.lib.activation_cache import ActivationCache
from evaluation.lib.positions import positions_of, select, site_of, split_layer
from evaluation.lib.sections import (
    check_edges, check_section, find_section, full_activation, gram, section_positions, structured_edges,
)

try:  # progress bars are optional
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    def tqdm(it, **_):
        return it


STOCHASTIC_OVER = ("positions", "positions_and_hidden")
JACOBIAN_DTYPES = (None, "float32", "float64")
JACOBIANS = ("auto", "structured", "autograd")
EDGE_SEED_OFFSET = 0x5EED  # the edge probes get a stream of their own, independent of the M′ probes


class ClosedFormFallbackWarning(RuntimeWarning):
    """A recognised section's closed form failed its check against autograd; autograd is used for it."""


@dataclass(frozen=True)
class LIBConfig:
    """Settings of a LIB fit (validated on construction).

    truncation: relative threshold; eigenvalues ≤ truncation × (largest eigenvalue) are dropped,
        both for the activation covariance (step 2) and for the Jacobian Gram (step 4).
    center: subtract the mean (the constant feature then carries it); False uses the uncentred
        second moment E[fᵀf] in place of Cov(f).
    rotate_final: rotate the final node layer (e.g. logits) into its PCA basis; False keeps it in
        the neuron basis. Earlier bases do not depend on this choice (up to truncation).
    integration: rule for the edge attribution: "gradient" (α = 1), "trapezoid", "gauss-legendre".
    n_intervals: trapezoid intervals / Gauss–Legendre points (must be 1 for "gradient").
    stochastic_sources: number S of Rademacher probes for the Jacobian Gram M′ (unbiased);
        None computes it exactly. What they probe is set by ``stochastic_over``.
    stochastic_over: "positions": r ∈ {±1}^T per example and LIB feature of the next layer,
        S·k VJPs instead of T·k (exact with one output position); "positions_and_hidden":
        r ∈ {±1}^{T×k} per example, S VJPs in all (noisier, never exact for k > 1).
    edge_sources: number S of Rademacher probes over output positions for the edges: each E_ij
        estimates ∑_t (…)² by (1/S) ∑_r (∑_t r_t …)², S·k VJPs instead of T·k (unbiased, exact
        with one output position); None computes the edges exactly.
    seed: seed of the Rademacher probes (the edge probes use their own stream).
    jacobian_dtype: None computes the Jacobians (M′ and edge passes) in the model's own dtype;
        "float32" or "float64" uses a copy of the model in that dtype (float32: about 2x faster
        on CPU than a float64 model; sums, eigendecompositions and moments stay float64 on the
        original model).
    chunk_elements: bound on the elements of one batched vector-Jacobian product
        (cotangents × batch × positions × width); bounds memory, not the result.
    jacobians: how section Jacobians are computed. "auto": in closed form for the sections
        evaluation.lib.sections recognises (TransformerLens attention and MLP blocks without
        LayerNorm, the unembedding, Linear/activation chains in an nn.Sequential), each checked
        against autograd on the first batch, and by autograd (backward passes) elsewhere;
        "structured": closed form or an error; "autograd": backward passes everywhere. The closed
        form is exact (float64, or ``jacobian_dtype`` float32 for the per-example edge products), so
        ``stochastic_sources`` and ``edge_sources`` only apply to the sections computed by autograd.
        LIBResult.methods records what each section used.
    """

    truncation: float = 1e-12
    center: bool = True
    rotate_final: bool = False
    integration: str = "gradient"
    n_intervals: int = 1
    stochastic_sources: int | None = None
    stochastic_over: str = "positions"
    edge_sources: int | None = None
    seed: int = 0
    jacobian_dtype: str | None = None
    chunk_elements: int = 2 ** 22
    jacobians: str = "auto"

    def __post_init__(self):
        if not (isinstance(self.truncation, (int, float)) and 0 <= self.truncation < 1):
            raise ValueError(f"truncation must be a number in [0, 1), got {self.truncation!r}")
        if self.integration not in INTEGRATION_RULES:
            raise ValueError(f"unknown integration {self.integration!r}; use one of {INTEGRATION_RULES}")
        integration_rule(self.integration, self.n_intervals)  # validates n_intervals
        if self.stochastic_sources is not None and (
                not isinstance(self.stochastic_sources, int) or self.stochastic_sources < 1):
            raise ValueError(f"stochastic_sources must be None or an integer >= 1, got {self.stochastic_sources!r}")
        if self.stochastic_over not in STOCHASTIC_OVER:
            raise ValueError(f"unknown stochastic_over {self.stochastic_over!r}; use one of {STOCHASTIC_OVER}")
        if self.edge_sources is not None and (
                isinstance(self.edge_sources, bool) or not isinstance(self.edge_sources, int) or self.edge_sources < 1):
            raise ValueError(f"edge_sources must be None or an integer >= 1, got {self.edge_sources!r}")
        if self.jacobian_dtype not in JACOBIAN_DTYPES:
            raise ValueError(f"unknown jacobian_dtype {self.jacobian_dtype!r}; use one of {JACOBIAN_DTYPES}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be an integer >= 1, got {self.chunk_elements!r}")
        if self.jacobians not in JACOBIANS:
            raise ValueError(f"unknown jacobians {self.jacobians!r}; use one of {JACOBIANS}")


@dataclass
class LayerBasis:
    """A basis of one node layer; features f̂ = [1, f] C, back to activations by f̂ C⁺.

    C: (d+1, k) float64, row 0 multiplies the constant 1; column 0 is the constant feature.
    C_pinv: (k, d+1). Lambda: (k,) LIB eigenvalues (PCA: 1 then variances). mean: (d,).
    """

    name: str
    C: Tensor
    C_pinv: Tensor
    Lambda: Tensor
    mean: Tensor

    def transform(self, act: Tensor) -> Tensor:
        """Features f̂ = [1, f] C of an activation (..., d) -> (..., k), float64, on the activation's device."""
        a = act.to(torch.float64)
        return torch.cat([torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device), a], dim=-1) @ self.C.to(a.device)

    def to(self, device) -> "LayerBasis":
        return LayerBasis(self.name, self.C.to(device), self.C_pinv.to(device), self.Lambda.to(device),
                          self.mean.to(device))


@dataclass
class LIBResult:
    """LIB and PCA bases per node layer and edges per section (keyed by the section's input layer)."""

    node_layers: list[str]
    lib: dict[str, LayerBasis]
    pca: dict[str, LayerBasis]
    lib_edges: dict[str, Tensor]   # E (k_{l+1}, k_l) float64
    pca_edges: dict[str, Tensor]
    config: LIBConfig
    methods: dict[str, str] = field(default_factory=dict)  # per section (input layer): closed form used, or "autograd (…)"

    def to(self, device) -> "LIBResult":
        """The same result with every tensor on ``device``."""
        move = lambda edges: {k: torch.as_tensor(v).to(device) for k, v in edges.items()}  # noqa: E731
        return LIBResult(self.node_layers, {k: b.to(device) for k, b in self.lib.items()},
                         {k: b.to(device) for k, b in self.pca.items()}, move(self.lib_edges), move(self.pca_edges),
                         self.config, dict(self.methods))


class _Moments:
    """Streaming mean and covariance of rows (float64), shifted by the first row for accuracy."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2, self.sq = 0, None, None, None, None

    def update(self, rows: Tensor) -> None:
        rows = rows.to(torch.float64)
        if self.shift is None:
            d = rows.shape[1]
            self.shift = rows[0].clone()
            like = {"dtype": torch.float64, "device": rows.device}
            self.s1, self.s2, self.sq = torch.zeros(d, **like), torch.zeros(d, d, **like), torch.zeros(d, **like)
        z = rows - self.shift
        self.n += rows.shape[0]
        self.s1 += z.sum(0)
        self.s2 += z.T @ z
        self.sq += rows.pow(2).sum(0)

    def mean(self) -> Tensor:
        return self.shift + self.s1 / self.n

    def cov(self) -> Tensor:
        m = self.s1 / self.n
        return self.s2 / self.n - torch.outer(m, m)

    def second_moment(self) -> Tensor:
        """E[f fᵀ] (uncentred)."""
        mu = self.mean()
        return self.cov() + torch.outer(mu, mu)


Reduce = Callable[[Tensor], Tensor]


def _reduced_moments(name: str, moments: _Moments, reduce: Reduce) -> _Moments:
    """The moments of the rows of every process: counts and sums added by ``reduce``.

    Each process shifted by its own first row, so the sums are first re-centred on the global
    mean μ = Σ x / n: with z = x − shift and δ = shift − μ,
    Σ (x − μ)(x − μ)ᵀ = s2 + s1 δᵀ + δ s1ᵀ + n δ δᵀ.
    """
    if moments.shift is None:
        raise ValueError(f"this process saw no rows of node layer {name!r}: give every process at least one batch")
    n = reduce(torch.tensor(float(moments.n), dtype=torch.float64, device=moments.s1.device))
    mean = reduce(moments.s1 + moments.n * moments.shift) / n
    delta = moments.shift - mean
    s2 = moments.s2 + torch.outer(moments.s1, delta) + torch.outer(delta, moments.s1) + moments.n * torch.outer(delta, delta)
    out = _Moments()
    out.n, out.shift, out.s1 = int(n.item()), mean, torch.zeros_like(mean)
    out.s2, out.sq = reduce(s2), reduce(moments.sq.clone())
    return out


def _centering(mean: Tensor, center: bool) -> tuple[Tensor, Tensor]:
    """Y = [[1, −μ], [0, I]] and Y⁻¹ = [[1, μ], [0, I]] (identity when not centring)."""
    d = mean.shape[0]
    Y, Y_inv = (torch.eye(d + 1, dtype=torch.float64, device=mean.device) for _ in range(2))
    if center:
        Y[0, 1:], Y_inv[0, 1:] = -mean, mean
    return Y, Y_inv


class DegenerateLayerError(DegenerateModelError):
    """A node layer with nothing to fit (constant over the data, or no function flowing through it),
    e.g. in a network that collapsed in training; a property of the model, not of the arguments."""


def _eigh_kept(matrix: Tensor, truncation: float, empty_error: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix, keeping those above
    truncation × the largest; DegenerateLayerError(empty_error) when the largest is not positive."""
    vals, vecs = torch.linalg.eigh(matrix)
    vals, vecs = vals.flip(0), vecs.flip(1)
    if not vals.numel() or vals[0] <= 0:
        raise DegenerateLayerError(empty_error)
    keep = vals > truncation * vals[0]
    return vals[keep], vecs[:, keep]


def _pca_frame(name: str, moments: _Moments, config: LIBConfig):
    """(Y, Y⁻¹, U_full, D_full) of step 2; raises for a layer without variation."""
    G = moments.cov() if config.center else moments.second_moment()
    D, U = _eigh_kept(G, config.truncation,
                      f"node layer {name!r} is constant over the data (every variance is 0), so it has no "
                      "directions to fit; drop it from node_layers or use data on which it varies")
    d, k = U.shape
    U_full = torch.zeros(d + 1, k + 1, dtype=torch.float64, device=U.device)
    U_full[0, 0] = 1.0
    U_full[1:, 1:] = U
    D_full = torch.cat([torch.ones(1, dtype=torch.float64, device=D.device), D])
    Y, Y_inv = _centering(moments.mean(), config.center)
    return Y, Y_inv, U_full, D_full


def pca_basis(name: str, moments: _Moments, config: LIBConfig) -> LayerBasis:
    """C = Y U_full, C⁺ = U_fullᵀ Y⁻¹, Lambda = D_full (step 6)."""
    Y, Y_inv, U_full, D_full = _pca_frame(name, moments, config)
    return LayerBasis(name, Y @ U_full, U_full.T @ Y_inv, D_full, moments.mean())


def neuron_basis(name: str, moments: _Moments) -> LayerBasis:
    """The unrotated layer: C = C⁺ = I (constant first), Lambda_k = E[a_k²]."""
    mean = moments.mean()
    d = mean.shape[0]
    eye = torch.eye(d + 1, dtype=torch.float64, device=mean.device)
    second = torch.cat([torch.ones(1, dtype=torch.float64, device=mean.device), moments.sq / moments.n])
    return LayerBasis(name, eye, eye.clone(), second, moments.mean())


def lib_basis(name: str, moments: _Moments, M_dash: Tensor, config: LIBConfig) -> LayerBasis:
    """Steps 2 and 4: C = R V Λ^{1/2}, C⁺ = Λ^{-1/2} Vᵀ R⁺ from the Jacobian Gram M′ (d × d)."""
    Y, Y_inv, U_full, D_full = _pca_frame(name, moments, config)
    R = Y @ U_full @ torch.diag(D_full.rsqrt())
    R_pinv = torch.diag(D_full.sqrt()) @ U_full.T @ Y_inv
    d = M_dash.shape[0]
    M_full = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=M_dash.device)
    M_full[1:, 1:] = M_dash
    M = R_pinv @ M_full @ R_pinv.T
    M = (M + M.T) / 2
    Lam, V = _eigh_kept(M[1:, 1:], config.truncation,
                        f"node layer {name!r} has no influence on the next node layer (its Jacobian Gram "
                        "is 0); LIB cannot rank its directions")
    lam0 = M[0, 0]
    scale0 = lam0.sqrt() if lam0 > config.truncation * Lam[0] else torch.ones((), dtype=torch.float64, device=M.device)
    C = torch.cat([R[:, :1] * scale0, R[:, 1:] @ V * Lam.sqrt()], dim=1)
    C_pinv = torch.cat([R_pinv[:1] / scale0, (V.T @ R_pinv[1:]) / Lam.sqrt()[:, None]], dim=0)
    return LayerBasis(name, C, C_pinv, torch.cat([lam0.reshape(1), Lam]), moments.mean())


def _model_input(batch, input_fn: Callable | None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
    if input_fn is not None:
        x = input_fn(batch)
    elif isinstance(batch, (tuple, list)):
        x = batch[0]
    else:
        x = batch
    if device is not None and isinstance(x, Tensor) and x.device != device:
        x = x.to(device)  # the data follow the model
    if dtype is not None and isinstance(x, Tensor) and torch.is_floating_point(x):
        x = x.to(dtype)  # float inputs follow a section model of another dtype
    return x


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's parameters (or buffers); the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _section_model(model: nn.Module, jacobian_dtype: str | None) -> tuple[nn.Module, torch.dtype | None]:
    """The model that runs the section passes: ``model`` itself, or an eval-mode copy in ``jacobian_dtype``."""
    if jacobian_dtype is None:
        return model, None
    dtype = getattr(torch, jacobian_dtype)
    params = [p for p in model.parameters() if torch.is_floating_point(p)]
    if params and all(p.dtype == dtype for p in params):
        return model, None
    return copy.deepcopy(model).to(dtype).eval(), dtype


def _check_layers(model: nn.Module, node_layers: list[str]) -> None:
    """Names, sites and index syntax; the index range is checked on the first batch (_gather_moments)."""
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


def _gather_moments(model, data, node_layers, input_fn, progress, device=None,
                    cache: ActivationCache | None = None) -> dict[str, _Moments]:
    """Pass 1: mean and covariance of every node layer (at its positions, evaluation.lib.positions);
    fills ``cache`` with the activations of its sites (every position, float64)."""
    moments = {name: _Moments() for name in node_layers}
    record = list(dict.fromkeys(site_of(n) for n in node_layers if site_of(n) != OUTPUT))
    for batch in tqdm(data, desc="LIB moments", disable=not progress):
        with torch.no_grad():
            result = run_model(model, _model_input(batch, input_fn, device=device), record=record)
        for name in node_layers:
            site = site_of(name)
            act = result.output if site == OUTPUT else result.activations[site]
            rows = select(name, act.detach())  # ValueError for a position index the activation lacks
            if not torch.isfinite(rows).all():
                raise ValueError(f"node layer {name!r} has non-finite (NaN or inf) activations; "
                                 "check the model and the data")
            moments[name].update(rows.reshape(-1, rows.shape[-1]))
        for site in (cache.sites if cache is not None else ()):
            cache.add(site, as_positions(result.activations[site].detach()).to(torch.float64))
    return moments


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
    if iter(data) is data:
        raise TypeError("data must be re-iterable (e.g. a DataLoader or a list of batches), not an iterator")
    _check_layers(model, node_layers)
    was_training = model.training
    model.eval()
    try:
        return _fit(model, data, list(node_layers), config, input_fn, progress, reduce).to("cpu")
    finally:
        model.train(was_training)


def _fit(model, data, node_layers, config, input_fn, progress, reduce=None) -> LIBResult:
    device = model_device(model)
    section_model, dtype = _section_model(model, config.jacobian_dtype)
    closed, methods = _closed_forms(model, node_layers, config)
    # the closed forms read their input sites' activations; kept from the moments pass when the
    # sections run on the model itself (not on a copy in another dtype)
    cache = ActivationCache([site_of(l) for l, s in closed.items() if s is not None] if section_model is model else [])
    moments = _gather_moments(model, data, node_layers, input_fn, progress, device, cache)
    if reduce is not None:
        moments = {name: _reduced_moments(name, moments[name], reduce) for name in node_layers}
    last = node_layers[-1]
    final = pca_basis(last, moments[last], config) if config.rotate_final else neuron_basis(last, moments[last])
    lib, pca = {last: final}, {last: final}
    generator = torch.Generator().manual_seed(config.seed)  # CPU stream: the same probes on every device
    for l_in, l_out in reversed(list(zip(node_layers[:-1], node_layers[1:]))):
        M_dash = None
        cached = cache.get(site_of(l_in)) if closed.get(l_in) is not None else None
        if cached is not None:
            inputs = _model_input(next(iter(data)), input_fn, dtype, device)
            problem = check_section(closed[l_in], section_model, inputs, l_in, l_out, lib[l_out].C,
                                    config.chunk_elements)
            if problem:
                _give_up_closed_form(closed, methods, l_in, l_out, problem, config)
            else:
                at = section_positions(l_in, l_out, cached[0].shape)
                M_dash = sum(gram(closed[l_in], x, lib[l_out].C[1:, 1:], at) for x in cached)
        for index, batch in enumerate(tqdm(data if M_dash is None else [], desc=f"LIB Jacobian Gram {l_in}",
                                           disable=not progress)):
            inputs = _model_input(batch, input_fn, dtype, device)
            if closed.get(l_in) is not None and index == 0:
                problem = check_section(closed[l_in], section_model, inputs, l_in, l_out, lib[l_out].C,
                                        config.chunk_elements)
                if problem:
                    _give_up_closed_form(closed, methods, l_in, l_out, problem, config)
            if closed.get(l_in) is not None:
                x = full_activation(section_model, inputs, l_in)
                part = gram(closed[l_in], x, lib[l_out].C[1:, 1:], section_positions(l_in, l_out, x.shape))
                M_dash = part if M_dash is None else M_dash + part
                continue
            sp = section_forward(section_model, inputs, l_in, l_out)
            probes = None
            if config.stochastic_sources is not None:
                out = as_positions(sp.out)
                hidden = lib[l_out].C.shape[1] - 1 if config.stochastic_over == "positions_and_hidden" else None
                probes = rademacher(config.stochastic_sources, out.shape[0], out.shape[1], generator, hidden).to(device)
            part = jacobian_gram_for_batch(sp, lib[l_out].C, config.chunk_elements, probes)
            M_dash = part if M_dash is None else M_dash + part
        if reduce is not None:
            M_dash = reduce(M_dash)
        lib[l_in] = lib_basis(l_in, moments[l_in], M_dash / moments[l_in].n, config)
        pca[l_in] = pca_basis(l_in, moments[l_in], config)
    lib_edges, pca_edges = compute_edges(section_model, data, node_layers, lib, pca, config, input_fn, progress,
                                         {n: m.n for n, m in moments.items()}, reduce, dtype, closed, methods, cache)
    return LIBResult(node_layers, {n: lib[n] for n in node_layers}, {n: pca[n] for n in node_layers},
                     lib_edges, pca_edges, config, methods)


def _closed_forms(model, node_layers, config):
    """({section input: closed-form section or None}, {section input: method}) per config.jacobians."""
    closed, methods = {}, {}
    for l_in, l_out in zip(node_layers[:-1], node_layers[1:]):
        section, why = (None, "jacobians='autograd'") if config.jacobians == "autograd" else find_section(model, l_in, l_out)
        if section is None and config.jacobians == "structured":
            raise ValueError(f"no closed-form Jacobian for the section {l_in} -> {l_out} ({why}); "
                             "use jacobians='auto' or 'autograd'")
        closed[l_in] = section
        methods[l_in] = f"closed form: {why}" if section is not None else f"autograd ({why})"
    return closed, methods


def _give_up_closed_form(closed, methods, l_in, l_out, problem, config):
    if config.jacobians == "structured":
        raise ValueError(f"the closed-form Jacobian of {l_in} -> {l_out} failed its check against autograd: {problem}")
    warnings.warn(f"LIB section {l_in} -> {l_out}: {problem}; using autograd for it", ClosedFormFallbackWarning,
                  stacklevel=3)
    closed[l_in] = None
    methods[l_in] = f"autograd ({problem})"


def compute_edges(model, data, node_layers, lib, pca, config, input_fn=None, progress=False, rows=None,
                  reduce=None, input_dtype=None, closed=None, methods=None, cache: ActivationCache | None = None):
    """Edge pass: E (k_{l+1}, k_l) per section, in the LIB and the PCA bases (edges.edges_for_batch).

    rows: N·P per node layer (the normaliser, over all processes); counted from the data when None.
    reduce: applied to each section's edge sums and row count (see ``fit_lib``).
    input_dtype: floating-point inputs are cast to it (the dtype of ``model``, when it differs
    from the data's).
    closed: {section input: closed-form section} (evaluation.lib.sections) for the sections whose
    edges are computed in closed form, checked against autograd on the first batch; methods is
    updated when a check fails. Runs on the model's device; the bases are moved there.
    cache: activations of the closed forms' input sites from the moments pass (the data are then
    passed through the model only for the first-batch checks and the autograd sections).
    """
    device = model_device(model)
    closed = dict(closed or {})
    methods = methods if methods is not None else {}
    closed_dtype = torch.float32 if config.jacobian_dtype == "float32" else torch.float64
    alphas, weights = integration_rule(config.integration, config.n_intervals)
    generator = torch.Generator().manual_seed(config.seed + EDGE_SEED_OFFSET)
    sections = list(zip(node_layers[:-1], node_layers[1:]))
    lib_e = {l_in: 0.0 for l_in, _ in sections}
    pca_e = {l_in: 0.0 for l_in, _ in sections}
    counted = {l_in: 0 for l_in, _ in sections}
    on = lambda t: t.to(device)  # noqa: E731
    bases = {l_in: [(on(lib[l_in].C), on(lib[l_in].C_pinv), on(lib[l_out].C)),
                    (on(pca[l_in].C), on(pca[l_in].C_pinv), on(pca[l_out].C))]
             for l_in, l_out in sections}
    first = _model_input(next(iter(data)), input_fn, input_dtype, device)
    for l_in, l_out in sections:  # every closed form checked against autograd on the first batch
        if closed.get(l_in) is not None:
            problem = check_edges(closed[l_in], model, first, l_in, l_out, (alphas, weights), bases[l_in],
                                  config.chunk_elements, closed_dtype)
            if problem:
                _give_up_closed_form(closed, methods, l_in, l_out, problem, config)
    cached = {l_in: cache.get(site_of(l_in)) if cache is not None and closed.get(l_in) is not None else None
              for l_in, _ in sections}

    def add_closed(l_in, l_out, x):
        at = section_positions(l_in, l_out, x.shape)
        counted[l_in] += x.shape[0] * (x.shape[1] if at["inputs_at"] is None else len(at["inputs_at"]))
        e_lib, e_pca = structured_edges(closed[l_in], x, (alphas, weights), bases[l_in], config.chunk_elements,
                                        closed_dtype, at)
        lib_e[l_in] = lib_e[l_in] + e_lib
        pca_e[l_in] = pca_e[l_in] + e_pca

    for l_in, l_out in sections:
        for x in cached[l_in] or []:
            add_closed(l_in, l_out, x)
    todo = [(l_in, l_out) for l_in, l_out in sections if cached[l_in] is None]
    for batch in tqdm(data if todo else [], desc="LIB edges", disable=not progress):
        inputs = _model_input(batch, input_fn, input_dtype, device)
        sites = list(dict.fromkeys(site_of(l_in) for l_in, _ in todo if closed.get(l_in) is not None))
        clean = _clean_activations(model, inputs, sites)
        for l_in, l_out in todo:
            if closed.get(l_in) is not None:
                add_closed(l_in, l_out, clean[site_of(l_in)])
                continue
            passes = [(w, section_forward(model, inputs, l_in, l_out, alpha)) for alpha, w in zip(alphas, weights)]
            counted[l_in] += passes[0][1].clean.shape[0] * passes[0][1].clean.shape[1]
            probes = None
            if config.edge_sources is not None:  # one draw shared by every integration point
                out = as_positions(passes[0][1].out)
                probes = rademacher(config.edge_sources, out.shape[0], out.shape[1], generator).to(device)
            e_lib, e_pca = edges_for_batch(passes, bases[l_in], config.chunk_elements, probes)
            lib_e[l_in] = lib_e[l_in] + e_lib
            pca_e[l_in] = pca_e[l_in] + e_pca
    if reduce is not None:
        for l_in, _ in sections:
            lib_e[l_in] = reduce(torch.as_tensor(lib_e[l_in], dtype=torch.float64, device=device))
            pca_e[l_in] = reduce(torch.as_tensor(pca_e[l_in], dtype=torch.float64, device=device))
            counted[l_in] = int(reduce(torch.tensor(float(counted[l_in]), dtype=torch.float64, device=device)).item())
    norm = rows if rows is not None else counted
    return ({k: v / norm[k] for k, v in lib_e.items()}, {k: v / norm[k] for k, v in pca_e.items()})


def _clean_activations(model, inputs, sites) -> dict[str, Tensor]:
    """Activations (B, T, d) float64 at ``sites`` (every position) from one forward pass without gradients."""
    with torch.no_grad():
        acts = run_model(model, inputs, record=sites).activations
    return {site: as_positions(acts[site]).to(torch.float64) for site in sites}


__all__ = ["ClosedFormFallbackWarning", "LIBConfig", "LIBResult", "LayerBasis", "compute_edges", "fit_lib", "lib_basis", "neuron_basis", "pca_basis"]
