"""Tangent providers, the synthetic manifold generator and the off-manifold regularizers."""

import pytest
import torch
from torch import nn
from torch.func import jacrev

from interp_train import regularized_loss
from interp_train.data.manifold_generator import SmoothManifoldGenerator
from interp_train.regularizers.base import RegularizerContext
from interp_train.regularizers.manifold import OffManifoldGradientPenalty, OffManifoldNoisePenalty
from interp_train.tangents import (
    ExactTangents, GlobalPCATangents, LocalPCATangents, fit_from_datamodule, project_off, project_on,
    tangent_fraction,
)
from tests.helpers import quiet_trainer

f64 = torch.float64


def projector(U: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column span of U (..., d, k), by pseudo-inverse."""
    return U @ torch.linalg.pinv(U)


def sin_largest_angle(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """sin of the largest principal angle between span(U) and span(V) (orthonormal, batched)."""
    cos = torch.linalg.svdvals(U.transpose(-1, -2).to(f64) @ V.to(f64))
    return (1 - cos.min(dim=-1).values ** 2).clamp_min(0).sqrt()


class LinearEmbedding:
    """Test-only generator x = A z with a non-orthogonal A (duck-types SmoothManifoldGenerator)."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.ambient_dim, self.latent_dim = A.shape

    def __call__(self, z):
        return z @ self.A.T.to(z.dtype)

    def jacobian(self, z):
        return self.A.to(z.dtype).expand(z.shape[0], -1, -1)


class FakeDataModule:
    """Follows the tangent-provider contract: .generator and .train_inputs()."""

    def __init__(self, generator, n=600, seed=0):
        self.generator = generator
        self.z, self.x = generator.sample(n, torch.Generator().manual_seed(seed))

    def train_inputs(self):
        return self.x


# --------------------------------------------------------------------------- generator
def test_generator_is_deterministic_and_its_jacobian_matches_the_formula():
    g = SmoothManifoldGenerator(latent_dim=3, ambient_dim=20, hidden=16, seed=5)
    g2 = SmoothManifoldGenerator(latent_dim=3, ambient_dim=20, hidden=16, seed=5)
    z, x = g.sample(7, torch.Generator().manual_seed(1), dtype=f64)
    z2, x2 = g2.sample(7, torch.Generator().manual_seed(1), dtype=f64)
    assert torch.equal(x, x2) and torch.equal(z, z2)
    assert x.shape == (7, 20) and z.abs().max() <= 1.0
    # the docstring's formula: A + scale · C W₂ diag(tanh′(frequency · W₁ z + b)) W₁
    tanh_prime = 1 - torch.tanh(g.frequency * z @ g.W1.T + g.b) ** 2
    expected = g.A + g.scale * torch.einsum("dm,mh,bh,hk->bdk", g.C, g.W2, tanh_prime, g.W1)
    J = g.jacobian(z)
    torch.testing.assert_close(J, expected, atol=1e-12, rtol=1e-10)
    assert torch.linalg.svdvals(J).min() >= 1 - 1e-12  # an immersion: σ_min >= 1
    torch.testing.assert_close(x @ g.A, z, atol=1e-12, rtol=0)  # Aᵀ g(z) = z: injective


# --------------------------------------------------------------------------- exact tangents
def test_exact_tangents_of_a_linear_embedding_span_its_columns():
    A = torch.randn(12, 3, dtype=f64)
    z = torch.randn(5, 3, dtype=f64)
    lin = LinearEmbedding(A)
    U = ExactTangents(lin).basis(lin(z), {"latents": z})
    assert U.shape == (5, 12, 3) and U.dtype == f64
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(3, dtype=f64).expand(5, 3, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(U @ U.transpose(1, 2), projector(A).expand(5, 12, 12), atol=1e-6, rtol=0)
    # the generator with scale 0 is the linear map z -> A z; reference columns g(e_j)
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=9, scale=0.0)
    columns = g(torch.eye(2, dtype=f64)).T
    U0 = ExactTangents(g).basis(g(z[:, :2]), {"latents": z[:, :2]})
    torch.testing.assert_close(U0 @ U0.transpose(1, 2), projector(columns).expand(5, 9, 9), atol=1e-6, rtol=0)


def test_exact_tangents_match_finite_differences_of_the_nonlinear_generator():
    g = SmoothManifoldGenerator(latent_dim=3, ambient_dim=32, seed=1)
    z, x = g.sample(16, torch.Generator().manual_seed(0), dtype=f64)
    U = ExactTangents(g).basis(x, {"latents": z})
    h = 1e-5
    eye = torch.eye(3, dtype=f64)
    fd = torch.stack([(g(z + h * eye[j]) - g(z - h * eye[j])) / (2 * h) for j in range(3)], dim=-1)
    V = torch.linalg.qr(fd).Q
    assert sin_largest_angle(U, V).max() < 1e-6
    # and the tangent spaces really rotate across the manifold (the generator is not linear)
    assert sin_largest_angle(U[:1], U[1:]).mean() > 0.1


def test_exact_tangents_look_up_registered_latents_and_refuse_unknown_inputs():
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=10)
    z, x = g.sample(50, torch.Generator().manual_seed(0))
    provider = ExactTangents(g)
    with pytest.raises(KeyError, match="no latent known for this input; pass latents in the batch"):
        provider.basis(x[:3])
    provider.register(x, z)
    U = provider.basis(x[[4, 9]])
    torch.testing.assert_close(U, provider.basis(x[[4, 9]], {"latents": z[[4, 9]]}))
    with pytest.raises(KeyError, match=r"no latent known for this input \(example 1: nearest registered input is"):
        provider.basis(torch.stack([x[0], x[0] + 0.5]))


# --------------------------------------------------------------------------- projections
def test_projections_are_orthogonal_and_sum_to_the_identity():
    U = torch.linalg.qr(torch.randn(4, 6, 2, dtype=f64)).Q
    v = torch.randn(4, 2, 3, dtype=f64)  # extra dims are flattened to d = 6
    off, on = project_off(U, v), project_on(U, v)
    assert off.shape == v.shape
    assert (U.transpose(1, 2) @ off.reshape(4, 6, 1)).abs().max() < 1e-6
    torch.testing.assert_close(on + off, v)
    P = U @ U.transpose(1, 2)
    torch.testing.assert_close(on.reshape(4, 6), (P @ v.reshape(4, 6, 1)).squeeze(-1))
    frac = tangent_fraction(U, v)
    torch.testing.assert_close(frac, on.reshape(4, -1).norm(dim=1) / v.reshape(4, -1).norm(dim=1))


# --------------------------------------------------------------------------- PCA providers
def test_local_pca_recovers_the_exact_tangent_spaces_of_a_curved_manifold():
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=24, seed=3)
    _, data = g.sample(3000, torch.Generator().manual_seed(0))
    zq, xq = g.sample(200, torch.Generator().manual_seed(1))
    local = LocalPCATangents(data, n_neighbors=20, explained_variance=0.95)
    assert local.dim == 2  # chosen by explained variance
    U = local.basis(xq)
    assert U.shape == (200, 24, 2) and U.dtype == torch.float32
    exact = ExactTangents(g).basis(xq, {"latents": zq})
    sines = sin_largest_angle(U, exact)
    assert sines.mean() < 0.05, float(sines.mean())
    # global PCA cannot follow the curvature: far worse on the same data
    assert sin_largest_angle(GlobalPCATangents(data, dim=2).basis(xq), exact).mean() > 3 * sines.mean()


def test_local_pca_excludes_the_query_itself_from_its_neighbourhood():
    data = torch.randn(40, 5, dtype=f64)
    U_in = LocalPCATangents(data, dim=2, n_neighbors=6).basis(data[:1])
    U_out = LocalPCATangents(data[1:], dim=2, n_neighbors=6).basis(data[:1])
    torch.testing.assert_close(U_in @ U_in.transpose(1, 2), U_out @ U_out.transpose(1, 2), atol=1e-10, rtol=0)
    # reference: the 6 nearest other points, centred, top-2 eigenvectors of their covariance
    dist = (data[1:] - data[0]).norm(dim=1)
    hood = data[1:][dist.argsort()[:6]]
    _, vecs = torch.linalg.eigh(torch.cov(hood.T))
    torch.testing.assert_close(U_in[0] @ U_in[0].T, projector(vecs[:, -2:]), atol=1e-10, rtol=0)


def test_local_pca_gives_the_same_bases_in_small_chunks(monkeypatch):
    import interp_train.tangents as tangents

    data = torch.randn(200, 12, dtype=f64)
    provider = LocalPCATangents(data, dim=3, n_neighbors=8)
    whole = provider.basis(data[:40])
    monkeypatch.setattr(tangents, "_CHUNK_ELEMENTS", 1000)  # about 3 queries per chunk
    chunked = provider.basis(data[:40])
    torch.testing.assert_close(chunked @ chunked.transpose(1, 2), whole @ whole.transpose(1, 2), atol=1e-10, rtol=0)


def test_global_pca_recovers_a_linear_subspace_exactly():
    A = torch.randn(10, 3, dtype=f64)
    data = torch.randn(500, 3, dtype=f64) @ A.T + 2.0  # offset: PCA centres
    provider = GlobalPCATangents(data, explained_variance=0.999)
    assert provider.dim == 3
    U = provider.basis(torch.randn(4, 10, dtype=f64))
    torch.testing.assert_close(U @ U.transpose(1, 2), projector(A).expand(4, 10, 10), atol=1e-6, rtol=0)


def test_fit_from_datamodule_builds_each_kind():
    dm = FakeDataModule(SmoothManifoldGenerator(latent_dim=2, ambient_dim=8))
    assert isinstance(fit_from_datamodule("exact", dm), ExactTangents)
    local = fit_from_datamodule("local_pca", dm, dim=2, n_neighbors=10)
    assert isinstance(local, LocalPCATangents) and local.dim == 2
    assert isinstance(fit_from_datamodule("global_pca", dm), GlobalPCATangents)


# --------------------------------------------------------------------------- gradient penalty
def test_off_manifold_gradient_penalty_equals_a_naive_per_example_loop():
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=8, seed=2)
    z, x = g.sample(6, torch.Generator().manual_seed(0), dtype=f64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(f64)
    reg = OffManifoldGradientPenalty(tangents=ExactTangents(g))
    out = regularized_loss(model, x, y, [reg], extras={"latents": z})
    term = out.terms["off_manifold_gradient_penalty/off_manifold_grad"]
    param_grads = torch.autograd.grad(term, list(model.parameters()))

    naive = 0.0
    for i in range(6):
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(xi), y[i:i + 1])
        (grad,) = torch.autograd.grad(loss, xi, create_graph=True)
        U = torch.linalg.qr(jacrev(g)(z[i])).Q  # reverse-mode reference Jacobian
        off = (torch.eye(8, dtype=f64) - U @ U.T) @ grad[0]
        naive = naive + off.pow(2).sum() / 6
    torch.testing.assert_close(term, naive, atol=1e-12, rtol=1e-9)
    for got, want in zip(param_grads, torch.autograd.grad(naive, list(model.parameters()))):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)


def test_normalized_off_manifold_gradient_penalty_is_the_off_manifold_share_of_a_naive_loop():
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=8, seed=3)
    z, x = g.sample(6, torch.Generator().manual_seed(1), dtype=f64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(f64)
    for target in ("loss", "logit"):
        reg = OffManifoldGradientPenalty(tangents=ExactTangents(g), target=target, normalize=True)
        out = regularized_loss(model, x, y, [reg], extras={"latents": z})
        term = out.terms[f"{reg.name}/off_manifold_grad_share"]
        naive = 0.0
        for i in range(6):
            xi = x[i:i + 1].clone().requires_grad_(True)
            logits = model(xi)
            score = (nn.functional.cross_entropy(logits, y[i:i + 1]) if target == "loss" else logits[0, y[i]])
            (grad,) = torch.autograd.grad(score, xi, create_graph=True)
            U = torch.linalg.qr(jacrev(g)(z[i])).Q
            on = U @ (U.T @ grad[0])
            naive = naive + (1 - on.pow(2).sum() / grad.pow(2).sum()) / 6  # 1 − alignment²
        torch.testing.assert_close(term, naive, atol=1e-12, rtol=1e-9)
        assert 0 < term.item() < 1
        params = list(model.parameters())  # the last bias does not reach the logit gradient
        for got, want in zip(torch.autograd.grad(term, params, allow_unused=True),
                             torch.autograd.grad(naive, params, allow_unused=True)):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-9)
    # scale-free: doubling the logits' scale changes the plain penalty, not the logit gradient's share
    reg = OffManifoldGradientPenalty(tangents=ExactTangents(g), target="logit", normalize=True, name="share")
    plain = OffManifoldGradientPenalty(tangents=ExactTangents(g), target="logit", name="plain")
    before = regularized_loss(model, x, y, [reg, plain], extras={"latents": z}).terms
    with torch.no_grad():
        model[2].weight.mul_(2.0)
        model[2].bias.mul_(2.0)
    after = regularized_loss(model, x, y, [reg, plain], extras={"latents": z}).terms
    share, sq = f"{reg.name}/off_manifold_grad_share", f"{plain.name}/off_manifold_grad"
    torch.testing.assert_close(after[share], before[share], atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(after[sq], 4 * before[sq], atol=1e-12, rtol=1e-9)


def test_normalized_off_manifold_gradient_penalty_counts_a_zero_gradient_as_zero_with_finite_gradients():
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=8, seed=3)
    z, x = g.sample(4, torch.Generator().manual_seed(1), dtype=f64)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(f64)
    nn.init.zeros_(model[2].weight)  # every input gradient is 0
    reg = OffManifoldGradientPenalty(tangents=ExactTangents(g), normalize=True)
    term = regularized_loss(model, x, torch.tensor([0, 1, 2, 0]), [reg], extras={"latents": z}).terms[
        f"{reg.name}/off_manifold_grad_share"]
    assert term.item() == 0.0
    assert all(torch.isfinite(p).all() for p in torch.autograd.grad(term, list(model.parameters()), allow_unused=True)
               if p is not None)
    with pytest.raises(TypeError, match="normalize must be True or False, got 'yes'"):
        OffManifoldGradientPenalty(tangents=ExactTangents(g), normalize="yes")


def test_off_manifold_gradient_penalty_vanishes_for_a_model_of_on_manifold_coordinates():
    g = SmoothManifoldGenerator(latent_dim=3, ambient_dim=12, scale=0.0)  # the linear subspace span(A)
    z, x = g.sample(32, torch.Generator().manual_seed(0), dtype=f64)
    P = g.A.clone()
    head = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4)).to(f64)
    model = nn.Sequential(nn.Linear(12, 3, bias=False).to(f64), head)
    model[0].weight.data = P.T.clone()  # f(x) = h(Pᵀx)
    y = torch.randint(0, 4, (32,))
    for target in ("loss", "logit", "logprob"):
        for provider in (ExactTangents(g), GlobalPCATangents(x)):
            reg = OffManifoldGradientPenalty(tangents=provider, target=target)
            term = regularized_loss(model, x, y, [reg], extras={"latents": z}).terms[f"{reg.name}/off_manifold_grad"]
            assert term.item() < 1e-20
    # while a generic model is penalised
    model[0].weight.data = torch.randn(3, 12, dtype=f64)
    reg = OffManifoldGradientPenalty(tangents=ExactTangents(g))
    assert regularized_loss(model, x, y, [reg], extras={"latents": z}).terms[f"{reg.name}/off_manifold_grad"] > 1e-3


# --------------------------------------------------------------------------- noise penalty
def test_off_manifold_noise_is_orthogonal_and_the_penalty_uses_it():
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=10)
    z, x = g.sample(8, torch.Generator().manual_seed(0), dtype=f64)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)).to(f64)
    reg = OffManifoldNoisePenalty(tangents=ExactTangents(g), sigma=0.3)
    ctx = RegularizerContext(model, x, torch.zeros(8, dtype=torch.long), extras={"latents": z}, sites=["input"])
    torch.manual_seed(7)
    noise = reg.off_manifold_noise(ctx)
    U = torch.linalg.qr(g.jacobian(z)).Q
    assert (U.transpose(1, 2) @ noise.unsqueeze(-1)).abs().max() < 1e-6
    assert noise.norm(dim=1).mean() > 0.3  # not trivially zero: ≈ σ·sqrt(d − k)
    torch.manual_seed(7)
    term = reg.terms(ctx)["off_manifold_noise"]
    expected = (model(x) - model(x + noise)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(term, expected)


def test_off_manifold_noise_penalty_of_a_linear_model_has_the_analytic_expectation():
    # f(x) = Wx: ||W P⊥ ε||² with ε ~ N(0, σ²I) has mean σ² ||W P⊥||_F² and variance 2σ⁴ ||(WP⊥)(WP⊥)ᵀ||_F²
    g = SmoothManifoldGenerator(latent_dim=2, ambient_dim=12, seed=4)
    B, sigma = 4000, 0.2
    z, x = g.sample(B, torch.Generator().manual_seed(0), dtype=f64)
    model = nn.Linear(12, 5, bias=False).to(f64)
    reg = OffManifoldNoisePenalty(tangents=ExactTangents(g), sigma=sigma)
    term = regularized_loss(model, x, torch.zeros(B, dtype=torch.long), [reg], extras={"latents": z}).terms[
        f"{reg.name}/off_manifold_noise"]
    U = torch.linalg.qr(g.jacobian(z)).Q
    M = model.weight.detach() @ (torch.eye(12, dtype=f64) - U @ U.transpose(1, 2))  # (B, 5, 12)
    mean = sigma**2 * M.pow(2).sum(dim=(1, 2)).mean()
    se = (2 * sigma**4 * (M @ M.transpose(1, 2)).pow(2).sum(dim=(1, 2))).sum().sqrt() / B
    assert abs(term.item() - mean.item()) < 4 * se.item(), (term.item(), mean.item(), se.item())
    # the unprojected penalty would be measurably larger
    assert sigma**2 * model.weight.pow(2).sum().item() > mean.item() + 10 * se.item()


# --------------------------------------------------------------------------- setup by name
class ManifoldClassifier(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


def test_named_tangents_are_fitted_in_setup_including_by_the_lightning_mixin():
    import lightning as L
    from interp_train import attach_regularizers

    gen = SmoothManifoldGenerator(latent_dim=2, ambient_dim=8)

    class DM(L.LightningDataModule):
        def __init__(self):
            super().__init__()
            self.generator = gen
            self.z, self.x = gen.sample(64, torch.Generator().manual_seed(0))

        def train_inputs(self):
            return self.x

        def train_dataloader(self):
            y = (self.z[:, 0] > 0).long()
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, y, self.z), batch_size=16)

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ManifoldClassifier(8)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    regs = [OffManifoldGradientPenalty(tangents="exact", weight=0.5),
            OffManifoldNoisePenalty(tangents="local_pca", tangent_kwargs={"dim": 2, "n_neighbors": 8})]
    module = attach_regularizers(Lit(), regs)
    quiet_trainer(max_steps=3).fit(module, datamodule=DM())
    assert isinstance(regs[0].provider, ExactTangents)
    assert isinstance(regs[1].provider, LocalPCATangents) and regs[1].provider.dim == 2
    assert regs[0].step == 3


# --------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    data = torch.randn(30, 4)
    with pytest.raises(ValueError, match=r"unknown tangent provider 'pca'; allowed: exact, local_pca, global_pca"):
        fit_from_datamodule("pca", FakeDataModule(SmoothManifoldGenerator(2, 4)))
    with pytest.raises(ValueError, match=r"unknown tangent provider 'pca'; allowed: exact, local_pca, global_pca"):
        OffManifoldGradientPenalty(tangents="pca")
    with pytest.raises(ValueError, match=r"tangent dim 5 is larger than the ambient dimension 4"):
        GlobalPCATangents(data, dim=5)
    with pytest.raises(ValueError, match=r"tangent dim 5 is larger than the ambient dimension 4"):
        LocalPCATangents(data, dim=5, n_neighbors=10)
    with pytest.raises(ValueError, match=r"n_neighbors \(3\) must be at least dim \+ 1 \(4\)"):
        LocalPCATangents(data, dim=3, n_neighbors=3)
    with pytest.raises(ValueError, match=r"n_neighbors \(30\) must be smaller than the number of training points \(30\)"):
        LocalPCATangents(data, dim=2, n_neighbors=30)
    with pytest.raises(ValueError, match=r"explained_variance must be in \(0, 1\], got 1.5"):
        GlobalPCATangents(data, explained_variance=1.5)
    with pytest.raises(ValueError, match=r"sigma must be a finite number >= 0, got -0.1"):
        OffManifoldNoisePenalty(sigma=-0.1)
    with pytest.raises(ValueError, match=r"unknown target 'margin'; allowed: loss, logit, logprob"):
        OffManifoldGradientPenalty(target="margin")
    reg = OffManifoldNoisePenalty(tangents="global_pca")
    with pytest.raises(RuntimeError, match=r"tangents='global_pca' by name.*call reg.setup\(model, datamodule\)"):
        regularized_loss(nn.Linear(4, 2), data[:3], torch.zeros(3, dtype=torch.long), [reg])
    with pytest.raises(AttributeError, match=r"needs datamodule.generator"):
        fit_from_datamodule("exact", object())
    with pytest.raises(AttributeError, match=r"needs datamodule.train_inputs\(\)"):
        fit_from_datamodule("local_pca", object())
    with pytest.raises(TypeError, match=r"integer tokens have no gradient"):
        reg = OffManifoldGradientPenalty(tangents=GlobalPCATangents(data))
        regularized_loss(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(4, 2)),
                         torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long), [reg])
    with pytest.raises(ValueError, match=r"latents must have shape \(3, 2\) for this batch, got \(3, 5\)"):
        g = SmoothManifoldGenerator(2, 4)
        ExactTangents(g).basis(g(torch.zeros(3, 2)), {"latents": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match=r"inputs of shape \(3, 7\) have 7 features; the tangent provider has 4"):
        GlobalPCATangents(data).basis(torch.zeros(3, 7))
