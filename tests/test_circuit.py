"""Circuit size by pruning: a planted circuit is recovered exactly, a dense model needs more nodes,
edge counts match hand counts, bad targets are rejected."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from evaluation.metrics.circuit import CircuitConfig, NodeGroup, prune_circuit

PLANTED = {"1": [0, 1, 2, 3], "3": [0, 1, 2]}


def mlp(seed: int, planted: bool, linear_last: bool = False) -> nn.Sequential:
    """linear_last: the second hidden layer is linear in the first (nn.Identity, like a residual stream)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 10), nn.Identity() if linear_last else nn.ReLU(),
                          nn.Linear(10, 3))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # large weights: every circuit unit matters by more than delta
        model[2].weight.mul_(3.0)
        model[4].weight.mul_(20.0)
        if planted:
            model[2].weight[:3, 4:] = 0  # circuit layer-2 units read only circuit layer-1 units 0-3
            model[4].weight[:, 3:] = 0   # layer-2 units 3-9 do not reach the output
    return model


def task(model, n=512, seed=0):
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(-1)  # the model's own task: its predictions
    return x, y


def naive_loss_without(model, x, y, site: str, unit: int, ablation: str) -> float:
    """Independent reference: ablate one unit with a forward hook written here."""
    with torch.no_grad():
        h = model[: int(site) + 1](x)
        fill = h[:, unit].mean() if ablation == "mean" else 0.0

        def hook(_m, _i, out):
            out = out.clone()
            out[:, unit] = fill
            return out

        handle = model[int(site)].register_forward_hook(hook)
        try:
            return float(F.cross_entropy(model(x), y))
        finally:
            handle.remove()


@pytest.mark.parametrize("search", ["penalty", "lagrangian"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_planted_circuit_is_recovered_and_a_dense_model_needs_more(ablation, search):
    model = mlp(3, planted=True)
    x, y = task(model)
    config = CircuitConfig(ablation=ablation, search=search)
    result = prune_circuit(model, x, y, config)
    with torch.no_grad():
        full = float(F.cross_entropy(model(x), y))
    # the planted units are each necessary (checked independently), the others provably irrelevant
    for site, units in PLANTED.items():
        for unit in units:
            assert naive_loss_without(model, x, y, site, unit, ablation) > full + config.delta
    assert result.kept == PLANTED
    assert result.nodes_kept == 7 and result.nodes_total == 22
    assert result.full_loss == pytest.approx(full, rel=1e-5)
    assert result.loss <= result.target_loss == pytest.approx(full + 0.01, rel=1e-6)
    assert result.edges == int((model[2].weight[:3, :4] != 0).sum()) == 12
    assert result.edges_total == int((model[2].weight != 0).sum())

    dense = mlp(3, planted=False)
    xd, yd = task(dense)
    assert prune_circuit(dense, xd, yd, config).nodes_kept > result.nodes_kept


def naive_gated_loss(model, x, y, kept: dict[str, list[int]]) -> float:
    """Independent reference: every unit outside ``kept`` set to its mean, by forward hooks written here."""
    handles = []
    with torch.no_grad():
        for site in ("1", "3"):
            mean = model[: int(site) + 1](x).mean(0)
            off = torch.ones_like(mean, dtype=torch.bool)
            off[kept.get(site, [])] = False

            def hook(_m, _i, out, mean=mean, off=off):
                return torch.where(off, mean, out)

            handles.append(model[int(site)].register_forward_hook(hook))
        try:
            return float(F.cross_entropy(model(x), y))
        finally:
            for h in handles:
                h.remove()


def test_the_penalty_searchs_gates_close_together_and_the_lagrangian_ones_by_importance():
    """Without the greedy pass, on a model whose last hidden layer is linear in the first (so with
    every unit mean-ablated each activation equals its mean, and every gate's gradient is zero): the
    hinge search's gates all close at the same step and never reopen, so it returns the full model;
    the Lagrangian search's gradient phase alone finds a smaller circuit within the bound (checked
    with hooks), keeping the units the output needs."""
    model = mlp(3, planted=True, linear_last=True)
    x, y = task(model)
    penalty = prune_circuit(model, x, y, CircuitConfig(refine=False))
    assert penalty.nodes_kept == penalty.nodes_total == 22
    lagrangian = prune_circuit(model, x, y, CircuitConfig(refine=False, search="lagrangian"))
    assert lagrangian.nodes_kept < 22
    assert naive_gated_loss(model, x, y, lagrangian.kept) == pytest.approx(lagrangian.loss, rel=1e-5)
    assert lagrangian.loss <= lagrangian.target_loss
    for site, units in PLANTED.items():  # the units the output needs stay
        assert set(units) <= set(lagrangian.kept[site])


def test_transformer_edges_with_all_nodes_kept_match_the_hand_count():
    from interp_train.models.transformer import Transformer

    d, h, dh, m, L = 8, 2, 4, 16, 2
    model = Transformer(d_vocab=12, d_vocab_out=11, n_ctx=3, d_model=d, n_heads=h, d_head=dh, d_mlp=m, n_layers=L,
                        init_seed=0)
    x = torch.randint(0, 11, (64, 3), generator=torch.Generator().manual_seed(0))
    y = model(x)[:, -1].argmax(-1).detach()
    result = prune_circuit(model, x, y, CircuitConfig(steps=3, refine=False))
    # per layer: resid_pre->heads d*h, heads->resid_mid h*d, W_in d*m, W_out m*d, two skips of d channels
    assert result.edges_total == L * (d * h + h * d + d * m + m * d + 2 * d)
    assert result.nodes_total == L * (d + h + d + m) + d
    assert result.loss <= result.target_loss
    assert result.edges <= result.edges_total and result.nodes_kept <= result.nodes_total


def test_target_loss_below_the_full_model_is_an_error():
    model = mlp(0, planted=True)
    x, y = task(model)
    with pytest.raises(ValueError, match=r"target_loss -1.0 is below the full model's loss"):
        prune_circuit(model, x, y, CircuitConfig(target_loss=-1.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(delta=0.0), "delta must be"), (dict(ablation="resample"), "unknown ablation 'resample'"),
    (dict(steps=-1), "steps must be"), (dict(lr=float("nan")), "lr must be"),
    (dict(search="anneal"), "unknown search 'anneal'; allowed: penalty, lagrangian"),
    (dict(dual_lr=0.0), "dual_lr must be"),
])
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CircuitConfig(**kwargs)


def test_a_group_that_does_not_fit_its_site_is_an_error():
    model = mlp(0, planted=True)
    x, y = task(model)
    with pytest.raises(ValueError, match="site '1' has 12 channels, but the node group says 5 nodes x width 2"):
        prune_circuit(model, x, y, groups=[NodeGroup("1", 5, width=2)])


def test_mlp_inside_a_module_uses_its_hidden_units_and_counts_edges():
    from interp_train.models.mlp import MLP

    torch.manual_seed(0)
    wrapper = type("Wrap", (nn.Module,), {"forward": lambda self, x: self.model(x)})()  # like RecipeModule
    wrapper.model = MLP(d_in=4, hidden=[6, 5], d_out=3)
    x = torch.randn(64, 4)
    y = wrapper(x).argmax(-1).detach()
    result = prune_circuit(wrapper, x, y, CircuitConfig(steps=0, refine=False))
    assert result.kept == {"model.layers.1": list(range(6)), "model.layers.3": list(range(5))}
    assert result.edges == result.edges_total == 30


@pytest.mark.parametrize("training", [True, False])
def test_the_search_runs_in_eval_mode_with_frozen_weights_and_restores_both(training):
    """During the search the forward passes see eval mode and no weight requiring grad (no grads reach
    the model); afterwards the training flag and each weight's requires_grad are as before — also when the
    call raises — and the result does not depend on the mode the model came in."""
    model = mlp(0, planted=True)
    x, y = task(model)
    model[2].bias.requires_grad_(False)  # a mixed pattern, so "restore" is not "set all True"
    requires = [p.requires_grad for p in model.parameters()]
    assert requires == [True, True, True, False, True, True]
    seen = []
    model.register_forward_pre_hook(
        lambda m, _: seen.append((m.training, any(p.requires_grad for p in m.parameters()), torch.is_grad_enabled())))
    model.train(training)
    res = prune_circuit(model, x, y, CircuitConfig(steps=20))
    # the search (the last pass, which scores the circuit, runs after requires_grad is restored)
    assert len(seen) > 2 and all(not mode and not req for mode, req, _ in seen[:-1]) and not seen[-1][0]
    assert any(grad for _, _, grad in seen)  # the gate logits are trained: grad mode stays on in the search
    assert model.training is training and all(m.training is training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())
    model.train(not training)
    other = prune_circuit(model, x, y, CircuitConfig(steps=20))
    assert (other.kept, other.nodes_kept, other.loss) == (res.kept, res.nodes_kept, res.loss)
    with pytest.raises(ValueError, match="below the full model's loss"):
        prune_circuit(model, x, y, CircuitConfig(target_loss=-1.0))
    assert model.training is (not training) and [p.requires_grad for p in model.parameters()] == requires


def test_a_gated_model_in_training_mode_is_scored_with_its_evaluation_gates():
    """HardConcreteL0 gates are drawn in training mode: a model handed over in training mode gets the
    circuit, loss and edge counts of its deterministic evaluation gates, as one handed over in eval mode."""
    from interp_train.regularizers import HardConcreteL0

    model = mlp(0, planted=True)
    x, y = task(model)
    HardConcreteL0(init_log_alpha=0.0).setup(model)  # evaluation gates 0.5; drawn gates often exactly 0
    want = prune_circuit(model.eval(), x, y, CircuitConfig(steps=20))
    torch.manual_seed(0)
    got = prune_circuit(model.train(), x, y, CircuitConfig(steps=20))
    assert model.training
    assert (got.kept, got.loss, got.full_loss, got.edges, got.edges_total) == \
        (want.kept, want.loss, want.full_loss, want.edges, want.edges_total)
    with torch.no_grad():  # the reference: non-zero evaluation-gated weights between the node groups' units
        model.eval()
        w = model[2].weight  # hidden units "1" -> "3"
        assert want.edges_total == int((w != 0).sum()) == 120 - 3 * 8  # the planted zeros only
        rows, cols = torch.tensor(want.kept["3"]), torch.tensor(want.kept["1"])
        assert want.edges == int((w[rows][:, cols] != 0).sum())
