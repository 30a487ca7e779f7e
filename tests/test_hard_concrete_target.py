"""HardConcreteL0's density target (interp_train/regularizers/hard_concrete.py): λ follows dual
ascent with restarts on the evaluation density, is the weight the loss uses, survives state_dict, and
training under it ends at the target keeping the weights the task needs most."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from interp_train.losses import per_example_mse
from interp_train.regularizers import HardConcreteL0, after_optimizer_step, regularized_loss
from interp_train.schedules import LinearWarmup

GAMMA, ZETA = -0.1, 1.1


def _eval_density(log_alpha: np.ndarray) -> float:
    """Independent reference: share of entries whose test-time gate clip(σ(log α)(ζ − γ) + γ, 0, 1) is > 0."""
    gate = np.clip(1 / (1 + np.exp(-log_alpha)) * (ZETA - GAMMA) + GAMMA, 0, 1)
    return float((gate > 0).mean())


def _gated(log_alpha: np.ndarray, reg: HardConcreteL0) -> nn.Module:
    model = nn.Linear(log_alpha.size, 1, bias=False)
    reg.setup(model)
    with torch.no_grad():
        model.parametrizations.weight[0].log_alpha.copy_(torch.tensor(log_alpha, dtype=torch.float32)[None])
    return model


def test_the_multiplier_takes_dual_ascent_steps_on_the_evaluation_density_and_restarts_at_the_target():
    log_alpha = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, -5.0, -5.0, -2.3, -2.5])  # -2.3 open, -2.5 closed
    reg = HardConcreteL0(weight=0.2, target_density=0.25, dual_lr=0.1)
    model = _gated(log_alpha, reg)
    density = _eval_density(log_alpha)
    assert density == pytest.approx(0.7) and reg.density(model) == pytest.approx(density)
    after_optimizer_step(model, [reg])
    expected = 0.2 + 0.1 * (density - 0.25)
    assert reg.current_weight() == pytest.approx(expected, rel=1e-12)
    # the loss uses λ as the term's weight: total = task + λ · l0
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    out = regularized_loss(model, x, y, [reg], loss_fn=per_example_mse, advance=False)
    assert out.weights["hard_concrete_l0"] == pytest.approx(expected)
    total = out.task_loss + expected * out.terms["hard_concrete_l0/l0"]
    assert float(out.total.detach()) == pytest.approx(float(total.detach()), rel=1e-6)
    after_optimizer_step(model, [reg])
    assert reg.current_weight() == pytest.approx(expected + 0.1 * (density - 0.25), rel=1e-12)
    # at or below the target λ restarts from 0 (an inequality constraint that holds exerts no pull)
    with torch.no_grad():
        model.parametrizations.weight[0].log_alpha[0, :5] = -5.0
    assert reg.density(model) == pytest.approx(0.2)
    after_optimizer_step(model, [reg])
    assert reg.current_weight() == 0.0
    with torch.no_grad():
        model.parametrizations.weight[0].log_alpha[0, :2] = 3.0
    after_optimizer_step(model, [reg])
    assert reg.current_weight() == pytest.approx(0.1 * (0.4 - 0.25), rel=1e-12)
    # without a target nothing moves: the weight is the fixed one
    fixed = HardConcreteL0(weight=0.2)
    fixed_model = _gated(log_alpha, fixed)
    after_optimizer_step(fixed_model, [fixed])
    assert fixed.current_weight() == 0.2


def test_the_multiplier_survives_state_dict_and_old_states_keep_the_start():
    reg = HardConcreteL0(weight=0.0, target_density=0.5, dual_lr=0.5)
    model = _gated(np.full(4, 3.0), reg)
    after_optimizer_step(model, [reg])
    assert reg.current_weight() == pytest.approx(0.25)  # 0 + 0.5 · (1 − 0.5)
    state = reg.state_dict()
    fresh = HardConcreteL0(weight=0.0, target_density=0.5, dual_lr=0.5)
    fresh.load_state_dict(state)
    assert fresh.current_weight() == pytest.approx(0.25)
    # a state saved without a target (no multiplier in it) leaves the starting λ
    old = HardConcreteL0(weight=0.3).state_dict()
    targeted = HardConcreteL0(weight=0.1, target_density=0.5)
    targeted.load_state_dict(old)
    assert targeted.current_weight() == 0.1


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_density=0.0), "target_density"),
    (dict(target_density=1.0), "target_density"),
    (dict(target_density=1.5), "target_density"),
    (dict(target_density=True), "target_density"),
    (dict(target_density="0.3"), "target_density"),
    (dict(target_density=0.3, weight=-1.0), "starting multiplier"),
    (dict(target_density=0.3, weight=LinearWarmup(1.0, 10)), "no schedule"),
    (dict(target_density=0.3, dual_lr=0.0), "dual_lr"),
    (dict(target_density=0.3, dual_lr=math.inf), "dual_lr"),
])
def test_bad_target_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HardConcreteL0(**kwargs)


def test_training_under_a_target_hovers_at_it_keeping_the_largest_weights():
    # y uses 6 of 10 inputs, with decreasing weights; a target of 0.3 allows 3 non-zero gates: the
    # constrained optimum keeps the 3 largest (dropping input j costs w_j² per unit of x variance).
    # With restarts the density hovers at the boundary: the 4th gate, which the task wants, reopens
    # whenever λ is 0 and is closed again once λ has grown
    torch.manual_seed(0)
    n, d = 512, 10
    x = torch.randn(n, d)
    w_true = torch.tensor([3.0, 2.5, 2.0, 1.0, 0.8, 0.6, 0.0, 0.0, 0.0, 0.0])
    y = (x @ w_true + 0.05 * torch.randn(n)).unsqueeze(1)
    model = nn.Linear(d, 1, bias=False)
    reg = HardConcreteL0(weight=0.0, target_density=0.3, dual_lr=5.0)
    reg.setup(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    late, gates = [], dict(reg.gates(model))["weight"]
    for step in range(1500):
        model.train()
        opt.zero_grad()
        regularized_loss(model, x, y, [reg], loss_fn=per_example_mse).total.backward()
        opt.step()
        after_optimizer_step(model, [reg])
        if step >= 1000:
            late.append((reg.density(model), gates.gates(sample=False)[0].detach().clone()))
    densities = [dens for dens, _ in late]
    assert min(densities) == pytest.approx(0.3) and max(densities) <= 0.4 + 1e-9, sorted(set(densities))
    for _, z in late:
        assert torch.all(z[:3] > 0) and torch.all(z[4:] == 0), z  # the 3 largest kept, the 6 smallest closed
    # a fixed weight small enough to keep the needed weights ends where the task leaves it, not at 0.3
    fixed_model = nn.Linear(d, 1, bias=False)
    fixed = HardConcreteL0(weight=0.05)
    fixed.setup(fixed_model)
    opt = torch.optim.Adam(fixed_model.parameters(), lr=0.05)
    for _ in range(1000):
        fixed_model.train()
        opt.zero_grad()
        regularized_loss(fixed_model, x, y, [fixed], loss_fn=per_example_mse).total.backward()
        opt.step()
    assert fixed.density(fixed_model) > 0.4


def test_a_recipe_run_steps_the_multiplier_per_optimizer_step_and_its_checkpoint_keeps_it(tmp_path):
    from interp_train.cli import InterpTrainCLI
    from interp_train.recipes import load_recipe

    from tests.test_hard_concrete import TINY_L0

    torch.set_num_threads(1)
    cfg = tmp_path / "l0_target.yaml"
    # 3 steps, dense gates (density 1 > 0.01 throughout): λ = 3 · 0.2 · (1 − 0.01) after the run
    cfg.write_text(TINY_L0.replace("init_args: {weight: 0.1}", "init_args: {weight: 0.0, target_density: 0.01, "
                                                               "dual_lr: 0.2}"))
    cli = InterpTrainCLI(args=["fit", "--config", str(cfg), "--variant", "l0t", "--checkpoint_root",
                               str(tmp_path / "ckpt"), "--test_after_fit", "false"])
    reg = cli.model.regularizers[0]
    assert reg.density(cli.model) == 1.0
    assert reg.current_weight() == pytest.approx(3 * 0.2 * 0.99, rel=1e-12)
    module, _ = load_recipe(cli.run_directory)
    assert module.regularizers[0].current_weight() == pytest.approx(3 * 0.2 * 0.99, rel=1e-12)
