import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("devinterp")

from evaluation.metrics.llc import chain_problems, estimate_llc  # noqa: E402
from interp_train.losses import per_example_mse  # noqa: E402


def _regression_at_optimum(d_in=5, n=1000, batch_size=1000, seed=0):
    """Linear regression y = w·x + b + noise with (w, b) at the least-squares optimum: d = d_in + 1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = x @ torch.randn(d_in, 1, generator=g) + 0.5 + torch.randn(n, 1, generator=g)
    design = torch.cat([x, torch.ones(n, 1)], 1).double()
    sol = torch.linalg.lstsq(design, y.double()).solution.float()
    model = nn.Linear(d_in, 1)
    with torch.no_grad():
        model.weight.copy_(sol[:d_in].T)
        model.bias.copy_(sol[d_in])
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
    return model, batches


def test_regular_model_llc_is_half_the_parameter_count():
    # regular model with d = 6 parameters: λ = d/2 = 3. Tolerance as devinterp's own accuracy
    # tests: the true value within mean ± 2 std over chains, and within rtol 0.3
    model, batches = _regression_at_optimum()
    before = [p.detach().clone() for p in model.parameters()]
    res = estimate_llc(model, batches, per_example_mse, lr=3e-4, localization=1.0, num_chains=4,
                       num_draws=300, num_burnin_steps=50, progress=False)
    true_lc = 3.0
    assert res.mean - 2 * res.std < true_lc < res.mean + 2 * res.std, (res.mean, res.std)
    assert res.mean == pytest.approx(true_lc, rel=0.3)
    assert res.healthy and res.chain_health == ["ok"] * 4 and res.warnings == []
    assert res.nbeta == pytest.approx(1000 / math.log(1000))  # devinterp's default B / log B
    assert len(res.loss_traces) == 4 and all(len(t) == 350 for t in res.loss_traces)
    # per-chain value is nβ (mean draw loss − init loss), from the stored traces
    t0 = torch.tensor(res.loss_traces[0][50:], dtype=torch.float64)
    assert res.per_chain[0] == pytest.approx(res.nbeta * (float(t0.mean()) - res.init_loss))
    json.dumps(res.to_dict())  # diagnostics are JSON-serialisable
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # model untouched


def test_unhealthy_chains_warn():
    # started away from the optimum, SGLD finds lower loss: negative LLC
    model, batches = _regression_at_optimum(d_in=2, n=200, batch_size=200)
    with torch.no_grad():
        model.weight.zero_()
    with pytest.warns(RuntimeWarning, match="negative LLC"):
        res = estimate_llc(model, batches, per_example_mse, lr=1e-3, localization=1.0, num_chains=2,
                           num_draws=60, progress=False)
    assert not res.healthy and res.mean < 0
    # a step far beyond the stability limit (lr·nβ·h/2 > 2) blows up
    model, batches = _regression_at_optimum(d_in=2, n=200, batch_size=200)
    with pytest.warns(RuntimeWarning, match="unhealthy"):
        res = estimate_llc(model, batches, per_example_mse, lr=0.1, localization=1.0, num_chains=2,
                           num_draws=100, progress=False)
    assert not res.healthy
    assert all(("diverging" in h) or ("non-finite" in h) for h in res.chain_health)


def test_chain_problems_on_synthetic_traces():
    g = torch.Generator().manual_seed(0)
    settled = (1.0 + 0.05 * torch.rand(400, generator=g)).tolist()
    assert chain_problems(settled, init_loss=0.9, nbeta=10.0) == []
    assert chain_problems(settled, init_loss=1.2, nbeta=10.0) == ["negative LLC"]
    climbing = (1.0 + torch.linspace(0, 1, 400) ** 2).tolist()
    assert chain_problems(climbing, init_loss=0.99, nbeta=10.0) == ["diverging loss trace"]
    assert chain_problems(settled[:10] + [math.nan], init_loss=0.9, nbeta=10.0) == ["non-finite loss"]


def test_bad_arguments_raise():
    model, batches = _regression_at_optimum(d_in=2, n=20, batch_size=20)
    with pytest.raises(ValueError, match="num_chains must be a positive integer, got 0"):
        estimate_llc(model, batches, per_example_mse, num_chains=0, progress=False)
    with pytest.raises(ValueError, match="lr must be positive"):
        estimate_llc(model, batches, per_example_mse, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="nbeta must be positive"):
        estimate_llc(model, batches, per_example_mse, nbeta=0.0, progress=False)
    with pytest.raises(ValueError, match="no batches"):
        estimate_llc(model, [], per_example_mse, nbeta=5.0, progress=False)


def test_transformer_bridge_chains_leave_the_model_as_it_was():
    # TransformerLens bridges cannot be deep-copied after a copy ran forward (its hooks write into
    # the original); chains run in place and restore w*: a second chain, and a second call, work
    from interp_train.models.transformer import Transformer
    from interp_train.losses import per_example_cross_entropy

    torch.manual_seed(0)
    model = Transformer(d_vocab=6, d_vocab_out=5, n_ctx=3, d_model=8, n_heads=2, d_head=4, d_mlp=16, init_seed=0)
    tokens = torch.randint(0, 5, (32, 3))
    batches = [(tokens, torch.randint(0, 5, (32,)))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want_loss = float(per_example_cross_entropy(model(tokens), batches[0][1]).mean())
    for _ in range(2):
        res = estimate_llc(model, batches, per_example_cross_entropy, nbeta=10.0, num_chains=2, num_draws=5, num_burnin_steps=0,
                           progress=False)
        assert len(res.loss_traces) == 2 and all(len(t) == 5 for t in res.loss_traces)
    assert res.init_loss == pytest.approx(want_loss, rel=1e-6)
    assert res.loss_traces[0][0] == pytest.approx(want_loss, rel=1e-6)  # each chain starts at w*
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
