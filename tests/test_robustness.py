import pytest
import torch
from torch import nn

from evaluation.metrics.robustness import evaluate_accuracy, manifold_robustness
from interp_train.tangents import GlobalPCATangents
from tests.helpers import tiny_mlp


class Through(nn.Module):
    """f(x) = net(M x): depends on x only through the projection M."""

    def __init__(self, M: torch.Tensor, net: nn.Module):
        super().__init__()
        self.register_buffer("M", M)
        self.net = net

    def forward(self, x):
        return self.net(x @ self.M.T)


def _subspace_data(n=64, d=6, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, k, generator=g))[0]
    x = torch.randn(n, k, generator=g) @ U.T
    y = torch.randint(0, 3, (n,), generator=g)
    return U, x, y


def _batches(x, y, bs=16):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]


def test_on_manifold_model_has_zero_off_manifold_change():
    U, x, y = _subspace_data()
    tangents = GlobalPCATangents(x.double(), dim=2)  # recovers span(U) from data in the subspace
    on_only = Through(U @ U.T, tiny_mlp(6, 8, 3))
    res = manifold_robustness(on_only, _batches(x, y), tangents, eps=(0.1, 1.0), n_draws=3, progress=False)
    assert max(res.off_change) < 1e-5
    assert min(res.on_change) > 1e-3
    assert all(r < 1e-2 for r in res.ratio)
    # the mirror image: a model that reads only the orthogonal complement does not react on-manifold
    off_only = Through(torch.eye(6) - U @ U.T, tiny_mlp(6, 8, 3))
    res = manifold_robustness(off_only, _batches(x, y), tangents, eps=(0.1, 1.0), n_draws=3, progress=False)
    assert max(res.on_change) < 1e-5 and min(res.off_change) > 1e-3
    assert res.n_examples == 64 and res.k == 2 and res.d == 6
    assert set(res.to_dict()) >= {"eps", "on_change", "off_change", "ratio"}


def test_matches_naive_loop():
    U, x, y = _subspace_data(n=12, seed=1)
    x = x + 0.1 * torch.randn_like(x)  # generic points; the tangent basis is still U
    model = tiny_mlp(6, 8, 3)

    class Fixed:
        def basis(self, pts, extras=None):
            return U.double().expand(pts.shape[0], 6, 2)

    eps = (0.05, 0.5)
    res = manifold_robustness(model, _batches(x, y, 5), Fixed(), eps=eps, n_draws=2, seed=7, progress=False)

    # naive reference: same random stream (per batch, per draw: z (B,k) then w (B,d)), explicit loops
    gen = torch.Generator().manual_seed(7)
    P = U.double() @ U.double().T
    on = torch.zeros(2, dtype=torch.float64)
    off = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for xb, _ in _batches(x, y, 5):
            for _ in range(2):
                z = torch.randn(len(xb), 2, generator=gen, dtype=torch.float64)
                w = torch.randn(len(xb), 6, generator=gen, dtype=torch.float64)
                for i in range(len(xb)):
                    u_on = U.double() @ z[i]
                    u_on = u_on / u_on.norm()
                    u_off = w[i] - P @ w[i]
                    u_off = u_off / u_off.norm()
                    p0 = torch.softmax(model(xb[i:i + 1]).double(), -1)
                    for j, e in enumerate(eps):
                        for u, acc in ((u_on, on), (u_off, off)):
                            p = torch.softmax(model(xb[i:i + 1] + (e * u).float()).double(), -1)
                            acc[j] += (p - p0).abs().sum()
    torch.testing.assert_close(torch.tensor(res.on_change, dtype=torch.float64), on / 24, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(res.off_change, dtype=torch.float64), off / 24, rtol=1e-5, atol=1e-7)
    assert res.ratio[1] == pytest.approx(res.off_change[1] / res.on_change[1])


def test_bad_arguments_raise():
    U, x, y = _subspace_data(n=8)
    tangents = GlobalPCATangents(x.double(), dim=2)
    model = tiny_mlp(6, 8, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        manifold_robustness(model, _batches(x, y), tangents, eps=(0.1, -1.0), progress=False)
    with pytest.raises(ValueError, match="n_draws must be a positive integer"):
        manifold_robustness(model, _batches(x, y), tangents, n_draws=0, progress=False)
    with pytest.raises(TypeError, match="integer tokens"):
        manifold_robustness(model, [(x.long(), y)], tangents, progress=False)


def test_evaluate_accuracy_against_manual():
    model = tiny_mlp(6, 8, 3)
    x, y = torch.randn(37, 6), torch.randint(0, 3, (37,))
    res = evaluate_accuracy(model, _batches(x, y, 10), progress=False)
    with torch.no_grad():
        out = model(x)
    assert res["n"] == 37
    assert res["accuracy"] == pytest.approx((out.argmax(1) == y).double().mean().item())
    assert res["loss"] == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-6)
    # a batch-mean loss function is weighted by batch size, giving the same example mean
    res_mean = evaluate_accuracy(model, _batches(x, y, 10), loss_fn=nn.functional.cross_entropy, progress=False)
    assert res_mean["loss"] == pytest.approx(res["loss"], rel=1e-6)
    # regression targets: no accuracy
    reg = evaluate_accuracy(nn.Linear(6, 1), [(x, torch.randn(37, 1))], loss_fn=nn.functional.mse_loss,
                            progress=False)
    assert reg["accuracy"] is None and reg["loss"] > 0
