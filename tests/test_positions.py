"""Position-indexed node layers ("blocks.0.hook_resid_mid[-1]"): closed form and autograd against the
naive jacrev reference, properties, names kept as given, and bad indices."""

import pytest
import torch
from torch import nn

from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.lib.naive import naive_fit_lib
from evaluation.lib.positions import insert, positions_of, select, split_layer
from interp_train.sites import run_model
from tests.test_lib import assert_same_fit
from tests.test_structured import bridge, tokens

F64 = torch.float64
PAPER = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]", "output[-1]"]


@pytest.mark.parametrize("jacobians", ["structured", "autograd"])
@pytest.mark.parametrize("integration,n", [("gradient", 1), ("trapezoid", 2)])
def test_paper_layout_matches_naive(jacobians, integration, n):
    """resid_pre at every position, then the last position only (the LIB paper's modular-addition layout)."""
    model, data = bridge(n_layers=1, act_fn="relu"), tokens()
    cfg = LIBConfig(jacobians=jacobians, integration=integration, n_intervals=n)
    res = fit_lib(model, data, PAPER, cfg, progress=False)
    if jacobians == "structured":
        assert [m.split(": ")[-1] for m in res.methods.values()] == ["attention", "mlp", "unembed"]
    assert_same_fit(res, naive_fit_lib(model, data, PAPER, cfg))
    assert list(res.lib) == PAPER and list(res.lib_edges) == PAPER[:-1]  # names kept as given


@pytest.mark.parametrize("layers", [
    # one input position into one output position through attention (the others are held fixed)
    # then one input position into every output position of the next attention
    ["blocks.0.hook_resid_pre[1]", "blocks.0.hook_resid_mid[3]", "blocks.0.hook_resid_post[3]",
     "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post", "output"],
    # an earlier output position: attention rows t < T - 1 only
    ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[2]", "blocks.0.hook_resid_post[2]",
     "blocks.1.hook_resid_mid[-1]", "blocks.1.hook_resid_post[-1]", "output[-1]"],
    # every position out of one: the MLP passes it to its own position only
    ["blocks.0.hook_resid_mid[0]", "blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
     "output[-2]"],
])
def test_mixed_positions_match_naive_in_closed_form_and_by_autograd(layers):
    model, data = bridge(n_layers=2), tokens()
    structured = fit_lib(model, data, layers, LIBConfig(jacobians="structured"), progress=False)
    assert all(m.startswith("closed form") for m in structured.methods.values())
    naive = naive_fit_lib(model, data, layers, LIBConfig())
    assert_same_fit(structured, naive)
    assert_same_fit(fit_lib(model, data, layers, LIBConfig(jacobians="autograd"), progress=False), naive)


def test_indexed_layer_moments_are_those_of_that_position():
    """Property: the PCA of 'site[i]' is the PCA of act[:, i]; -1 and T-1 name the same layer."""
    model, data = bridge(n_layers=1), tokens()
    a = fit_lib(model, data, ["blocks.0.hook_resid_mid[-1]", "output[-1]"], LIBConfig(), progress=False)
    b = fit_lib(model, data, ["blocks.0.hook_resid_mid[4]", "output[4]"], LIBConfig(), progress=False)
    torch.testing.assert_close(a.lib["blocks.0.hook_resid_mid[-1]"].Lambda, b.lib["blocks.0.hook_resid_mid[4]"].Lambda)
    rows = torch.cat([run_model(model, x, record=["blocks.0.hook_resid_mid"]).activations["blocks.0.hook_resid_mid"][:, -1]
                      for x in data]).double()
    variances = torch.linalg.eigvalsh(torch.cov(rows.T, correction=0)).flip(0)
    got = a.pca["blocks.0.hook_resid_mid[-1]"].Lambda[1:]
    torch.testing.assert_close(got, variances[:got.numel()], rtol=1e-9, atol=1e-12)
    assert a.pca["blocks.0.hook_resid_mid[-1]"].C.shape[0] == 13  # d_model + 1: one position, not T·d_model


def test_last_position_graph_has_no_untrained_logit_positions():
    """Property: with output[-1] the logit node layer has d_vocab_out units, whatever T is."""
    model, data = bridge(n_layers=1), tokens()
    res = fit_lib(model, data, PAPER, LIBConfig(), progress=False)
    assert res.lib_edges["blocks.0.hook_resid_post[-1]"].shape == (7, res.lib["blocks.0.hook_resid_post[-1]"].C.shape[1])


def test_select_and_insert_round_trip():
    act = torch.arange(2 * 3 * 4.).reshape(2, 3, 4)
    assert split_layer("a.b[ -1 ]") == ("a.b", -1) and split_layer("a.b") == ("a.b", None)
    assert positions_of("x[-1]", act.shape) == [2] and positions_of("x", act.shape) is None
    part = select("x[1]", act)
    assert part.shape == (2, 1, 4) and torch.equal(part[:, 0], act[:, 1])
    assert torch.equal(insert("x[1]", act, torch.zeros(2, 1, 4))[:, 1], torch.zeros(2, 4))
    assert torch.equal(insert("x[1]", act, part), act)


@pytest.mark.parametrize("layers,message", [
    (["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[5]", "output"],
     r"'blocks\.0\.hook_resid_mid\[5\]'.*out of range.*\(5, 5, 12\).*allowed: -5 \.\. 4"),
    (["blocks.0.hook_resid_pre", "output[-6]"], r"'output\[-6\]'.*out of range.*allowed: -5 \.\. 4"),
    (["blocks.0.hook_resid_pre[last]", "output"], r"'blocks\.0\.hook_resid_pre\[last\]'.*'last' is not an integer"),
    (["blocks.0.hook_resid_pre[1.5]", "output"], r"not an integer"),
    (["blocks.0.hook_resid_pre[-1", "output"], r"position index is written SITE\[i\]"),
])
def test_bad_position_indices_are_clear_errors(layers, message):
    model, data = bridge(n_layers=1), tokens()
    with pytest.raises(ValueError, match=message):
        fit_lib(model, data, layers, LIBConfig(), progress=False)


def test_position_index_on_a_layer_without_positions_is_an_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    data = [torch.randn(6, 4, dtype=F64)]
    with pytest.raises(ValueError, match=r"'1\[0\]'.*shape \(6, 5\).*no position axis"):
        fit_lib(model, data, ["input", "1[0]", "output"], LIBConfig(), progress=False)
