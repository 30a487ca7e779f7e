import json
import math
import warnings

import devinterp  # noqa: F401  the LLC needs it (the dev extra installs it): a missing devinterp fails, never skips
import pytest
import torch
from scipy import integrate
from torch import nn

from evaluation.metrics.llc import (chain_problems, drift_z, equilibration_start, estimate_llc,
                                    statistical_inefficiency)
from interp_train.losses import per_example_mse


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
    # per-chain value is nβ (mean draw loss − init loss) over the draws after the detected transient
    t0 = torch.tensor(res.loss_traces[0][50 + res.equilibrated_at:], dtype=torch.float64)
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


# ---- equilibration detection -----------------------------------------------------------------

def _ar1(phi: float, n: int, seed: int) -> torch.Tensor:
    """Stationary AR(1) x_t = φ x_{t−1} + ε_t, ε ~ N(0, 1)."""
    from scipy.signal import lfilter

    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, generator=g, dtype=torch.float64).numpy()
    eps[0] /= math.sqrt(1 - phi * phi)
    return torch.from_numpy(lfilter([1.0], [1.0, -phi], eps))


def test_statistical_inefficiency_of_ar1_is_analytic():
    # AR(1) with coefficient φ: ρ_t = φ^t, g = (1 + φ)/(1 − φ); iid: g = 1. One estimate has ~10 %
    # relative noise (Sokal: var ≈ 2(2M + 1)/T at window M ≈ 5g), the mean of 8 about 4 %
    for phi in (0.0, 0.5, 0.8):
        estimates = [statistical_inefficiency(_ar1(phi, 20000, seed)) for seed in range(8)]
        assert sum(estimates) / 8 == pytest.approx((1 + phi) / (1 - phi), rel=0.12), (phi, estimates)
    assert statistical_inefficiency(torch.ones(50)) == 1.0


def test_equilibration_start_finds_the_transient():
    # a relaxation exp(−t/100) over the first few hundred draws, then stationary AR(1) noise
    t = torch.arange(4000, dtype=torch.float64)
    trace = -5.0 * torch.exp(-t / 100) + 0.3 * _ar1(0.5, 4000, 2)
    start = equilibration_start(trace)
    assert 250 <= start <= 900, start  # the transient is below the noise after ~ 100·ln(5/0.3) ≈ 280 draws
    assert equilibration_start(0.3 * _ar1(0.5, 4000, 3)) <= 400  # a stationary trace loses little


def test_drift_z_separates_a_settled_trace_from_a_climbing_one():
    # stationary: z ≈ N(0, 1) (Geweke; std 1.1 over 300 AR(1) traces, < −3 in 0-1 %); a slow climb of
    # 2 noise-std over the trace: z far below the −3 at which estimate_llc warns
    settled = [drift_z(_ar1(0.5, 2000, seed)) for seed in range(10, 20)]
    assert min(settled) > -3.0 and max(settled) < 3.5, settled
    climb = torch.linspace(0, 2 * math.sqrt(4 / 3), 2000, dtype=torch.float64)  # AR(0.5) std is √(4/3)
    assert drift_z(climb + _ar1(0.5, 2000, 30)) < -6


def test_chains_too_short_to_equilibrate_warn():
    # a flat w^6 potential sampled with a small step: the loss climbs through all draws (mixing needs
    # ~1500 steps at lr 1e-4), λ̂ is far below 1/6
    with pytest.warns(RuntimeWarning, match="not equilibrated"):
        res = estimate_llc(Monomial(3), _normal_crossing_data(), _unit_gaussian_nll, lr=1e-4, localization=1.0,
                           num_chains=2, num_draws=300, num_burnin_steps=0, seed=0, progress=False)
    assert not res.healthy and res.mean < 1 / 12


# ---- known learning coefficients -------------------------------------------------------------

class Monomial(nn.Module):
    """f(x) = x·w^k with one weight: the normal-crossing potential K(w) ∝ w^(2k), λ = 1/(2k)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * self.w ** self.k


def _unit_gaussian_nll(output, targets):
    """−log N(y; f, I) per example up to a constant: ½ Σ_j (f_j − y_j)² (the noise is N(0, 1))."""
    return 0.5 * (output - targets).pow(2).sum(dim=1)


def _normal_crossing_data(n=1000, seed=0):
    # y = 0: the loss is the potential itself, L(w) = ½ mean(x²) w^(2k), minimal at w* = 0
    g = torch.Generator().manual_seed(seed)
    return [(2.0 * torch.randn(n, 1, generator=g), torch.zeros(n, 1))]


def _localized_normal_crossing_lc(k: int, c: float, nbeta: float, gamma: float) -> float:
    """nβ E[c w^(2k)] under exp(−nβ c w^(2k) − γ w²/2) by quadrature (1/(2k) at γ = 0).

    In u = (nβ c)^(1/(2k)) w: E[u^(2k)] under exp(−u^(2k) − γ' u²/2), γ' = γ (nβ c)^(−1/k).
    """
    g = gamma * (nbeta * c) ** (-1.0 / k)
    density = lambda u: math.exp(-u ** (2 * k) - g * u * u / 2)  # noqa: E731
    return integrate.quad(lambda u: u ** (2 * k) * density(u), -10, 10)[0] / integrate.quad(density, -10, 10)[0]


def test_normal_crossing_power_1_is_one_half():
    # cheap check: λ = 1/2, tolerance excludes the neighbouring powers' 1/4 and a second regular weight's 1
    batches = _normal_crossing_data()
    res = estimate_llc(Monomial(1), batches, _unit_gaussian_nll, lr=1.7e-4, localization=1.0, num_chains=4,
                       num_draws=1500, num_burnin_steps=100, seed=0, progress=False)
    assert 0.375 < res.mean < 0.625, (res.mean, res.std)
    assert res.healthy, res.warnings


# λ = 1/(2k): 1/2, 1/4, 1/6; each window is bounded by the midpoints to the other powers' values
# (1 above 1/2: a second regular weight) and excludes 1/8 (k = 4) below 1/6. nβ c w^(2k) has relative
# std 1.4, 0.5, 2.4 for k = 1, 2, 3 and the flat w^6 mixes slowly: k = 3 needs ~1000 effective
# draws for a 8 % standard error, hence 8 long chains
@pytest.mark.slow
@pytest.mark.parametrize("k, lr, chains, window", [(1, 1e-4, 4, (0.375, 0.75)), (2, 3e-4, 4, (0.208, 0.375)),
                                                   (3, 5e-4, 8, (0.135, 0.208))])
def test_normal_crossing_potential(k, lr, chains, window):
    batches = _normal_crossing_data()
    res = estimate_llc(Monomial(k), batches, _unit_gaussian_nll, lr=lr, localization=1.0, num_chains=chains,
                       num_draws=10000, num_burnin_steps=1000, seed=0, progress=False)
    c = 0.5 * float(batches[0][0].pow(2).mean())
    exact = _localized_normal_crossing_lc(k, c, res.nbeta, 1.0)
    assert exact == pytest.approx(1 / (2 * k), rel=0.05)  # the localization γ = 1 barely moves λ here
    assert window[0] < res.mean < window[1], (res.mean, res.std, exact)
    assert res.healthy, res.warnings


def aoyagi_rrr_lc(M: int, H: int, N: int, r: int = 0) -> float:
    """λ of reduced-rank regression x ∈ R^M → R^H → R^N (y = B A x + N(0, I)) at a true map of rank r.

    Aoyagi & Watanabe (2005), "Stochastic complexities of reduced rank regression in Bayesian
    estimation", Neural Networks 18, Main Theorem: with S = 2(H + r)(M + N) − (M − N)² − (H + r)²,
    λ = (HM − Hr + Nr)/2 if M + H < N + r; (HN − Hr + Mr)/2 if N + H < M + r; MN/2 if M + N < H + r;
    otherwise S/8 when M + H + N + r is even and (S + 1)/8 when it is odd.
    """
    if M + H < N + r:
        return (H * M - H * r + N * r) / 2
    if N + H < M + r:
        return (H * N - H * r + M * r) / 2
    if M + N < H + r:
        return M * N / 2
    s = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    return (s + (M + H + N + r) % 2) / 8


def test_aoyagi_formula_gives_the_published_values():
    # the values devinterp's tests and issue 13 quote; a regular model (H ≥ min(M, N), r = 0 → case
    # 4 or the full-rank count) and the rank-0 model with H = 0 are checks of the case split
    assert [aoyagi_rrr_lc(*mhn) for mhn in [(5, 3, 5), (5, 4, 5), (4, 3, 8), (8, 3, 4), (3, 8, 4)]] == [
        6.5, 8.0, 6.0, 6.0, 6.0]
    assert aoyagi_rrr_lc(2, 5, 2) == 2.0 and aoyagi_rrr_lc(3, 0, 4) == 0.0
    assert aoyagi_rrr_lc(5, 2, 5) == 4.5 and aoyagi_rrr_lc(5, 5, 5) == 9.5  # neighbours of (5, 3, 5), (5, 4, 5)


def _trained_rrr(M: int, H: int, N: int):
    """devinterp's test model: x ~ N(0, I_M), y ~ N(0, I_N) independent (true map 0, r = 0), n = 1000,
    B·A without biases trained by Adam (lr 0.01, 5000 full-batch steps) from torch.manual_seed(42)."""
    torch.manual_seed(42)
    x, y = torch.randn(1000, M), torch.randn(1000, N)
    model = nn.Sequential(nn.Linear(M, H, bias=False), nn.Linear(H, N, bias=False))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5000):
        optimizer.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        optimizer.step()
    return model, x, y


def _rank_h_least_squares_loss(x, y, H: int) -> float:
    """min over rank-H W of mean (y − x W)²: the least-squares fit projected on its top-H output directions."""
    X, Y = x.double(), y.double()
    W = torch.linalg.lstsq(X, Y).solution
    top = torch.linalg.svd(X @ W, full_matrices=False).Vh[:H]
    return float((Y - X @ W @ top.T @ top).pow(2).mean())


def _devinterp_reference_llc(model, x, y, loss_fn, *, lr, localization, nbeta, num_chains, num_draws,
                             num_burnin_steps, seed):
    """nβ (mean draw loss − L(w*)) per chain from devinterp's own chain loop (sample_single_chain) and
    its SGLD optimizer class: no code shared with estimate_llc beyond the model and the loss."""
    from devinterp.optim import SGLD
    from devinterp.slt.sampler import sample_single_chain

    with torch.no_grad():
        init_loss = float(loss_fn(model(x), y).mean())
    dataset = [{"input_ids": x[i], "target": y[i]} for i in range(len(x))]

    def evaluate(m, data):
        return loss_fn(m(data["input_ids"]), data["target"]).mean(), {}

    per_chain = []
    for chain in range(num_chains):
        draws = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SGLD's deprecation notice
            sample_single_chain(model, dataset, evaluate, {name: None for name, _ in model.named_parameters()},
                                num_draws=num_draws, num_burnin_steps=num_burnin_steps, sampling_method=SGLD,
                                sampling_method_kwargs=dict(lr=lr, localization=localization, nbeta=nbeta),
                                chain=chain, seed=seed + chain, dataloader_seed=seed + chain, batch_size=len(x),
                                callbacks=[lambda loss, **_: draws.append(float(loss))])
        per_chain.append(nbeta * (sum(draws) / len(draws) - init_loss))
    return per_chain


def test_sgld_chains_match_devinterps_own_loop():
    # estimate_llc without transient detection is devinterp's estimator: same SGLD update, same
    # noise stream (seed + chain), same nβ (mean draw loss − L(w*)); its chain loop and optimizer
    # class give the same per-chain values
    torch.manual_seed(0)
    x, y = torch.randn(200, 4), torch.randn(200, 3)
    model = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 3, bias=False))
    settings = dict(lr=1e-3, localization=1.0, nbeta=30.0, num_chains=2, num_draws=150, num_burnin_steps=50)
    want = _devinterp_reference_llc(model, x, y, per_example_mse, seed=3, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an untrained model: health is not the point here
        res = estimate_llc(model, [(x, y)], per_example_mse, seed=3, detect_equilibration=False, progress=False,
                           **settings)
    assert res.per_chain == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert res.equilibrated_at == 0


# (M, H, N) and the window the estimate must fall in: bounded by the midpoints to the λ of the
# neighbouring ranks H ∓ 1 (aoyagi_rrr_lc). For (3, 8, 4) every H ≥ 6 gives MN/2 = 6 (the rank
# cannot exceed min(M, N)); its window is bounded by the neighbouring output widths N ∓ 1 (4.5, 7.5)
RRR_CASES = [((5, 3, 5), (5.5, 7.25)), ((5, 4, 5), (7.25, 8.75)), ((4, 3, 8), (5.0, 7.0)),
             ((8, 3, 4), (5.0, 7.0)), ((3, 8, 4), (5.25, 6.75))]
# devinterp's test loss and temperature (mean squared error over examples and outputs, nβ = n/log n,
# γ = 1); equilibrated chains: 2000 burn-in steps and 8000 draws at lr 1e-4 (lr 6e-5 with 2000 draws
# and no burn-in, devinterp's own setting, stops before the chains reach their plateau)
RRR_SGLD = dict(lr=1e-4, localization=1.0, num_chains=4, num_draws=8000, num_burnin_steps=2000)


@pytest.mark.slow
@pytest.mark.parametrize("mhn, window", RRR_CASES)
def test_reduced_rank_regression_llc_is_aoyagis(mhn, window):
    lc = aoyagi_rrr_lc(*mhn)
    assert window[0] < lc < window[1]
    model, x, y = _trained_rrr(*mhn)
    with torch.no_grad():  # w* is the minimum: the rank-H least-squares fit (closed form), to 1e-4 nats·nβ
        gap = float((model(x) - y).pow(2).mean()) - _rank_h_least_squares_loss(x, y, mhn[1])
    assert abs(gap) * 1000 / math.log(1000) < 1e-3, gap
    res = estimate_llc(model, [(x, y)], per_example_mse, seed=0, progress=False, **RRR_SGLD)
    assert window[0] < res.mean < window[1], (mhn, lc, res.mean, res.std, res.equilibrated_at)
    assert res.healthy, res.warnings


@pytest.mark.slow
def test_reduced_rank_regression_devinterp_reference_agrees():
    # devinterp's own chain loop on the same model and settings lands in the same window
    (mhn, window), = [case for case in RRR_CASES if case[0] == (5, 3, 5)]
    model, x, y = _trained_rrr(*mhn)
    want = _devinterp_reference_llc(model, x, y, per_example_mse, nbeta=1000 / math.log(1000), seed=0, **RRR_SGLD)
    res = estimate_llc(model, [(x, y)], per_example_mse, seed=0, progress=False, **RRR_SGLD)
    assert window[0] < sum(want) / len(want) < window[1], want
    assert res.mean == pytest.approx(sum(want) / len(want), abs=0.5), (res.per_chain, want)


@pytest.mark.parametrize("training", [True, False])
def test_the_model_is_sampled_in_eval_mode_and_restored(training):
    """Every forward pass (initial loss, chains) runs in eval mode; afterwards the training flag, each
    weight's requires_grad (a frozen weight is neither sampled nor made trainable) and the grad mode are as
    before, also when the call raises (an empty loader)."""
    model, batches = _regression_at_optimum(d_in=3, n=200, batch_size=100)
    model = nn.Sequential(model, nn.Linear(1, 1))
    with torch.no_grad():
        model[1].weight.fill_(1.0), model[1].bias.zero_()
    model[1].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[1].parameters()]
    requires = [p.requires_grad for p in model.parameters()]
    seen = []
    model.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    model.train(training)
    res = estimate_llc(model, batches, per_example_mse, nbeta=10.0, num_chains=1, num_draws=5, num_burnin_steps=0,
                       progress=False)
    assert len(seen) == 2 + 5 and not any(seen)  # two batches of initial loss, five chain steps
    assert model.training is training and all(m.training is training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires == [True, True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[1].parameters())) and torch.is_grad_enabled()
    assert len(res.loss_traces[0]) == 5
    with pytest.raises(ValueError, match="no batches"):
        estimate_llc(model, [], per_example_mse, nbeta=10.0, num_chains=1, num_draws=5, progress=False)
    assert model.training is training and [p.requires_grad for p in model.parameters()] == requires
