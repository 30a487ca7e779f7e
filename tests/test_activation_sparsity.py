"""ActivationSparsity: the scale-free L1/L2 measure against hand values and a naive loop, wiring,
batch-size independence, and its training effect on digits."""

import math

import pytest
import torch
from torch import nn

from interp_train import regularized_loss
from interp_train.regularizers import ActivationSparsity
from interp_train.regularizers.activation_sparsity import hoyer_measure
from tests.helpers import digits, train_digits


def naive_measure(rows: list[list[float]], center: bool) -> float:
    """Plain-Python reference: mean over rows of ||c||_1 / (sqrt(d) ||c||_2), c = row − column mean."""
    d = len(rows[0])
    means = [math.fsum(r[j] for r in rows) / len(rows) if center else 0.0 for j in range(d)]
    values = []
    for r in rows:
        c = [r[j] - means[j] for j in range(d)]
        l2 = math.sqrt(math.fsum(v * v for v in c))
        values.append(0.0 if l2 == 0 else math.fsum(abs(v) for v in c) / (math.sqrt(d) * l2))
    return math.fsum(values) / len(values)


def test_hand_values():
    d = 16
    one_hot = torch.zeros(1, d, dtype=torch.float64)
    one_hot[0, 3] = -5.0
    signs = torch.tensor([[1.0, -1.0] * (d // 2)], dtype=torch.float64) * 0.3
    assert hoyer_measure(one_hot).item() == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    assert hoyer_measure(signs).item() == pytest.approx(1.0, rel=1e-12)
    two = torch.zeros(1, d, dtype=torch.float64)
    two[0, :2] = torch.tensor([3.0, 4.0])  # ||c||_1 = 7, ||c||_2 = 5
    assert hoyer_measure(two).item() == pytest.approx(7 / (5 * math.sqrt(d)), rel=1e-12)
    zero = torch.zeros(2, d, requires_grad=True)
    value = hoyer_measure(zero).sum()
    (grad,) = torch.autograd.grad(value, zero)
    assert value.item() == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("center", [True, False])
def test_matches_naive_reference_and_is_scale_free(center):
    torch.manual_seed(0)
    a = torch.randn(3, 5, 12, dtype=torch.float64) + torch.linspace(-2, 2, 12, dtype=torch.float64)
    reg = ActivationSparsity(layers="x", center=center)
    rows = a.reshape(-1, 12).tolist()
    assert reg.measure(a).item() == pytest.approx(naive_measure(rows, center), rel=1e-12)
    assert reg.measure(7.5 * a).item() == pytest.approx(reg.measure(a).item(), rel=1e-12)
    # Gaussian rows: E s ≈ sqrt(2/π) for large d (a coarse sanity check of the scale)
    wide = torch.randn(4096, 256, dtype=torch.float64)
    assert reg.measure(wide).item() == pytest.approx(math.sqrt(2 / math.pi), abs=0.01)


def test_centering_ignores_a_constant_offset_channel():
    """A channel holding a large constant is 'sparse' uncentred, not centred (mean ablation would keep it)."""
    torch.manual_seed(1)
    a = torch.randn(64, 10)
    offset = a.clone()
    offset[:, 0] += 100.0
    centred = ActivationSparsity(layers="x")
    raw = ActivationSparsity(layers="x", center=False)
    assert centred.measure(offset).item() == pytest.approx(centred.measure(a).item(), rel=1e-5)
    assert raw.measure(offset).item() < 0.5 * raw.measure(a).item()


def test_uncentred_term_is_a_mean_over_examples():
    """No batch-size constant: the term of a batch is the mean of its halves' terms."""
    torch.manual_seed(2)
    a = torch.randn(8, 6, 9)
    reg = ActivationSparsity(layers="x", center=False)
    halves = (reg.measure(a[:4]).item() + reg.measure(a[4:]).item()) / 2
    assert reg.measure(a).item() == pytest.approx(halves, rel=1e-6)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def test_wiring_terms_total_and_gradient():
    model, x, y = mlp(), torch.randn(16, 6), torch.randint(0, 3, (16,))
    reg = ActivationSparsity(weight=0.3, layers=["1", "3"])
    out = regularized_loss(model, x, y, [reg])
    h1 = torch.relu(model[0](x)).detach()
    h3 = torch.tanh(model[2](h1)).detach()
    assert out.terms["activation_sparsity/hoyer/1"].item() == pytest.approx(naive_measure(h1.tolist(), True), rel=1e-5)
    assert out.terms["activation_sparsity/hoyer/3"].item() == pytest.approx(naive_measure(h3.tolist(), True), rel=1e-5)
    expected_total = out.task_loss + 0.3 * (out.terms["activation_sparsity/hoyer/1"] + out.terms["activation_sparsity/hoyer/3"])
    assert out.total.item() == pytest.approx(expected_total.item(), rel=1e-6)
    out.total.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()


def test_training_makes_hidden_activations_sparser_at_little_cost():
    layers = ["1", "3"]
    dense = train_digits([], steps=200)
    sparse = train_digits([ActivationSparsity(weight=0.3, layers=layers)], steps=200)
    _, (x_test, y_test) = digits()
    probe = ActivationSparsity(layers=layers)

    def hidden(model):
        h1 = model[1](model[0](x_test))
        return h1, model[3](model[2](h1))

    with torch.no_grad():
        dense_s = [probe.measure(h).item() for h in hidden(dense)]
        sparse_s = [probe.measure(h).item() for h in hidden(sparse)]
        acc = [(m(x_test).argmax(-1) == y_test).float().mean().item() for m in (dense, sparse)]
    # measured: 0.72 -> 0.61 and 0.80 -> 0.58, accuracy 95.9 -> 92.0 %
    assert all(s < d - 0.05 for s, d in zip(sparse_s, dense_s)), (dense_s, sparse_s)
    assert acc[1] > acc[0] - 0.05, acc


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        ActivationSparsity(layers=[])
    with pytest.raises(TypeError, match="a layer name must be a non-empty string, got 3"):
        ActivationSparsity(layers=["1", 3])
    with pytest.raises(TypeError, match="center must be True or False, got 'yes'"):
        ActivationSparsity(layers="1", center="yes")
    with pytest.raises(ValueError, match=r"feature dimension of at least 2, got shape \(4, 1\)"):
        ActivationSparsity(layers="x").measure(torch.randn(4, 1))
    with pytest.raises(KeyError, match=r"unknown layer 'blocks.3'"):
        regularized_loss(mlp(), torch.randn(4, 6), torch.randint(0, 3, (4,)), [ActivationSparsity(layers="blocks.3")])
