"""Connection cost (BIMT): hand-computed values, function-preserving swaps, callback, errors, training effect."""

import math

import pytest
import torch
from torch import nn

from interp_train import attach_regularizers, regularized_loss
from interp_train.callbacks import NeuronSwapCallback, swap_neurons
from interp_train.regularizers.connection_cost import ConnectionCost, connection_cost, neuron_positions
from tests.helpers import PlainClassifier, quiet_trainer, toy_loader, train_digits


def test_cost_equals_hand_computed_value_1d():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    model = nn.Sequential(lin)
    # positions 0.25, 0.75 on both sides, gap 1: straight links cost 1, diagonal ones sqrt(0.25 + 1)
    expected = 1.0 * 1 + 2.0 * math.sqrt(1.25) + 3.0 * math.sqrt(1.25) + 0.5 * 1
    assert connection_cost(model, ["0"]).item() == pytest.approx(expected, rel=1e-6)
    out = regularized_loss(model, torch.randn(3, 2), torch.zeros(3, dtype=torch.long), [ConnectionCost(layers=["0"])])
    assert out.terms["connection_cost/cost"].item() == pytest.approx(expected, rel=1e-6)


def test_cost_equals_hand_computed_value_2d():
    assert neuron_positions(4, "2d").tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    lin = nn.Linear(4, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0, 2.0, 0.0]]))
    # the single output neuron sits at (0.5, 0.5): every input is sqrt(0.125) away in the plane
    expected = 4.0 * math.sqrt(0.125 + 0.5 ** 2)
    assert connection_cost(nn.Sequential(lin), ["0"], layout="2d", layer_gap=0.5).item() == pytest.approx(expected)


def deep_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Dropout(0.0),
                         nn.Linear(12, 3))


@pytest.mark.parametrize("layout", ["1d", "2d"])
def test_swaps_keep_outputs_and_lower_cost(layout):
    model, x = deep_mlp(), torch.randn(20, 6)
    layers = ["0", "2", "5"]
    before_out = model(x)
    before_cost = connection_cost(model, layers, layout).item()
    n = swap_neurons(model, layers, layout)
    assert n > 0
    assert torch.allclose(model(x), before_out, atol=1e-6, rtol=0)
    after_cost = connection_cost(model, layers, layout).item()
    assert after_cost < before_cost
    assert swap_neurons(model, layers, layout) == 0  # greedy search has converged
    assert connection_cost(model, layers, layout).item() == pytest.approx(after_cost, rel=1e-12)


def test_single_swap_changes_cost_by_the_computed_delta_and_permutes_optimizer_state():
    model, x = deep_mlp(), torch.randn(20, 6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (20,))).backward()
    opt.step()
    old_w0, old_w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    old_m0, old_m2 = opt.state[model[0].weight]["exp_avg"].clone(), opt.state[model[2].weight]["exp_avg"].clone()
    old_b0_state = opt.state[model[0].bias]["exp_avg_sq"].clone()
    assert swap_neurons(model, ["0", "2"], max_swaps=1, optimizers=[opt]) == 1
    # recover the permutation from the weights (rows are distinct) and check the state followed it
    perm = torch.cdist(model[0].weight.detach(), old_w0).argmin(1)
    assert sorted(perm.tolist()) == list(range(16)) and (perm != torch.arange(16)).sum() == 2
    assert torch.equal(model[0].weight.detach(), old_w0[perm])
    assert torch.equal(model[2].weight.detach(), old_w2[:, perm])
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], old_m0[perm])
    assert torch.equal(opt.state[model[0].bias]["exp_avg_sq"], old_b0_state[perm])
    assert torch.equal(opt.state[model[2].weight]["exp_avg"], old_m2[:, perm])


def test_bad_input_is_a_clear_error():
    x, y = torch.randn(3, 6), torch.zeros(3, dtype=torch.long)
    with pytest.raises(KeyError, match=r"unknown layer '7'.*one of"):
        regularized_loss(deep_mlp(), x, y, [ConnectionCost(layers=["0", "7"])])
    with pytest.raises(TypeError, match=r"needs nn.Linear layers, but '1' is a ReLU"):
        regularized_loss(deep_mlp(), x, y, [ConnectionCost(layers=["0", "1"])])
    with pytest.raises(ValueError, match=r"unknown layout '3d'; allowed: 1d, 2d"):
        ConnectionCost(layers=["0"], layout="3d")
    with pytest.raises(ValueError, match=r"non-empty list"):
        ConnectionCost(layers="0")
    with pytest.raises(ValueError, match=r"'0' \(16 outputs\) and '5' \(12 inputs\) are not consecutive"):
        swap_neurons(deep_mlp(), ["0", "5"])
    normed = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"non-elementwise modules \['LayerNorm'\]"):
        swap_neurons(normed, ["0", "2"])
    with pytest.raises(ValueError, match=r"every_n_steps must be a positive integer, got 0"):
        NeuronSwapCallback(every_n_steps=0)


class TwoLayer(nn.Module):
    """Not an nn.Sequential: the structure cannot be verified, but the user may vouch for it."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(5, 9)
        self.down = nn.Linear(9, 2)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_unverifiable_structure_needs_assume_elementwise():
    torch.manual_seed(1)
    model, x = TwoLayer(), torch.randn(7, 5)
    with pytest.raises(ValueError, match=r"cannot verify that 'up' feeds 'down'.*assume_elementwise=True"):
        swap_neurons(model, ["up", "down"])
    before = model(x)
    assert swap_neurons(model, ["up", "down"], assume_elementwise=True) > 0
    assert torch.allclose(model(x), before, atol=1e-6, rtol=0)


def test_lightning_callback_swaps_and_keeps_state():
    torch.manual_seed(0)
    model = attach_regularizers(PlainClassifier(), [ConnectionCost(1e-3, layers=["net.0", "net.2"])])
    callback = NeuronSwapCallback(every_n_steps=2)
    trainer = quiet_trainer(max_steps=4, callbacks=[callback])
    trainer.fit(model, toy_loader())
    assert callback.total_swaps > 0
    assert float(trainer.callback_metrics["train/neuron_swaps"]) == callback.total_swaps
    cost_keys = [k for k in trainer.callback_metrics if k.endswith("connection_cost/cost")]
    assert cost_keys and trainer.callback_metrics[cost_keys[0]] > 0
    fresh = NeuronSwapCallback(every_n_steps=2)
    fresh.load_state_dict(callback.state_dict())
    assert fresh.total_swaps == callback.total_swaps
    # after training the swaps have converged for the final weights: a further call only lowers cost
    cost = connection_cost(model, ["net.0", "net.2"]).item()
    swap_neurons(model, ["net.0", "net.2"])
    assert connection_cost(model, ["net.0", "net.2"]).item() <= cost


def test_penalty_lowers_connection_cost_in_training():
    layers = ["0", "2", "4"]

    def train(regs):
        return connection_cost(train_digits(regs), layers).item()

    base = train([])
    regularized = train([ConnectionCost(1e-3, layers=layers)])
    assert regularized < 0.8 * base, (regularized, base)
