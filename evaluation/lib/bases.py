"""Bases of one node layer from its moments: PCA (step 2, step 6), LIB (step 4) and the neuron basis
(docs/DESIGN.md §4.2, §4.3, §4.5, §4.7).

With a = [1, f] the augmented activation (f: d units, viewed as rows over examples and positions):
Y = [[1, −μ], [0, I]] centres; Cov(f) = U D Uᵀ (float64 eigh, D ≤ truncation·max D dropped),
U_full = blockdiag(1, U), D_full = [1, D]; R = Y U_full D_full^{-1/2}, R⁺ = D_full^{1/2} U_fullᵀ Y⁻¹.
PCA: C = Y U_full, C⁺ = U_fullᵀ Y⁻¹, Lambda = D_full. LIB from the Jacobian Gram M′ (padded with
a zero constant row/column): M = R⁺ M′ R⁺ᵀ, Λ_0 = M_00, M[1:, 1:] = V Λ Vᵀ, C = R V Λ^{1/2},
C⁺ = Λ^{-1/2} Vᵀ R⁺. Neuron (the unrotated layer): C = C⁺ = I, Lambda_k = E[a_k²].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from evaluation.lib.config import LIBConfig


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



class Moments:
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


def reduced_moments(name: str, moments: Moments, reduce: Reduce) -> Moments:
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
    out = Moments()
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


def _eigh_kept(matrix: Tensor, truncation: float, empty_error: str) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of a symmetric matrix, keeping those above
    truncation × the largest; ValueError(empty_error) when the largest is not positive."""
    vals, vecs = torch.linalg.eigh(matrix)
    vals, vecs = vals.flip(0), vecs.flip(1)
    if not vals.numel() or vals[0] <= 0:
        raise ValueError(empty_error)
    keep = vals > truncation * vals[0]
    return vals[keep], vecs[:, keep]


def _pca_frame(name: str, moments: Moments, config: LIBConfig):
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


def pca_basis(name: str, moments: Moments, config: LIBConfig) -> LayerBasis:
    """C = Y U_full, C⁺ = U_fullᵀ Y⁻¹, Lambda = D_full (step 6)."""
    Y, Y_inv, U_full, D_full = _pca_frame(name, moments, config)
    return LayerBasis(name, Y @ U_full, U_full.T @ Y_inv, D_full, moments.mean())


def neuron_basis(name: str, moments: Moments) -> LayerBasis:
    """The unrotated layer: C = C⁺ = I (constant first), Lambda_k = E[a_k²]."""
    mean = moments.mean()
    d = mean.shape[0]
    eye = torch.eye(d + 1, dtype=torch.float64, device=mean.device)
    second = torch.cat([torch.ones(1, dtype=torch.float64, device=mean.device), moments.sq / moments.n])
    return LayerBasis(name, eye, eye.clone(), second, moments.mean())


def lib_basis(name: str, moments: Moments, M_dash: Tensor, config: LIBConfig) -> LayerBasis:
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



_Moments = Moments  # the former private name

__all__ = ["LayerBasis", "Moments", "Reduce", "lib_basis", "neuron_basis", "pca_basis", "reduced_moments"]
