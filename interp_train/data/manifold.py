"""Recipe 3: classification on a synthetic nonlinear manifold with exact tangent spaces.

x = g(z), z ~ Uniform[-r, r]^k, g a fixed random smooth embedding R^k -> R^d
(:class:`~interp_train.data.manifold_generator.SmoothManifoldGenerator`). Labels depend on z
only: y = argmax_c <w_c, z> + b_c with fixed random unit vectors w_c (a partition of latent space
into n_classes convex cells). Batches are (x, y, z); the latents let exact-tangent regularizers
and evaluation compute T(x) = span(dg/dz(z)).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import TensorDataset

from interp_train.data.manifold_generator import SmoothManifoldGenerator
from interp_train.recipes import SplitDataModule


def latent_labels(z: torch.Tensor, n_classes: int, seed: int) -> torch.Tensor:
    """y = argmax_c (z @ W^T + b)_c with W rows random unit vectors and small offsets b (seeded)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    w = torch.randn(n_classes, z.shape[1], generator=gen, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    b = 0.1 * torch.randn(n_classes, generator=gen, dtype=torch.float64)
    return (z.double() @ w.T + b).argmax(dim=1)


class ManifoldDataModule(SplitDataModule):
    """(x, y, z) batches on the manifold x = g(z) in R^ambient_dim, z in R^latent_dim.

    generator_seed fixes g and the labelling; data_seed the sampled points. ``generator`` is
    the SmoothManifoldGenerator (``jacobian(z)`` gives the exact tangents).
    """

    task = "manifold"

    def __init__(
        self,
        latent_dim: int = 4,
        ambient_dim: int = 64,
        n_classes: int = 4,
        n_train: int = 4000,
        n_val: int = 1000,
        n_test: int = 2000,
        hidden: int = 64,
        scale: float = 1.5,
        frequency: float = 2.0,
        generator_seed: int = 0,
        data_seed: int = 0,
        batch_size: Optional[int] = 128,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = 1000,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes!r}")
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 1:
                raise ValueError(f"{name} must be >= 1, got {n!r}")
        self.generator = SmoothManifoldGenerator(latent_dim=latent_dim, ambient_dim=ambient_dim, hidden=hidden,
                                                 seed=generator_seed, scale=scale, frequency=frequency)
        self.n_classes, self.n_train, self.n_val, self.n_test = n_classes, n_train, n_val, n_test
        self.generator_seed, self.data_seed = generator_seed, data_seed

    def build(self) -> dict[str, TensorDataset]:
        gen = torch.Generator().manual_seed(self.data_seed)
        out = {}
        for split, n in (("train", self.n_train), ("val", self.n_val), ("test", self.n_test)):
            z, x = self.generator.sample(n, gen)
            out[split] = TensorDataset(x, latent_labels(z, self.n_classes, self.generator_seed), z)
        return out

    def train_latents(self) -> torch.Tensor:
        return self.splits["train"].tensors[2]

    def tangent_basis(self, z: torch.Tensor) -> torch.Tensor:
        """Orthonormal bases U (B, d, k) of T(g(z)) = span(dg/dz), by QR of the exact Jacobian (float64)."""
        jac = self.generator.jacobian(z.double())
        return torch.linalg.qr(jac).Q

    def tangent_provider(self, kind: str = "exact"):
        """A tangent-space provider for regularizers and evaluation (``interp_train.tangents``):
        "exact" (from g's Jacobian), "local_pca" or "global_pca" (estimated from train_inputs()).
        The exact provider knows the latents of every train/val/test input, so ``basis(x)`` works
        for data-set points without passing latents."""
        from interp_train.tangents import fit_from_datamodule

        provider = fit_from_datamodule(kind, self)
        if kind == "exact":
            for ds in self.splits.values():
                provider.register(ds.tensors[0], ds.tensors[2])
        return provider
