"""A class-conditional-prior VAE trained on scikit-learn's 8x8 digits; its decoder is a data generator.

Images: the 1797 bundled digits, pixel / 16, bilinearly resized to ``image_size``² (d pixels).
Model: encoder q(z|x) = N(m(x), diag σ²(x)); decoder g(z) = sigmoid(MLP(z)) ∈ (0, 1)^d, smooth
(SiLU hidden units), so ∂g/∂z exists everywhere. The prior is class-conditional,

    p(z | c) = N(μ_c, I_k),   μ_c = radius · u_c   (u_c fixed unit vectors, orthonormal when k ≥ #classes),

so the latent space is partitioned by class and a decoded z ~ p(z|c) looks like digit c.
Training minimises, per example (x, c), the negative ELBO

    L = BCE(g(z), x) summed over pixels + β · KL(N(m, σ²) ‖ N(μ_c, I)),   z = m + σ ⊙ ε,

    KL = ½ Σ_j (σ_j² + (m_j − μ_{c,j})² − 1 − log σ_j²),

with Adam on minibatches, everything seeded (``seed``): the same config gives the same weights.
``trained_decoder(config, cache_dir)`` trains once and caches the weights (atomic write) under
``cache_dir`` (default: $INTERP_TRAIN_CACHE, else $XDG_CACHE_HOME/interp_train, else
~/.cache/interp_train), keyed by a hash of the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import jacfwd, vmap

from interp_train.io import write_atomic

CACHE_FORMAT = 1  # bump when the model or training changes: old cache files are then ignored


@dataclass(frozen=True)
class DigitVAEConfig:
    """Everything that determines the trained decoder (and the cache key)."""

    latent_dim: int = 10
    image_size: int = 16
    hidden: int = 256
    n_classes: int = 10
    radius: float = 3.0
    beta: float = 1.0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("latent_dim", "image_size", "hidden", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int) or not 2 <= self.n_classes <= 10:
            raise ValueError(f"n_classes must be an integer in [2, 10] (digits 0..n_classes-1), got {self.n_classes!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {self.image_size!r}")
        for name in ("radius", "beta", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def key(self) -> str:
        blob = json.dumps({"format": CACHE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def digit_images(image_size: int, n_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, image_size²) float32 in [0, 1], y (N,)) of the scikit-learn digits with label < n_classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    keep = y < n_classes
    x, y = x[keep], y[keep]
    if image_size != 8:
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1).flatten(1), y


def prior_means(latent_dim: int, n_classes: int, radius: float) -> torch.Tensor:
    """μ (n_classes, k) float64: radius · orthonormal rows when k ≥ n_classes, else fixed random unit vectors."""
    gen = torch.Generator().manual_seed(12345)
    if latent_dim >= n_classes:
        q = torch.linalg.qr(torch.randn(latent_dim, latent_dim, generator=gen, dtype=torch.float64)).Q
        units = q[:n_classes]
    else:
        units = torch.randn(n_classes, latent_dim, generator=gen, dtype=torch.float64)
        units = units / units.norm(dim=1, keepdim=True)
    return radius * units


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out))


def build_decoder(config: DigitVAEConfig) -> nn.Module:
    """z (…, k) -> sigmoid(MLP(z)) (…, d)."""
    return nn.Sequential(_mlp(config.latent_dim, config.hidden, config.image_size**2), nn.Sigmoid())


def train_vae(config: DigitVAEConfig) -> tuple[dict[str, torch.Tensor], float]:
    """(decoder state_dict, final mean negative ELBO per example) for ``config`` (deterministic)."""
    x, y = digit_images(config.image_size, config.n_classes)
    mu = prior_means(config.latent_dim, config.n_classes, config.radius).float()
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        encoder = _mlp(x.shape[1], config.hidden, 2 * config.latent_dim)
        decoder = build_decoder(config)
    params = [*encoder.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=config.lr)
    batch, loss_avg = min(config.batch_size, len(y)), float("nan")
    order, pos = torch.randperm(len(y), generator=gen), 0
    for step in range(config.steps):
        if pos + batch > len(y):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        m, logvar = encoder(x[idx]).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = m + (0.5 * logvar).exp() * torch.randn(m.shape, generator=gen)
        recon = nn.functional.binary_cross_entropy(decoder(z), x[idx], reduction="none").sum(1)
        kl = 0.5 * (logvar.exp() + (m - mu[y[idx]]).pow(2) - 1 - logvar).sum(1)
        loss = (recon + config.beta * kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.item()
        loss_avg = value if step == 0 else 0.98 * loss_avg + 0.02 * value
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}, loss_avg


def default_cache_dir() -> Path:
    """$INTERP_TRAIN_CACHE, else $XDG_CACHE_HOME/interp_train, else ~/.cache/interp_train."""
    if os.environ.get("INTERP_TRAIN_CACHE"):
        return Path(os.environ["INTERP_TRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "interp_train"


def trained_decoder(config: DigitVAEConfig, cache_dir: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(decoder state_dict, info) from ``cache_dir/digit_vae/<key>.pt``, training and caching it on a miss."""
    path = Path(cache_dir or default_cache_dir()) / "digit_vae" / f"{config.key()}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("config") == dataclasses.asdict(config):
            return blob["state_dict"], {"path": str(path), "loss": blob["loss"], "cached": True}
    state, loss = train_vae(config)
    buf = io.BytesIO()
    torch.save({"config": dataclasses.asdict(config), "state_dict": state, "loss": loss}, buf)
    write_atomic(path, buf.getvalue())
    return state, {"path": str(path), "loss": loss, "cached": False}


class DigitDecoderGenerator:
    """x = g(z): the trained decoder as a generator of the digit manifold (flat images, (…, d)).

    ``jacobian(z)`` is ∂g/∂z (B, d, k) by forward-mode autodiff (vmap of jacfwd), in z's dtype;
    its column space is the exact tangent space of the generated data at g(z)
    (:class:`~interp_train.tangents.ExactTangents`).
    """

    def __init__(self, config: DigitVAEConfig, state_dict: dict[str, torch.Tensor]):
        self.config = config
        self.latent_dim, self.ambient_dim = config.latent_dim, config.image_size**2
        self.image_shape = (1, config.image_size, config.image_size)
        self._decoder = build_decoder(config).requires_grad_(False)
        self._decoder.load_state_dict(state_dict)
        self._decoder = self._decoder.double()
        self._cast: dict[tuple, nn.Module] = {}

    def __repr__(self) -> str:
        return f"DigitDecoderGenerator(latent_dim={self.latent_dim}, ambient_dim={self.ambient_dim}, key={self.config.key()})"

    def _module(self, like: torch.Tensor) -> nn.Module:
        key = (like.device, like.dtype)
        if key not in self._cast:
            import copy

            self._cast[key] = copy.deepcopy(self._decoder).to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or not torch.is_floating_point(z) or z.shape[-1] != self.latent_dim:
            got = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must be a float tensor of shape (..., {self.latent_dim}), got {got}")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """g(z) for z (…, k): flat images (…, d) in z's dtype."""
        self._check_latents(z)
        return self._module(z)(z)

    def jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """∂g/∂z at each latent, shape (B, d, k)."""
        self._check_latents(z)
        if z.ndim != 2:
            raise ValueError(f"jacobian expects a batch of latents of shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        module = self._module(z)
        return vmap(jacfwd(module))(z)
