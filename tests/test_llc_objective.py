"""The LLC on the training objective (task loss + regularizer terms) against the closed form of
SGLD on a quadratic loss, and its compare metric on tiny recipe runs."""

import math
import warnings

import devinterp  # noqa: F401  the LLC needs it (the dev extra installs it)
import pytest
import torch
from torch import nn

from evaluation.metrics.llc import estimate_llc
from interp_train.losses import per_example_mse
from interp_train.regularizers.base import Regularizer

N, D_IN = 1000, 5
LR, GAMMA = 1e-4, 1.0
NBETA = N / math.log(N)  # devinterp's default for a full batch of N


class SquaredNorm(Regularizer):
    """Term ``l2`` = Σ_p ‖p‖² / (number of entries) over all parameters of the model (ridge)."""

    def terms(self, ctx):
        params = list(ctx.model.parameters())
        return {"l2": sum(p.pow(2).sum() for p in params) / sum(p.numel() for p in params)}


def _noise_regression(seed=0):
    """x ~ N(0, I), y pure noise made orthogonal to [x, 1]: the least-squares optimum is w = b = 0,
    which is also the minimiser of SquaredNorm. Returns the model at 0, the full batch, the design."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    design = torch.cat([x, torch.ones(N, 1, dtype=torch.float64)], 1)
    y = torch.randn(N, 1, generator=g, dtype=torch.float64)
    y = y - design @ torch.linalg.lstsq(design, y).solution
    model = nn.Linear(D_IN, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model, [(x.float(), y.float())], design, y


def _set(model, w):
    with torch.no_grad():
        model.weight.copy_(w[:D_IN].reshape(1, -1).float())
        model.bias.copy_(w[D_IN:].float())


def sgld_llc(H, g):
    """E[nβ (L(w* + δ) − L(w*))] under the stationary law of devinterp's SGLD (unadjusted Langevin,
    δ' = δ − ε/2 (nβ ∇L + γ δ) + N(0, ε)) for the quadratic L(w* + δ) = L(w*) + gᵀδ + ½ δᵀHδ: a
    Gaussian with mean m = −nβ A⁻¹ g and, in A's eigenbasis, variance ε / (1 − (1 − ε a/2)²),
    A = nβ H + γ I. Then λ = nβ (gᵀm + ½ mᵀHm + ½ tr(H Σ)); for g = 0 and ε, γ → 0, d/2."""
    A = NBETA * H + GAMMA * torch.eye(H.shape[0], dtype=H.dtype)
    a, U = torch.linalg.eigh(A)
    var = LR / (1 - (1 - LR * a / 2) ** 2)
    cov = U @ torch.diag(var) @ U.T
    m = -NBETA * torch.linalg.solve(A, g)
    return float(NBETA * (g @ m + 0.5 * m @ H @ m + 0.5 * torch.trace(H @ cov)))


def _estimate(model, batches, regs=(), seed=0):
    return estimate_llc(model, batches, per_example_mse, lr=LR, localization=GAMMA, num_chains=4, num_draws=600,
                        num_burnin_steps=150, seed=seed, progress=False, regularizers=regs)


def _standard_error(res):
    return res.std / math.sqrt(len(res.per_chain))


def test_penalty_minimised_at_the_task_minimum_leaves_the_llc_unchanged():
    # joint minimum w* = 0 of the task loss and of c·SquaredNorm: both losses are regular there,
    # so both λ are d/2 = 3 (less the small localization and step-size terms of sgld_llc)
    model, batches, design, _ = _noise_regression()
    c = 6.0  # penalty Hessian 2c/6 = 2: as large as the task loss's (2·E[x xᵀ] = 2 I)
    H_task = 2 * design.T @ design / N
    H_obj = H_task + 2 * c / (D_IN + 1) * torch.eye(D_IN + 1, dtype=torch.float64)
    zero = torch.zeros(D_IN + 1, dtype=torch.float64)
    task = _estimate(model, batches)
    obj = _estimate(model, batches, [SquaredNorm(weight=c)])
    assert task.config["loss"] == "task" and obj.config["loss"] == "objective"
    assert obj.config["regularizers"] == ["squared_norm (weight 6)"]
    assert task.healthy and obj.healthy
    for res, H in ((task, H_task), (obj, H_obj)):
        want = sgld_llc(H, zero)
        assert 2.9 < want < 3.2  # d/2 up to the step-size inflation
        assert abs(res.mean - want) < 4 * _standard_error(res) + 0.05 * want, (res.mean, res.std, want)
    # the shift between the two losses is within the chains' noise
    assert abs(obj.mean - task.mean) < 3 * math.hypot(_standard_error(task), _standard_error(obj)), \
        (task.mean, task.std, obj.mean, obj.std)
    # L(w*) of the objective is the task loss (the penalty is 0 at w* = 0)
    assert obj.init_loss == pytest.approx(task.init_loss, rel=1e-6)


def test_away_from_the_task_minimum_only_the_objective_llc_is_d_over_2():
    # the ridge solution of task + c·SquaredNorm with a signal: the task gradient is non-zero there,
    # SGLD on the task loss drifts downhill (λ̂ far below d/2, closed form nβ(gᵀm + ...)), the
    # objective's λ̂ is the regular d/2
    model, batches, design, _ = _noise_regression()
    x, y = batches[0]
    y = y + x[:, :1].double().float() * 2.0 + 1.0  # signal: w_OLS = (2, 0, 0, 0, 0), b = 1
    batches = [(x, y)]
    c = 6.0
    k = 2 * c / (D_IN + 1)
    y64 = y.double()
    H_task = 2 * design.T @ design / N
    w_ridge = torch.linalg.solve(H_task + k * torch.eye(D_IN + 1, dtype=torch.float64), 2 * design.T @ y64 / N)[:, 0]
    _set(model, w_ridge)
    g_task = (H_task @ w_ridge - 2 * design.T @ y64[:, 0] / N)
    assert float(g_task.norm()) > 0.5
    task = _estimate(model, batches)
    obj = _estimate(model, batches, [SquaredNorm(weight=c)])
    want_task = sgld_llc(H_task, g_task)
    want_obj = sgld_llc(H_task + k * torch.eye(D_IN + 1, dtype=torch.float64), torch.zeros(D_IN + 1, dtype=torch.float64))
    assert want_task < -20 and 2.9 < want_obj < 3.2
    assert abs(task.mean - want_task) < 4 * _standard_error(task) + 0.05 * abs(want_task), (task.mean, want_task)
    assert abs(obj.mean - want_obj) < 4 * _standard_error(obj) + 0.05 * want_obj, (obj.mean, want_obj)
    assert "negative LLC" in " ".join(task.chain_health) and obj.healthy


# ---- compare metrics: llc (task loss) and llc_objective on tiny recipe runs ---------------------

TINY = """
seed_everything: 0
trainer: {{max_steps: 4, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false,
  log_every_n_steps: 1}}
model:
  model:
    class_path: interp_train.models.mlp.MLP
    init_args: {{d_in: 64, hidden: [8], d_out: 10}}
  lr: 0.01
  regularizers: {regularizers}
data:
  class_path: interp_train.data.digits.DigitsDataModule
  init_args: {{batch_size: 64}}
"""
GRAD_NORM = ("[{class_path: interp_train.regularizers.smoothness.GradientNorm, init_args: {weight: {class_path: "
             "interp_train.schedules.LinearWarmup, init_args: {value: 0.5, warmup_steps: 8}}, at: input}}]")


@pytest.fixture(scope="module")
def llc_runs(tmp_path_factory):
    from interp_train.cli import main as train_main

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("llc_runs")
    for variant, regs in (("baseline", "[]"), ("grad_norm", GRAD_NORM)):
        cfg = tmp / f"{variant}.yaml"
        cfg.write_text(TINY.format(regularizers=regs))
        train_main(["fit", "--config", str(cfg), "--variant", variant, "--checkpoint_root", str(tmp / "ckpt"),
                    "--test_after_fit", "false"])
    return tmp / "ckpt" / "digits"


class NaNBeyond(Regularizer):
    """Term ``blowup``: 0 while every parameter is within ``limit`` of 0, NaN after (a penalty
    that breaks on a diverged SGLD chain, as an effective rank of NaN activations does)."""

    limit = 0.05

    def terms(self, ctx):
        big = any(bool((p.abs() > self.limit).any()) for p in ctx.model.parameters())
        return {"blowup": torch.tensor(math.nan if big else 0.0)}


def test_a_penalty_that_turns_non_finite_on_a_chain_marks_the_chain_not_the_run():
    # SGLD's noise (√lr = 0.01 per step) carries some parameter past 0.05 within the chain; the
    # penalty's NaN (NonFiniteRegularizerError in training) is a non-finite loss: the chain stops
    # and is reported unhealthy, as a diverged task-loss chain is, instead of raising
    model, batches, _, _ = _noise_regression()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = estimate_llc(model, batches, per_example_mse, lr=LR, localization=GAMMA, num_chains=2, num_draws=50,
                           num_burnin_steps=50, seed=0, progress=False, regularizers=[NaNBeyond(weight=1.0)])
    assert not res.healthy
    assert all(math.isnan(v) for v in res.per_chain) and math.isnan(res.mean)
    assert torch.all(model.weight == 0) and torch.all(model.bias == 0)  # w* restored


def test_compare_llc_columns_name_their_loss(llc_runs):
    from evaluation.compare import MeasureOptions, runs_from_paths
    from evaluation.compare.data import batches as cut, split_tensors
    from evaluation.compare.measure import measure_run
    from evaluation.compare.metrics import get_metric
    from evaluation.io.checkpoints import load_checkpoint
    from interp_train.losses import per_example_cross_entropy

    opts = MeasureOptions(llc=True, llc_chains=2, llc_draws=20, llc_burnin=5, batch_size=128)
    metrics = [get_metric("llc"), get_metric("llc_objective")]
    assert metrics[0].label == "LLC (task loss)" and metrics[1].label == "LLC (objective)"
    assert "task loss" in metrics[0].description and "regularizer terms" in metrics[1].description
    got = {}
    for variant in ("baseline", "grad_norm"):
        run = runs_from_paths(variant, [llc_runs / variant / "seed0"])[0]
        got[variant] = measure_run(run, opts, metrics=metrics)
    base, reg = got["baseline"], got["grad_norm"]
    # no loss-term regularizer: the objective is the task loss, the same estimate
    assert base["metrics"]["llc_objective"] == base["metrics"]["llc"]
    assert base["details"]["llc_objective"]["loss"] == "task loss (no regularizer adds a loss term)"
    # GradientNorm rebuilt from the checkpoint at its final weight: 4 of 8 warm-up steps, 0.5·4/8 = 0.25
    assert reg["details"]["llc_objective"]["loss"] == "task loss + 0.25·gradient_norm"
    assert reg["details"]["llc_objective"]["config"]["loss"] == "objective"
    assert reg["details"]["llc"]["config"]["loss"] == "task"
    # by hand through the API: the same chains (same seed) on the objective
    loaded = load_checkpoint(llc_runs / "grad_norm" / "seed0" / "checkpoints" / "last.ckpt")
    loaded.datamodule.setup("fit")
    data = cut(split_tensors(loaded.datamodule, "train"), 128)
    kw = dict(lr=opts.llc_lr, localization=opts.llc_localization, num_burnin_steps=5, num_chains=2, num_draws=20,
              seed=0, progress=False)
    regs = list(loaded.model.regularizers)
    assert regs[0].current_weight() == pytest.approx(0.25)
    with warnings.catch_warnings():  # 20 draws: chains may be flagged; only equality with compare matters here
        warnings.simplefilter("ignore")
        by_hand = estimate_llc(loaded.model, data, per_example_cross_entropy, regularizers=regs, **kw)
        task = estimate_llc(loaded.model, data, per_example_cross_entropy, **kw)
    assert reg["metrics"]["llc_objective"] == pytest.approx(by_hand.mean, rel=1e-9)
    assert reg["metrics"]["llc"] == pytest.approx(task.mean, rel=1e-9)
    assert by_hand.init_loss > task.init_loss  # the penalty is part of L(w*)
