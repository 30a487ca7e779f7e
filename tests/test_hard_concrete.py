"""HardConcreteL0 (interp_train/regularizers/hard_concrete.py): the expected-L0 formula against
Monte Carlo, gates that find the k weights a regression needs, evaluation gates, checkpoints."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from interp_train.losses import per_example_mse
from interp_train.regularizers import HardConcreteL0, regularized_loss
from interp_train.regularizers.hard_concrete import HardConcreteGate

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _numpy_gates(log_alpha: np.ndarray, draws: int, rng) -> np.ndarray:
    """Independent sampler: the paper's hard-concrete gate, draws × entries."""
    u = rng.uniform(1e-6, 1 - 1e-6, size=(draws, log_alpha.size))
    s = 1 / (1 + np.exp(-(np.log(u) - np.log(1 - u) + log_alpha) / BETA))
    return np.clip(s * (ZETA - GAMMA) + GAMMA, 0, 1)


def test_expected_l0_matches_monte_carlo():
    log_alpha = np.linspace(-4, 4, 9)
    gate = HardConcreteGate((9,), 0.0, BETA, GAMMA, ZETA)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(log_alpha))
    formula = gate.prob_nonzero().detach().double().numpy()
    draws = 200_000
    mc = (_numpy_gates(log_alpha, draws, np.random.default_rng(0)) > 0).mean(0)
    se = np.sqrt(formula * (1 - formula) / draws)
    assert np.all(np.abs(mc - formula) < 4 * se + 1e-12), (mc, formula)
    torch.manual_seed(0)  # the gate's own training-mode draws have the same law
    own = torch.stack([gate.gates(sample=True) for _ in range(20_000)]).detach().double()
    assert np.all(np.abs((own > 0).double().mean(0).numpy() - formula) < 4 * np.sqrt(formula * (1 - formula) / 20_000))
    # and the same mean gate as the reference sampler (its clipped mass at 0 and 1 included)
    ref_mean = _numpy_gates(log_alpha, 20_000, np.random.default_rng(1)).mean(0)
    assert np.all(np.abs(own.mean(0).numpy() - ref_mean) < 0.02)
    # the l0 term is the mean P(z ≠ 0) over the selected entries
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    reg = HardConcreteL0(weight=1.0, params=["0.*"])
    reg.setup(model)
    with torch.no_grad():
        model[0].parametrizations.weight[0].log_alpha.copy_(torch.tensor(log_alpha, dtype=torch.float32).reshape(3, 3))
    term = reg.terms(type("Ctx", (), {"model": model})())["l0"].detach()
    assert float(term) == pytest.approx(formula.mean(), rel=1e-6)


def test_evaluation_gates_are_deterministic_and_training_gates_are_not():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    reg = HardConcreteL0(params=["weight"], init_log_alpha=0.5)
    reg.setup(model)
    x = torch.randn(5, 4)
    raw = model.parametrizations.weight.original
    model.eval()
    z = min(1.0, max(0.0, 1 / (1 + math.exp(-0.5)) * (ZETA - GAMMA) + GAMMA))
    assert torch.allclose(model(x), x @ (raw * z).T + model.bias)
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
    assert 0.0 < reg.density(model) <= 1.0

def _train(model, reg, x, y, steps):
    """Adam (lr 0.05) on the mean-squared error plus ``reg``'s terms, then eval mode (deterministic gates)."""
    reg.setup(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        regularized_loss(model, x, y, [reg], loss_fn=per_example_mse).total.backward()
        opt.step()
    model.eval()



def test_l0_keeps_the_k_weights_a_regression_needs_and_gates_off_the_rest():
    # y = x_0·2 − x_1·1.5 + x_2 + noise: only 3 of 10 weights matter
    torch.manual_seed(0)
    n, d = 512, 10
    x = torch.randn(n, d)
    w_true = torch.zeros(d)
    w_true[:3] = torch.tensor([2.0, -1.5, 1.0])
    y = (x @ w_true + 0.05 * torch.randn(n)).unsqueeze(1)
    model = nn.Linear(d, 1, bias=False)
    reg = HardConcreteL0(weight=0.5)
    _train(model, reg, x, y, steps=800)
    gate = dict(reg.gates(model))["weight"]
    z = gate.gates(sample=False)[0]
    assert torch.all(z[3:] == 0), z  # the irrelevant weights are gated off exactly
    assert torch.all(z[:3] > 0.9), z
    assert torch.allclose(model.weight[0, :3], w_true[:3], atol=0.05), model.weight
    assert reg.density(model) == pytest.approx(0.3)
    # without the penalty nothing is gated off
    dense = nn.Linear(d, 1, bias=False)
    free = HardConcreteL0(weight=0.0)
    _train(dense, free, x, y, steps=300)
    assert free.density(dense) == 1.0


def test_state_dict_round_trip_and_bad_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    reg = HardConcreteL0(params=["*"])
    reg.setup(model)
    reg.setup(model)  # idempotent: one gate per weight
    assert [n for n, _ in reg.gates(model)] == ["0.weight", "2.weight"]
    with torch.no_grad():
        for _, g in reg.gates(model):
            g.log_alpha.normal_()
    state = model.state_dict()
    assert "0.parametrizations.weight.original" in state and "0.parametrizations.weight.0.log_alpha" in state
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    reg2 = HardConcreteL0(params=["*"])
    reg2.attach(other)
    other.load_state_dict(state)
    x = torch.randn(6, 3)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    ctx = type("Ctx", (), {"model": other})()
    assert float(reg2.terms(ctx)["l0"]) == pytest.approx(float(reg.terms(type("Ctx", (), {"model": model})())["l0"]))
    with pytest.raises(ValueError, match=r"pattern 'blocks\.\*' matches no weight tensor .*candidates: 0\.weight, 2\.weight"):
        HardConcreteL0(params=["blocks.*"]).setup(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="gamma < 0 < 1 < zeta"):
        HardConcreteL0(gamma=0.1)
    with pytest.raises(ValueError, match="beta"):
        HardConcreteL0(beta=0.0)
    with pytest.raises(RuntimeError, match="no gates on this model"):
        HardConcreteL0().terms(type("Ctx", (), {"model": nn.Linear(2, 2)})())


TINY_L0 = """
seed_everything: 0
trainer: {max_steps: 3, accelerator: cpu, devices: 1, enable_progress_bar: false, enable_model_summary: false,
  log_every_n_steps: 1}
model:
  model:
    class_path: interp_train.models.mlp.MLP
    init_args: {d_in: 64, hidden: [8], d_out: 10}
  lr: 0.01
  weight_decay: 0.5
  regularizers:
  - class_path: interp_train.regularizers.hard_concrete.HardConcreteL0
    init_args: {weight: 0.1}
data:
  class_path: interp_train.data.digits.DigitsDataModule
  init_args: {batch_size: 64}
"""


def test_recipe_checkpoint_reloads_the_gates(tmp_path):
    from interp_train.cli import InterpTrainCLI
    from interp_train.recipes import load_recipe

    torch.set_num_threads(1)
    cfg = tmp_path / "l0.yaml"
    cfg.write_text(TINY_L0)
    cli = InterpTrainCLI(args=["fit", "--config", str(cfg), "--variant", "l0", "--checkpoint_root",
                               str(tmp_path / "ckpt"), "--test_after_fit", "false"])
    trained = cli.model.eval()
    reg = trained.regularizers[0]
    assert reg.step == 3
    # log α trained (by the task and the penalty) and not decayed: the optimizer puts it in a group without decay
    groups = trained.configure_optimizers().param_groups
    gate_ids = {id(g.log_alpha) for _, g in reg.gates(trained)}
    assert [g["weight_decay"] for g in groups if {id(p) for p in g["params"]} == gate_ids] == [0.0]
    assert any(not torch.all(g.log_alpha == 2.0) for _, g in reg.gates(trained))
    module, dm = load_recipe(cli.run_directory)
    dm.setup("fit")
    x = dm.splits["test"].tensors[0][:16]
    assert torch.equal(module(x), trained(x))
    assert module.regularizers[0].step == 3
    assert [n for n, _ in module.regularizers[0].gates(module)] == ["model.layers.0.weight", "model.layers.2.weight"]


def _l0_recipe_module():
    from interp_train.models.mlp import MLP
    from interp_train.recipes import RecipeModule

    torch.manual_seed(0)
    module = RecipeModule(MLP(d_in=5, hidden=[7], d_out=3), regularizers=[HardConcreteL0(weight=0.1, gate_lr_scale=3.0)],
                          lr=0.01, weight_decay=0.5)
    with torch.no_grad():  # gates away from their common start, so a copy that re-initialised them would differ
        for _, g in module.regularizers[0].gates(module):
            g.log_alpha.normal_(0.0, 2.0)
    return module


@pytest.mark.parametrize("copier", ["deepcopy", "pickle", "torch.save"])
def test_a_gated_model_survives_deepcopy_and_pickling(copier):
    """The gated model's copy (deepcopy, pickle, torch.save/torch.load of the whole module) computes the
    same outputs in both modes (a training-mode draw under the same RNG state), carries equal gates, keeps
    log α out of weight decay, and its own regularizer trains the copy's gates, not the original's."""
    import copy
    import io
    import pickle

    module = _l0_recipe_module()
    if copier == "deepcopy":
        clone = copy.deepcopy(module)
    elif copier == "pickle":
        clone = pickle.loads(pickle.dumps(module))
    else:
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    reg, reg_c = module.regularizers[0], clone.regularizers[0]
    gates, gates_c = reg.gates(module), reg_c.gates(clone)
    assert [n for n, _ in gates_c] == [n for n, _ in gates] == ["model.layers.0.weight", "model.layers.2.weight"]
    for (_, g), (_, g_c) in zip(gates, gates_c):
        assert g_c is not g and g_c.log_alpha is not g.log_alpha
        assert torch.equal(g_c.log_alpha, g.log_alpha)
        assert getattr(g_c.log_alpha, "no_weight_decay", False)
    # the copy's gates are the ones in the copy's forward pass, and the copy's own parameters
    assert {id(g_c.log_alpha) for _, g_c in gates_c} <= {id(p) for p in clone.parameters()}
    assert not {id(p) for p in clone.parameters()} & {id(p) for p in module.parameters()}
    x = torch.randn(9, 5)
    for mode in ("eval", "train"):
        getattr(module, mode)(), getattr(clone, mode)()
        torch.manual_seed(1)
        out = module(x)
        torch.manual_seed(1)
        assert torch.equal(clone(x), out)
    ctx = type("Ctx", (), {"model": clone})()
    expected = np.mean(np.concatenate([
        (1 / (1 + np.exp(-(g.log_alpha.detach().numpy() - (2 / 3) * np.log(0.1 / 1.1))))).ravel() for _, g in gates]))
    assert float(reg_c.terms(ctx)["l0"].detach()) == pytest.approx(expected, rel=1e-6)
    groups = clone.configure_optimizers().param_groups
    assert [(g["weight_decay"], g["lr"]) for g in groups
            if {id(p) for p in g["params"]} == {id(g.log_alpha) for _, g in gates_c}] == [(0.0, pytest.approx(0.03))]
    # a copy pickles again (its class is rebuilt picklable) and changing the copy leaves the original alone
    again = pickle.loads(pickle.dumps(clone))
    assert torch.equal(again.regularizers[0].gates(again)[0][1].log_alpha, gates[0][1].log_alpha)
    with torch.no_grad():
        gates_c[0][1].log_alpha.zero_()
    assert not torch.equal(gates[0][1].log_alpha, gates_c[0][1].log_alpha)


def test_a_new_model_at_a_freed_models_id_is_not_taken_for_the_gated_one():
    from tests.helpers import model_at_a_freed_id
    regs = []

    def remember(model):
        reg = HardConcreteL0(params=["*"])
        reg.attach(model)
        regs.append(reg)

    found = model_at_a_freed_id(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), remember)
    if found is None:
        pytest.skip("CPython did not reuse a freed model's id in 500 tries")
    _, second = found
    with pytest.raises(RuntimeError, match="no gates on this model"):
        regs[-1].gates(second)
    regs[-1].attach(second)  # and it can be gated: attach is not skipped as "already done"
    assert [name for name, _ in regs[-1].gates(second)] == ["0.weight", "1.weight"]


def test_a_model_copied_without_its_regularizer_gets_a_clear_error_and_copying_both_works():
    import copy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    reg = HardConcreteL0(params=["*"])
    reg.attach(model)
    alone = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"already gated .* a copy of a gated model; copy the model together with its"):
        reg.attach(alone)
    model_c, reg_c = copy.deepcopy((model, reg))
    gates_c = reg_c.gates(model_c)
    assert [name for name, _ in gates_c] == ["0.weight", "2.weight"]
    # the copied regularizer's gates are the copied model's own modules, not the original's
    assert all(any(m is g for m in model_c.modules()) and not any(m is g for m in model.modules())
               for _, g in gates_c)
    # and the copy computes what the original does: equal evaluation gates, equal outputs
    for (_, g), (_, g_c) in zip(reg.gates(model), gates_c):
        assert torch.equal(g_c.gates(sample=False), g.gates(sample=False))
    x = torch.randn(5, 3)
    model.eval(), model_c.eval()
    assert torch.equal(model_c(x), model(x))


def test_log_alpha_trains_at_its_own_learning_rate():
    """Adam's first step moves every parameter with a non-zero gradient by lr · sign(−g) (m̂ / √v̂ = ±1), so
    after one AdamW step log α has moved by exactly lr · gate_lr_scale (no decay) and the weights by lr
    (plus their decay): the analytic first step, not the code's grouping."""
    from interp_train.models.mlp import MLP
    from interp_train.recipes import RecipeModule

    torch.manual_seed(0)
    lr, scale, decay = 0.01, 7.0, 0.5
    module = RecipeModule(MLP(d_in=5, hidden=[7], d_out=3), regularizers=[HardConcreteL0(weight=0.1, gate_lr_scale=scale)],
                          lr=lr, weight_decay=decay)
    opt = module.configure_optimizers()
    gates = [g.log_alpha for _, g in module.regularizers[0].gates(module)]
    weights = [module.model.layers[0].parametrizations.weight.original, module.model.layers[0].bias]
    before = [p.detach().clone() for p in gates + weights]
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    regularized_loss(module.model, x, y, module.regularizers).total.backward()
    opt.step()
    # Adam's first step: m̂ = g, v̂ = g², so the update is −lr g / (|g| + eps), eps = 1e-8
    for p, old in zip(gates, before[:len(gates)]):
        g = p.grad.double()
        expected = old.double() - lr * scale * g / (g.abs() + 1e-8)
        assert (g.abs() > 1e-6).float().mean() > 0.9 and torch.allclose(p.detach().double(), expected, atol=1e-6)
    for p, old in zip(weights, before[len(gates):]):
        g = p.grad.double()
        expected = old.double() * (1 - lr * decay) - lr * g / (g.abs() + 1e-8)  # AdamW: decoupled decay first
        assert (g != 0).any() and torch.allclose(p.detach().double(), expected, atol=1e-6)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=rf"gate_lr_scale must be a finite number > 0, got {bad!r}"):
            HardConcreteL0(gate_lr_scale=bad)
    with pytest.raises(TypeError, match=r"gate_lr_scale must be a number, got 'fast'"):
        HardConcreteL0(gate_lr_scale="fast")
