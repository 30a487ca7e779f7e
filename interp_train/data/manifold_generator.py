"""A synthetic data manifold with known tangent spaces: a fixed random smooth embedding R^k -> R^d.

    g(z) = A z + (scale / frequency) · C W₂ tanh(frequency · W₁ z + b)

[A | C] is a random orthogonal d×d matrix: A (d, k) spans a k-dimensional subspace and C
(d, d − k) its orthogonal complement. W₁ (hidden, k) ~ N(0, 1/k), W₂ (d − k, hidden)
~ N(0, 1/(hidden·(d − k))), b ~ Uniform(-1, 1)^hidden. All are drawn once from ``seed``.

The manifold is the graph of a smooth function over the subspace span(A), bent into the
complement, so g is an embedding for every scale: Aᵀ g(z) = z (injective), and its Jacobian

    ∂g/∂z = A + scale · C W₂ diag(tanh′(frequency · W₁ z + b)) W₁

has Jᵀ J = I + (nonlinear part)ᵀ(nonlinear part) ⪰ I, so σ_min(∂g/∂z) ≥ 1 (an immersion).
``scale`` sets how far tangent spaces tilt out of span(A) and ``frequency`` how fast they turn
(the second derivative grows like scale · frequency). With the defaults (k=2, d=64) the largest
principal angle between tangent spaces 0.2 apart in z is sin ≈ 0.2 on average, and ≈ 0.5 for
points 1 apart. That rotation is what makes gradient alignment a meaningful measurement: on a
*linear* subspace first-layer weights never move off-manifold (docs/DESIGN.md §3.8).

Latents are drawn uniformly from the cube [-latent_range, latent_range]^k.
"""

from __future__ import annotations

import math

import torch
from torch.func import jacfwd, vmap


class SmoothManifoldGenerator:
    """x = g(z), a fixed random smooth embedding of R^latent_dim into R^ambient_dim (formula above).

    Args:
        latent_dim: k, the manifold dimension.
        ambient_dim: d, the data dimension (d >= k).
        hidden: width of the random tanh layer.
        seed: all weights are a deterministic function of the seed.
        scale: strength of the nonlinear part (>= 0; 0 gives the linear subspace span(A)).
        frequency: how fast the tangent spaces turn (> 0).
        latent_range: latents are uniform on [-latent_range, latent_range]^k.
    """

    def __init__(
        self,
        latent_dim: int = 4,
        ambient_dim: int = 64,
        hidden: int = 64,
        seed: int = 0,
        scale: float = 1.5,
        frequency: float = 2.0,
        latent_range: float = 1.0,
    ):
        if not (isinstance(latent_dim, int) and latent_dim >= 1):
            raise ValueError(f"latent_dim must be an integer >= 1, got {latent_dim!r}")
        if not (isinstance(ambient_dim, int) and ambient_dim >= latent_dim):
            raise ValueError(f"ambient_dim must be an integer >= latent_dim ({latent_dim}), got {ambient_dim!r}")
        if not (isinstance(hidden, int) and hidden >= 1):
            raise ValueError(f"hidden must be an integer >= 1, got {hidden!r}")
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        if not (frequency > 0 and math.isfinite(frequency)):
            raise ValueError(f"frequency must be a finite number > 0, got {frequency!r}")
        if not (latent_range > 0 and math.isfinite(latent_range)):
            raise ValueError(f"latent_range must be a finite number > 0, got {latent_range!r}")
        self.latent_dim, self.ambient_dim, self.hidden = latent_dim, ambient_dim, hidden
        self.seed, self.scale, self.frequency, self.latent_range = seed, scale, frequency, latent_range

        gen = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(ambient_dim, ambient_dim, generator=gen, dtype=torch.float64)).Q
        self.A, self.C = q[:, :latent_dim], q[:, latent_dim:]  # orthonormal, Cᵀ A = 0
        self.W1 = torch.randn(hidden, latent_dim, generator=gen, dtype=torch.float64) / math.sqrt(latent_dim)
        n_off = max(ambient_dim - latent_dim, 1)
        self.W2 = torch.randn(ambient_dim - latent_dim, hidden, generator=gen, dtype=torch.float64) / math.sqrt(hidden * n_off)
        self.b = 2 * torch.rand(hidden, generator=gen, dtype=torch.float64) - 1
        self._cast: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        return (f"SmoothManifoldGenerator(latent_dim={self.latent_dim}, ambient_dim={self.ambient_dim}, "
                f"hidden={self.hidden}, seed={self.seed}, scale={self.scale}, frequency={self.frequency}, "
                f"latent_range={self.latent_range})")

    def _weights(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._cast:
            self._cast[key] = tuple(t.to(device=like.device, dtype=like.dtype) for t in (self.A, self.C, self.W1, self.W2, self.b))
        return self._cast[key]

    def _check_latents(self, z: torch.Tensor) -> None:
        if not torch.is_floating_point(z) or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"latents must be a float tensor of shape (..., {self.latent_dim}), got {tuple(z.shape)} {z.dtype}"
            )

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """g(z) for z of shape (..., k); returns (..., d) in z's dtype."""
        self._check_latents(z)
        A, C, W1, W2, b = self._weights(z)
        hidden = torch.tanh(self.frequency * (z @ W1.T) + b)
        return z @ A.T + (self.scale / self.frequency) * ((hidden @ W2.T) @ C.T)

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, x): n latents z ~ Uniform[-latent_range, latent_range]^k, shape (n, k), and x = g(z), (n, d).

        x is computed in float64 and cast to ``dtype`` (z is returned in the same dtype).
        """
        z = (2 * torch.rand(n, self.latent_dim, generator=generator, dtype=torch.float64) - 1) * self.latent_range
        return z.to(dtype), self(z).to(dtype)

    def jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """∂g/∂z at each latent, shape (B, d, k), by forward-mode autodiff (vmap of jacfwd)."""
        self._check_latents(z)
        if z.ndim != 2:
            raise ValueError(f"jacobian expects a batch of latents of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        return vmap(jacfwd(self.__call__))(z)
