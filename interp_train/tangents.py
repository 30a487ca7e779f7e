"""Tangent spaces of the data manifold: providers of orthonormal bases U(x) and projections.

A provider maps a batch of inputs x (B, d) — or (B, ...) flattened to d features — to a
batch of orthonormal tangent bases U (B, d, k), UᵀU = I_k, in x's dtype and device:

* ``ExactTangents``: synthetic data x = g(z) with a known generator; U = orthonormalised ∂g/∂z.
* ``LocalPCATangents``: PCA over the n nearest training neighbours of each query.
* ``GlobalPCATangents``: the top principal directions of the whole training set (one U for all x).

``fit_from_datamodule(kind, datamodule)`` builds one by name for regularizers configured with
a string. Projections: P_on v = U(Uᵀv), P_off v = v − U(Uᵀv); ``tangent_fraction`` is the
gradient-alignment measurement ||UUᵀg|| / ||g|| of docs/DESIGN.md §5.4 (tangent spaces: §3.8).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from interp_train.data.manifold_generator import SmoothManifoldGenerator

TANGENT_KINDS = ("exact", "local_pca", "global_pca")
_CHUNK_ELEMENTS = 2**24  # about 128 MiB of float64 work memory per chunk of queries


# ----------------------------------------------------------------------------- projections
def _flat(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if U.ndim != 3:
        raise ValueError(f"a tangent basis must have shape (B, d, k), got {tuple(U.shape)}")
    flat = v.reshape(v.shape[0], -1)
    if flat.shape[0] != U.shape[0] or flat.shape[1] != U.shape[1]:
        raise ValueError(
            f"vectors of shape {tuple(v.shape)} (flattened {tuple(flat.shape)}) do not match a basis of shape {tuple(U.shape)}"
        )
    return flat


def project_on(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U(Uᵀv) per example: the tangential part of v (B, ...), returned in v's shape."""
    flat = _flat(U, v)
    coords = torch.einsum("bdk,bd->bk", U, flat)
    return torch.einsum("bdk,bk->bd", U, coords).reshape(v.shape)


def project_off(U: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """v − U(Uᵀv) per example: the part of v (B, ...) orthogonal to the tangent space."""
    return v - project_on(U, v)


def tangent_fraction(U: torch.Tensor, g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """frac_i = ||U_iU_iᵀ g_i|| / ||g_i||, shape (B,) (random baseline: sqrt(k/d))."""
    flat = _flat(U, g)
    on = torch.einsum("bdk,bd->bk", U, flat).norm(dim=1)  # ||UUᵀg|| = ||Uᵀg|| for orthonormal U
    return on / flat.norm(dim=1).clamp_min(eps)


# ----------------------------------------------------------------------------- helpers
def _check_data(data: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or not torch.is_floating_point(data) or data.ndim < 2:
        got = f"{type(data).__name__} {tuple(data.shape)} {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(f"{what} needs training inputs as a float tensor of shape (N, d), got {got}")
    return data.reshape(data.shape[0], -1).detach()


def _check_dim(dim: int | None, ambient: int) -> None:
    if dim is None:
        return
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"tangent dim must be an integer >= 1, got {dim!r}")
    if dim > ambient:
        raise ValueError(f"tangent dim {dim} is larger than the ambient dimension {ambient} of the data")


def _check_explained_variance(value: float) -> float:
    if not (0 < value <= 1):
        raise ValueError(f"explained_variance must be in (0, 1], got {value!r}")
    return float(value)


def _dim_for_variance(eigenvalues: torch.Tensor, explained_variance: float) -> int:
    """Smallest m with (λ_1 + ... + λ_m) / ∑λ >= explained_variance (eigenvalues sorted descending)."""
    ratio = eigenvalues.clamp_min(0).cumsum(0) / eigenvalues.clamp_min(0).sum().clamp_min(1e-300)
    m = int(torch.searchsorted(ratio, torch.tensor(explained_variance - 1e-12, dtype=ratio.dtype, device=ratio.device)).item()) + 1
    return min(m, eigenvalues.shape[0])


def _flatten_query(x: torch.Tensor, ambient: int) -> torch.Tensor:
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.shape[1] != ambient:
        raise ValueError(f"inputs of shape {tuple(x.shape)} have {flat.shape[1]} features; the tangent provider has {ambient}")
    return flat


class TangentProvider:
    """Interface: ``basis(x, extras) -> U (B, d, k)`` with orthonormal columns; ``dim`` = k."""

    dim: int

    def basis(self, x: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        return self.basis(x, extras)


# ----------------------------------------------------------------------------- exact
class ExactTangents(TangentProvider):
    """U(x) = Q from the QR decomposition of ∂g/∂z at the latent z with x = g(z) (float64).

    The latent comes from ``extras["latents"]`` (B, k) — the training batch carries it — and
    otherwise from a table of known (x, z) pairs added with ``register(x, z)``: the registered
    input nearest to x (Euclidean), which must lie within ``tol`` of it. Latents passed in
    extras are trusted as given (inputs may carry noise added after g).
    """

    def __init__(self, generator: SmoothManifoldGenerator, tol: float = 1e-4):
        if not callable(getattr(generator, "jacobian", None)):
            raise TypeError(f"ExactTangents needs a generator with a jacobian(z) method, got {type(generator).__name__}")
        self.generator = generator
        self.dim = int(generator.latent_dim)
        self.ambient_dim = int(generator.ambient_dim)
        self.tol = float(tol)
        self._known_x: torch.Tensor | None = None
        self._known_z: torch.Tensor | None = None

    def register(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """Adds (x, z) pairs (N, d), (N, k) to the lookup table."""
        x = _flatten_query(x, self.ambient_dim).to(torch.float64).cpu()
        z = z.detach().to(torch.float64).cpu()
        if z.shape != (x.shape[0], self.dim):
            raise ValueError(f"latents must have shape ({x.shape[0]}, {self.dim}), got {tuple(z.shape)}")
        self._known_x = x if self._known_x is None else torch.cat([self._known_x, x])
        self._known_z = z if self._known_z is None else torch.cat([self._known_z, z])

    def _lookup(self, x: torch.Tensor) -> torch.Tensor:
        if self._known_x is None:
            raise KeyError("no latent known for this input; pass latents in the batch (extras['latents']) "
                           "or register (x, z) pairs with ExactTangents.register")
        query = x.to(torch.float64).cpu()
        dist, idx = torch.cdist(query, self._known_x).min(dim=1)
        worst = int(dist.argmax())
        if dist[worst] > self.tol:
            raise KeyError(
                f"no latent known for this input (example {worst}: nearest registered input is "
                f"{float(dist[worst]):.3g} away, tolerance {self.tol:g}); pass latents in the batch (extras['latents'])"
            )
        return self._known_z[idx]

    def basis(self, x: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        flat = _flatten_query(x, self.ambient_dim)
        z = (extras or {}).get("latents")
        if z is None:
            z = self._lookup(flat)
        z = torch.as_tensor(z).detach().to(device=x.device, dtype=torch.float64)
        if z.shape != (flat.shape[0], self.dim):
            raise ValueError(f"latents must have shape ({flat.shape[0]}, {self.dim}) for this batch, got {tuple(z.shape)}")
        U = torch.linalg.qr(self.generator.jacobian(z)).Q
        return U.to(x.dtype)

    def __repr__(self) -> str:
        return f"ExactTangents({self.generator!r})"


# ----------------------------------------------------------------------------- PCA
def _top_principal_directions(centred: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``keep`` eigenvectors (b, d, keep) and eigenvalues (b, keep) of C = XᵀX/(n−1) per batch
    entry, for centred float64 X (b, n, d). With n < d it eigendecomposes the n×n Gram matrix
    XXᵀ = V Λ Vᵀ instead (same nonzero eigenvalues; eigenvectors XᵀV Λ^{-1/2}), re-orthonormalised by QR.
    """
    n, d = centred.shape[1:]
    if n >= d:
        eigenvalues, vectors = torch.linalg.eigh(centred.transpose(1, 2) @ centred)
        return vectors.flip(-1)[..., :keep], eigenvalues.flip(-1)[..., :keep] / (n - 1)
    eigenvalues, vectors = torch.linalg.eigh(centred @ centred.transpose(1, 2))
    eigenvalues, vectors = eigenvalues.flip(-1)[..., :keep], vectors.flip(-1)[..., :keep]
    U = centred.transpose(1, 2) @ vectors / eigenvalues.clamp_min(1e-300).sqrt()[:, None, :]
    return torch.linalg.qr(U).Q, eigenvalues.clamp_min(0) / (n - 1)


class LocalPCATangents(TangentProvider):
    """U(x) = top-``dim`` principal directions of the n nearest training points of x.

    For each query x: N(x) = its ``n_neighbors`` nearest rows of ``data`` (Euclidean); the
    neighbourhood is centred at its own mean and U spans the top eigenvectors of the local
    covariance, in float64 (through the n×n Gram matrix when n < d).

    A query that is itself a training point is excluded from its own neighbourhood (one row at
    distance 0 is dropped), so a training point gets the same estimate as a held-out point
    would: n *other* points, never a neighbourhood that always contains its centre.

    ``dim`` fixed, or (``dim=None``) chosen once at construction: the smallest m whose top-m
    local eigenvalues explain ``explained_variance`` of the local variance, averaged over up to
    ``n_probe`` training points (stored in ``.dim``; the averaged explained-variance curve in
    ``.explained_variance_curve``). Queries are processed in chunks so memory stays bounded.
    """

    def __init__(
        self,
        data: torch.Tensor,
        dim: int | None = None,
        n_neighbors: int = 20,
        explained_variance: float = 0.9,
        n_probe: int = 256,
        seed: int = 0,
    ):
        self.data = _check_data(data, "LocalPCATangents")
        n, d = self.data.shape
        self.ambient_dim = d
        _check_dim(dim, d)
        self.explained_variance = _check_explained_variance(explained_variance)
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int) or n_neighbors < 2:
            raise ValueError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}")
        if dim is not None and n_neighbors < dim + 1:
            raise ValueError(f"n_neighbors ({n_neighbors}) must be at least dim + 1 ({dim + 1}): "
                             f"{n_neighbors} centred points span at most {n_neighbors - 1} directions")
        if n_neighbors > n - 1:
            raise ValueError(f"n_neighbors ({n_neighbors}) must be smaller than the number of training points ({n})")
        self.n_neighbors = n_neighbors
        self._data_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        if dim is None:
            gen = torch.Generator().manual_seed(seed)
            probe = self.data[torch.randperm(n, generator=gen)[: min(n_probe, n)]]
            _, eigenvalues = self._local_pca(probe, keep=min(n_neighbors - 1, d))
            share = eigenvalues / eigenvalues.sum(dim=1, keepdim=True).clamp_min(1e-300)
            self.explained_variance_curve = share.mean(dim=0).cumsum(0)
            dim = _dim_for_variance(share.mean(dim=0), self.explained_variance)
        else:
            self.explained_variance_curve = None
        self.dim = int(dim)

    def _data_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(data, squared row norms) on ``device``, cached."""
        if device not in self._data_cache:
            data = self.data.to(device)
            self._data_cache[device] = (data, data.pow(2).sum(dim=1))
        return self._data_cache[device]

    def _local_pca(self, query: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (B, d, keep) float64, eigenvalues (B, keep) float64) of each query's neighbourhood."""
        data, sq_norms = self._data_on(query.device)
        n, d = data.shape
        k = self.n_neighbors
        chunk = max(1, _CHUNK_ELEMENTS // (n + (k + 1) * d + min(k, d) ** 2))  # per-query work memory
        bases, values = [], []
        for start in range(0, query.shape[0], chunk):
            q = query[start:start + chunk].to(data.dtype)
            # ||q − x||² up to the per-query constant ||q||², enough to rank candidates
            near = (sq_norms - 2 * q @ data.T).topk(k + 1, dim=1, largest=False).indices  # (b, k+1)
            candidates = data[near].to(torch.float64)
            # the matmul shortcut is not exact; recompute the candidates' distances directly
            near_dist = (candidates - q.to(torch.float64)[:, None, :]).norm(dim=-1)
            order = near_dist.argsort(dim=1)
            candidates = candidates.gather(1, order[:, :, None].expand_as(candidates))
            # drop the query itself when it is a training point (distance 0), else the farthest
            is_self = (near_dist.gather(1, order[:, :1]) == 0)[:, :, None]
            hood = torch.where(is_self, candidates[:, 1:], candidates[:, :-1])  # (b, k, d)
            hood = hood - hood.mean(dim=1, keepdim=True)
            U, eigenvalues = _top_principal_directions(hood, keep)
            bases.append(U)
            values.append(eigenvalues)
        return torch.cat(bases), torch.cat(values)

    def basis(self, x: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        flat = _flatten_query(x, self.ambient_dim)
        U, _ = self._local_pca(flat, keep=self.dim)
        return U.to(x.dtype)

    def __repr__(self) -> str:
        return (f"LocalPCATangents(N={self.data.shape[0]}, d={self.ambient_dim}, dim={self.dim}, "
                f"n_neighbors={self.n_neighbors})")


class GlobalPCATangents(TangentProvider):
    """U = top-``dim`` eigenvectors of the covariance of all training inputs (float64), for every x.

    ``dim`` fixed, or (``dim=None``) the smallest m whose top-m eigenvalues explain
    ``explained_variance`` of the total variance (stored in ``.dim``; the full curve in
    ``.explained_variance_curve``). Exact when the data lie in a linear subspace.
    """

    def __init__(self, data: torch.Tensor, dim: int | None = None, explained_variance: float = 0.9):
        data = _check_data(data, "GlobalPCATangents")
        n, d = data.shape
        self.ambient_dim = d
        _check_dim(dim, d)
        self.explained_variance = _check_explained_variance(explained_variance)
        mean = data.to(torch.float64).mean(dim=0)
        cov = torch.zeros(d, d, dtype=torch.float64, device=data.device)
        rows = max(1, _CHUNK_ELEMENTS // d)
        for start in range(0, n, rows):  # float64 accumulation, chunked
            centred = data[start:start + rows].to(torch.float64) - mean
            cov += centred.T @ centred
        eigenvalues, eigenvectors = torch.linalg.eigh(cov / max(n - 1, 1))
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        self.eigenvalues = eigenvalues
        self.explained_variance_curve = eigenvalues.clamp_min(0).cumsum(0) / eigenvalues.clamp_min(0).sum().clamp_min(1e-300)
        if dim is None:
            dim = _dim_for_variance(eigenvalues, self.explained_variance)
        self.dim = int(dim)
        self.U = eigenvectors[:, : self.dim].cpu()

    def basis(self, x: torch.Tensor, extras: Mapping[str, Any] | None = None) -> torch.Tensor:
        flat = _flatten_query(x, self.ambient_dim)
        return self.U.to(device=x.device, dtype=x.dtype).expand(flat.shape[0], -1, -1)

    def __repr__(self) -> str:
        return f"GlobalPCATangents(d={self.ambient_dim}, dim={self.dim})"


# ----------------------------------------------------------------------------- by name
def fit_from_datamodule(kind: str, datamodule: Any, **kwargs) -> TangentProvider:
    """Builds a tangent provider by name from a datamodule.

    kind: "exact" | "local_pca" | "global_pca".
    Datamodule contract:
      * "exact" reads ``datamodule.generator``, a SmoothManifoldGenerator (the batches must
        then carry the latents: ``(x, y, z)`` or a dict with "latents").
      * "local_pca" and "global_pca" call ``datamodule.train_inputs()``, which returns the
        training inputs as an (N, d) float tensor (or (N, ...), flattened).
    kwargs go to the provider (e.g. dim, n_neighbors, explained_variance, tol).
    """
    if kind not in TANGENT_KINDS:
        raise ValueError(f"unknown tangent provider {kind!r}; allowed: {', '.join(TANGENT_KINDS)}")
    if datamodule is None:
        raise ValueError(f"tangents={kind!r} is fitted from the datamodule, but none was given; "
                         "pass a datamodule or a TangentProvider instance")
    name = type(datamodule).__name__
    if kind == "exact":
        generator = getattr(datamodule, "generator", None)
        if generator is None:
            raise AttributeError(f"tangents='exact' needs datamodule.generator (a SmoothManifoldGenerator); "
                                 f"{name} has none — use 'local_pca' or 'global_pca' for data without a known generator")
        return ExactTangents(generator, **kwargs)
    train_inputs = getattr(datamodule, "train_inputs", None)
    if not callable(train_inputs):
        raise AttributeError(f"tangents={kind!r} needs datamodule.train_inputs() returning the (N, d) training inputs; "
                             f"{name} has no such method")
    data = train_inputs()
    if kind == "local_pca":
        return LocalPCATangents(data, **kwargs)
    return GlobalPCATangents(data, **kwargs)
