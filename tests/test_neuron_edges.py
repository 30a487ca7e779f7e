"""Edges in the neuron basis (C = I): an analytic case, the compare metric, the report and the naive reference."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from evaluation.compare.metrics import get_metric
from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.lib.naive import naive_fit_lib
from evaluation.metrics.lib_summary import summarize
from tests.test_lib import assert_same_fit

F64 = torch.float64
WEIGHTS = torch.tensor([3.0, -2.0, 1.0, 0.5, 0.25, 0.1], dtype=F64)


def diagonal_model():
    """out = x diag(w) + b: in the neuron basis, E[1 + i, 1 + j] = δ_ij w_j² E[x_j²] (gradient rule)."""
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.copy_(torch.diag(WEIGHTS))
        lin.bias.copy_(torch.linspace(-1, 1, 6, dtype=F64))
    return nn.Sequential(lin)


def data():
    g = torch.Generator().manual_seed(0)
    x = 1.0 + torch.randn(64, 6, dtype=F64, generator=g)
    return [x[:32], x[32:]], x


@pytest.mark.parametrize("jacobians", ["structured", "autograd"])
def test_neuron_edges_of_a_diagonal_map_are_the_squared_weights_times_the_second_moments(jacobians):
    batches, x = data()
    res = fit_lib(diagonal_model(), batches, ["input", "output"], LIBConfig(jacobians=jacobians), progress=False)
    want = torch.zeros(7, 7, dtype=F64)
    want[1:, 1:] = torch.diag(WEIGHTS ** 2 * x.pow(2).mean(0))
    want[1:, 0] = 0.0  # no derivative along the constant
    torch.testing.assert_close(res.neuron_edges["input"], want, atol=1e-13, rtol=1e-10)
    # the metric: the fewest of the 6 diagonal edges holding 90 % of the weight, over all 36 edges
    weights = torch.sort(WEIGHTS ** 2 * x.pow(2).mean(0), descending=True).values
    n90 = int((torch.cumsum(weights, 0) < 0.9 * weights.sum()).sum()) + 1
    value = get_metric("neuron_edge_fraction_90").measure(SimpleNamespace(lib_summary=summarize(res)))
    assert value == pytest.approx(n90 / 36, rel=1e-12)


def test_neuron_edges_match_the_naive_reference_on_an_mlp():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    torch.manual_seed(1)
    batches = [torch.randn(20, 5, dtype=F64), torch.randn(20, 5, dtype=F64)]
    layers, cfg = ["input", "1", "output"], LIBConfig(integration="gauss-legendre", n_intervals=2)
    res = fit_lib(model, batches, layers, cfg, progress=False)
    ref = naive_fit_lib(model, batches, layers, cfg)
    assert set(res.edges) == {"lib", "pca", "neuron"}
    assert_same_fit(res, ref)  # includes the neuron edges
    off = fit_lib(model, batches, layers, LIBConfig(neuron_edges=False), progress=False)
    assert set(off.edges) == {"lib", "pca"} and set(off.bases) == {"lib", "pca", "neuron"}
    with pytest.raises(ValueError, match="neuron_edges must be True or False"):
        LIBConfig(neuron_edges="yes")


def test_neuron_edges_in_the_report(tmp_path):
    from safetensors.torch import load_file

    from evaluation.lib.report import write_lib_report

    batches, _ = data()
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    res = fit_lib(model, batches, ["input", "1", "output"], LIBConfig(), progress=False)
    report = write_lib_report(res, tmp_path / "out")
    edges = load_file(str(tmp_path / "out" / "edges.safetensors"))
    torch.testing.assert_close(edges["neuron/1"], res.neuron_edges["1"])
    assert set(report["summary"]["edges"]["1"]) == {"lib", "pca", "neuron"}
    assert report["summary"]["edges"]["1"]["neuron"]["n_edges"] == 5 * 3
    assert "neuron" in report["summary"]["modularity"]


def test_the_edge_pass_alone_gives_the_fits_edges():
    from evaluation.lib.fit import fit_edges

    batches, _ = data()
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    layers = ["input", "1", "output"]
    res = fit_lib(model, batches, layers, LIBConfig(), progress=False)
    again = fit_edges(model, batches, layers, {"neuron": res.neuron, "lib": res.lib}, LIBConfig())
    for name in layers[:-1]:
        torch.testing.assert_close(again["neuron"][name], res.neuron_edges[name], atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(again["lib"][name], res.lib_edges[name], atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("flag", [[], ["--no-neuron-edges"]])
def test_interp_eval_lib_writes_neuron_edges_unless_told_not_to(tmp_path, flag):
    import json

    from safetensors.torch import load_file

    from evaluation.cli import main
    from tests.test_cli_errors import HT_CFG, P
    from tests.test_checkpoints import random_ht_state_dict

    torch.save(random_ht_state_dict(HT_CFG), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(HT_CFG))
    out = tmp_path / "out"
    rc = main(["lib", str(tmp_path / "model.pt"), "--config", str(tmp_path / "config.json"),
               "--data", f"modular-addition:p={P}", "--no-ablation", "--quiet", "--out", str(out), *flag])
    assert rc in (0, None)
    prefixes = {key.split("/")[0] for key in load_file(str(out / "edges.safetensors"))}
    assert prefixes == ({"lib", "pca"} if flag else {"lib", "pca", "neuron"})
