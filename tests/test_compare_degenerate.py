"""A collapsed network (a layer constant over the data) cannot have a LIB basis: fit_lib raises
DegenerateLayerError (a ValueError), and compare records the LIB metrics as None with the reason
instead of stopping the whole comparison (a strength sweep can kill a network at its top strength)."""

import pytest
import torch
from torch import nn

from evaluation.compare.measure import measure_metric
from evaluation.compare.metrics.base import CompareMetric, Measurement
from evaluation.lib.fit import DegenerateLayerError, fit_lib


def collapsed_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # every hidden unit dead: layer "1" is 0 on every input
    return model


def test_constant_layer_raises_degenerate_layer_error():
    x = torch.randn(16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(DegenerateLayerError, match="node layer '1' is constant over the data") as err:
        fit_lib(collapsed_mlp(), [x[:8], x[8:]], ["0", "1", "output"], progress=False)
    assert isinstance(err.value, ValueError)  # CLIs still report it as a bad input (exit code 2)


class _Ctx:
    """What measure_metric reads of a RunContext."""

    def __init__(self):
        self.used, self.shared_details, self.shared_notes = set(), {}, {}


class _LIBOnCollapsed(CompareMetric):
    name, label, description, version = "lib_thing", "LIB thing", "test metric", 1

    def measure(self, ctx):
        x = torch.randn(8, 5, dtype=torch.float64)
        return fit_lib(collapsed_mlp(), [x], ["0", "1", "output"], progress=False)


class _Fine(CompareMetric):
    name, label, description, version = "fine", "fine", "test metric", 1

    def measure(self, ctx):
        return Measurement(0.5, notes=["ok"])


class _BadOption(CompareMetric):
    name, label, description, version = "bad", "bad", "test metric", 1

    def measure(self, ctx):
        raise ValueError("max_samples must be an integer >= 2")


def test_compare_records_an_unmeasurable_metric_as_none_with_the_reason():
    record = measure_metric(_LIBOnCollapsed(), _Ctx())
    assert record["value"] is None
    assert record["notes"] == ["lib_thing not measurable on this run: node layer '1' is constant over the data "
                               "(every variance is 0), so it has no directions to fit; drop it from node_layers or "
                               "use data on which it varies"]
    assert measure_metric(_Fine(), _Ctx())["value"] == 0.5
    with pytest.raises(ValueError, match="max_samples"):  # other errors still stop the comparison
        measure_metric(_BadOption(), _Ctx())


def test_all_zero_gradients_are_a_degenerate_model():
    from evaluation.errors import DegenerateModelError
    from evaluation.metrics.alignment import gradient_alignment

    class Tangents:
        def basis(self, x, z=None):  # noqa: ARG002 - the first coordinate axis at every point
            return torch.eye(5, dtype=x.dtype)[:, :1].expand(len(x), 5, 1)

    model = collapsed_mlp()  # dead hidden layer: the loss does not depend on the input
    x = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.raises(DegenerateModelError, match="all 8 gradients were exactly zero"):
        gradient_alignment(model, [(x, torch.zeros(8, dtype=torch.long))], Tangents(), target="loss", progress=False)


def test_edge_curves_plot_skips_a_run_without_lib(tmp_path):
    from evaluation.compare.plots import plot_edge_curves

    curve = {"n": [1, 2, 4], "c": [0.5, 0.8, 1.0]}
    measurements = {"baseline": [{"details": {"edge_curves": {"input": curve}}}],
                    "collapsed": [{"details": {}}, {"details": {"edge_curves": None}}]}
    assert plot_edge_curves(measurements, tmp_path / "edge_curves.png") == "edge_curves.png"
    assert plot_edge_curves({"collapsed": [{"details": {}}]}, tmp_path / "none.png") is None
