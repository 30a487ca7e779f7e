import math

import pytest
import torch
from torch import nn

from evaluation.metrics.alignment import gradient_alignment
from interp_train.losses import per_example_cross_entropy
from tests.helpers import tiny_mlp


class FixedSubspace:
    """Tangent provider for data in a linear subspace: the same U (d, k) at every point."""

    def __init__(self, basis: torch.Tensor):
        self.U = torch.linalg.qr(basis.to(torch.float64))[0]
        self.dim = self.U.shape[1]

    def basis(self, x, extras=None):
        return self.U.expand(x.shape[0], *self.U.shape)


def _batches(x, y, batch_size):
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


def test_exact_value_linear_model_logit():
    # logits = W x: the gradient of the target logit is the row W[y], known by hand
    d, k = 5, 2
    model = nn.Linear(d, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0],     # fully in span(e1, e2)
                                         [0.0, 0.0, 1.0, 0.0, 0.0],     # fully off
                                         [1.0, 0.0, 1.0, 0.0, 0.0]]))   # half the norm²
    tangents = FixedSubspace(torch.eye(d)[:, :k])
    x = torch.randn(6, d)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res = gradient_alignment(model, _batches(x, y, 4), tangents, target="logit", progress=False)
    expected = torch.tensor([1.0, 0.0, math.sqrt(0.5)] * 2, dtype=torch.float64)
    torch.testing.assert_close(res.fractions, expected)
    assert res.k == 2 and res.d == 5 and res.baseline == pytest.approx(math.sqrt(2 / 5))
    assert res.mean == pytest.approx(float(expected.mean()))
    d_json = res.to_dict()
    assert d_json["n"] == 6 and "fractions" not in d_json
    assert len(res.to_dict(include_fractions=True)["fractions"]) == 6


def test_loss_gradient_matches_jacrev_on_mlp():
    d, k = 6, 3
    model = tiny_mlp(d, 8, 3)
    tangents = FixedSubspace(torch.randn(d, k))
    x, y = torch.randn(10, d), torch.randint(0, 3, (10,))
    res = gradient_alignment(model, _batches(x, y, 5), tangents, target="loss", progress=False)

    def loss_one(xi, yi):
        return per_example_cross_entropy(model(xi[None]), yi[None])[0]

    grads = torch.stack([torch.func.grad(loss_one)(x[i], y[i]) for i in range(10)]).double()
    U = tangents.U
    expected = (grads @ U @ U.T).norm(dim=1) / grads.norm(dim=1)
    torch.testing.assert_close(res.fractions, expected)


def test_random_gradients_give_baseline():
    # gradient of the target logit of a linear model with random rows is a
    # random Gaussian vector: frac² ~ Beta(k/2, (d-k)/2), mean k/d
    d, k, n = 60, 6, 3000
    model = nn.Linear(d, n, bias=False)  # one independent random row per example
    nn.init.normal_(model.weight)
    tangents = FixedSubspace(torch.randn(d, k))
    x, y = torch.randn(n, d), torch.randperm(n)
    res = gradient_alignment(model, _batches(x, y, 500), tangents, target="logit", progress=False)
    a, b = k / 2, (d - k) / 2
    sd_sq = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)) / n)
    assert (res.fractions**2).mean().item() == pytest.approx(k / d, abs=4 * sd_sq)
    # E[frac] is sqrt(k/d) up to O(1/k) Jensen gap (~ 4 % here)
    assert res.mean == pytest.approx(res.baseline, rel=0.06)


def test_embedding_site_on_transformer_matches_manual_hook():
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, n_heads=2, d_vocab=7,
                                  d_vocab_out=7, d_mlp=16, act_fn="relu", normalization_type=None, seed=0)
    model = TransformerBridge.boot_native(cfg)
    tokens, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    D = 3 * 8
    tangents = FixedSubspace(torch.randn(D, 4))
    res = gradient_alignment(model, [(tokens, y)], tangents, target="loss", site="hook_embed", progress=False)

    store = {}

    def keep(_m, _i, out):
        out.retain_grad()
        store["embed"] = out

    handle = model.hook_dict["hook_embed"].register_forward_hook(keep)
    model.eval()
    per_example_cross_entropy(model(tokens), y).sum().backward()
    handle.remove()
    g = store["embed"].grad.reshape(5, D).double()
    U = tangents.U
    torch.testing.assert_close(res.fractions, (g @ U @ U.T).norm(dim=1) / g.norm(dim=1))
    assert res.d == D and res.site == "hook_embed"


def test_bad_inputs_raise():
    model = tiny_mlp(6, 8, 3)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    tangents = FixedSubspace(torch.randn(6, 2))
    with pytest.raises(ValueError, match="unknown target 'margin'"):
        gradient_alignment(model, [(x, y)], tangents, target="margin", progress=False)
    with pytest.raises(ValueError, match=r"expected \(B, d, k\)"):
        gradient_alignment(model, [(x, y)], FixedSubspace(torch.randn(5, 2)), progress=False)
    with pytest.raises(TypeError, match="integer tokens"):
        gradient_alignment(model, [(x.long(), y)], tangents, progress=False)
    with pytest.raises(KeyError, match="unknown layer"):
        gradient_alignment(model, [(x, y)], tangents, site="nope", progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        gradient_alignment(model, [(x, y)], tangents, max_batches=0, progress=False)


def test_local_pca_tangents_close_to_exact_on_known_manifold():
    import interp_train.tangents as tangents_mod
    # points on a 2-sphere of radius 1 in R^3 embedded in R^5: exact tangent = span of the two
    # directions orthogonal to the radius within the first three coordinates
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(4000, 3, generator=g, dtype=torch.float64)
    pts = pts / pts.norm(dim=1, keepdim=True)
    data = torch.cat([pts, torch.zeros(4000, 2, dtype=torch.float64)], dim=1)
    provider = tangents_mod.LocalPCATangents(data, dim=2, n_neighbors=30)
    query = data[:50]
    U_est = provider.basis(query, None).to(torch.float64)
    # exact: complete the radius to an orthonormal basis of R^3 and keep the other two columns
    radial = torch.cat([pts[:50], torch.zeros(50, 2, dtype=torch.float64)], dim=1)
    P_exact = torch.eye(5, dtype=torch.float64)[None, :, :3] @ torch.eye(5, dtype=torch.float64)[None, :3, :]
    P_exact = P_exact - radial[:, :, None] * radial[:, None, :]
    # largest principal angle: sin θ_max = ||(I - P_exact) U_est||_2
    resid = U_est - P_exact @ U_est
    sin_max = torch.linalg.matrix_norm(resid, ord=2)
    assert float(sin_max.max()) < 0.15
