"""Closed-form section Jacobians (evaluation.lib.sections) against the naive jacrev reference and autograd."""

import pytest
import torch
from torch import nn

from evaluation.lib.fit import ClosedFormFallbackWarning, LIBConfig, fit_lib
from evaluation.lib.naive import naive_fit_lib
from evaluation.lib.sections import find_section
from interp_train.sites import run_model
from tests.test_lib import assert_same_fit

F64 = torch.float64


def bridge(n_layers=2, act_fn="gelu", normalization_type=None, n_ctx=6):
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    cfg = TransformerBridgeConfig(d_model=12, d_head=4, n_layers=n_layers, n_ctx=n_ctx, n_heads=3, d_vocab=9,
                                  d_vocab_out=6, d_mlp=20, act_fn=act_fn, normalization_type=normalization_type, seed=1)
    return TransformerBridge.boot_native(cfg).double()


def tokens(n=10, T=5, batch=5):
    toks = torch.randint(0, 9, (n, T), generator=torch.Generator().manual_seed(4))
    return [toks[i:i + batch] for i in range(0, n, batch)]


def resid_layers(n_layers):
    layers = ["blocks.0.hook_resid_pre"]
    for l in range(n_layers):
        layers += [f"blocks.{l}.hook_resid_mid", f"blocks.{l}.hook_resid_post"]
    return layers + ["output"]


@pytest.mark.parametrize("integration,n", [("gradient", 1), ("gauss-legendre", 2)])
def test_two_layer_transformer_in_closed_form_matches_jacrev(integration, n):
    model, data = bridge(), tokens()
    cfg = LIBConfig(integration=integration, n_intervals=n, jacobians="structured")
    with_pre = resid_layers(2)
    with_pre.insert(3, "blocks.1.hook_resid_pre")
    for layers, kinds in ((resid_layers(2), ["attention", "mlp", "attention", "mlp", "unembed"]),
                          (with_pre, ["attention", "mlp", "identity", "attention", "mlp", "unembed"])):
        res = fit_lib(model, data, layers, cfg, progress=False)
        assert [m.split(": ")[-1] for m in res.methods.values()] == kinds
        assert_same_fit(res, naive_fit_lib(model, data, layers, cfg))


def test_closed_form_equals_autograd_path_with_relu_and_float32_edges():
    model, data, layers = bridge(n_layers=1, act_fn="relu"), tokens(), resid_layers(1)
    auto = fit_lib(model, data, layers, LIBConfig(), progress=False)
    grad = fit_lib(model, data, layers, LIBConfig(jacobians="autograd"), progress=False)
    assert all(m.startswith("closed form") for m in auto.methods.values())
    assert all(m.startswith("autograd") for m in grad.methods.values())
    assert_same_fit(auto, grad)
    f32 = fit_lib(model, data, layers, LIBConfig(jacobian_dtype="float32"), progress=False)
    for name in layers[:-1]:
        torch.testing.assert_close(f32.lib_edges[name], auto.lib_edges[name], rtol=1e-4,
                                   atol=1e-6 * auto.lib_edges[name].max())


@pytest.mark.parametrize("modules,layers", [
    ([nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)], ["0", "1", "output"]),           # [act], [Linear]
    ([nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)], ["input", "1", "output"]),
    ([nn.Tanh(), nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, 3)], ["input", "0", "3"]),  # [act], [Linear, act, Linear]
])
def test_sequential_sections_in_closed_form_match_jacrev(modules, layers):
    torch.manual_seed(0)
    model = nn.Sequential(*modules).double()
    x = torch.randn(12, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    data = [x[:6], x[6:]]
    for cfg in (LIBConfig(jacobians="structured"), LIBConfig(jacobians="structured", integration="trapezoid", n_intervals=3)):
        res = fit_lib(model, data, layers, cfg, progress=False)
        assert all(m.startswith("closed form") for m in res.methods.values())
        assert_same_fit(res, naive_fit_lib(model, data, layers, cfg))


def test_repeated_rows_are_counted_once_but_weighted():
    """Position-wise sections count each distinct row once, weighted by how often it occurs."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    data = [x[[0, 0, 1, 2, 2, 2, 3, 4]]]
    res = fit_lib(model, data, ["input", "1", "output"], LIBConfig(jacobians="structured"), progress=False)
    assert_same_fit(res, naive_fit_lib(model, data, ["input", "1", "output"], LIBConfig()))


@pytest.mark.parametrize("break_it,message", [
    (lambda section: setattr(section, "c", 1.5 * section.c), "closed-form output differs from the model's"),
    (lambda section: setattr(section, "gram", lambda x, W, g=section.gram: 1.001 * g(x, W)),
     "closed-form Jacobian Gram differs from autograd"),
])
def test_a_section_failing_its_check_falls_back_to_autograd(monkeypatch, break_it, message):
    """A wrong closed form (a mis-read attention scale, a wrong Gram) is caught on the first batch."""
    import evaluation.lib.sections as lib
    model, data, layers = bridge(n_layers=1), tokens(), resid_layers(1)

    def wrong(model, l_in, l_out):
        section, why = find_section(model, l_in, l_out)
        if why == "attention":
            break_it(section)
        return section, why

    monkeypatch.setattr(lib, "find_section", wrong)
    with pytest.warns(ClosedFormFallbackWarning, match=r"blocks\.0\.hook_resid_pre -> blocks\.0\.hook_resid_mid: " + message):
        res = fit_lib(model, data, layers, LIBConfig(), progress=False)
    assert res.methods[layers[0]].startswith("autograd (" + message)
    assert res.methods[layers[1]] == "closed form: mlp"
    assert_same_fit(res, fit_lib(model, data, layers, LIBConfig(jacobians="autograd"), progress=False))
    with pytest.raises(ValueError, match="failed its check against autograd"):
        fit_lib(model, data, layers, LIBConfig(jacobians="structured"), progress=False)


def test_unrecognised_sections_use_autograd_or_fail_when_structured_is_required():
    model, data, layers = bridge(n_layers=1, normalization_type="RMS"), tokens(), resid_layers(1)  # RMSNorm: no closed form
    res = fit_lib(model, data, layers, LIBConfig(), progress=False)
    assert res.methods[layers[0]] == "autograd (attention behind a LayerNorm)"
    assert res.methods[layers[2]] == "autograd (unembedding behind a LayerNorm)"
    with pytest.raises(ValueError, match=r"no closed-form Jacobian for the section blocks\.0\.hook_resid_pre -> "
                                         r"blocks\.0\.hook_resid_mid \(attention behind a LayerNorm\)"):
        fit_lib(model, data, layers, LIBConfig(jacobians="structured"), progress=False)
    with pytest.raises(ValueError, match=r"unknown jacobians 'fast'; use one of \('auto', 'structured', 'autograd'\)"):
        LIBConfig(jacobians="fast")


def test_editing_resid_mid_edits_the_residual_stream():
    """TransformerLens's bridge aliases hook_resid_mid to the MLP input; run_model edits the residual itself."""
    model = bridge(n_layers=1, act_fn="relu")
    toks = tokens()[0]
    mid, post = "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"
    clean = run_model(model, toks, record=[mid, post]).activations
    shift = torch.randn(12, dtype=F64)
    edited = run_model(model, toks, record=[mid, post], edit={mid: lambda a: a + shift}).activations
    torch.testing.assert_close(edited[mid], clean[mid] + shift, rtol=0, atol=1e-14)
    block = model.blocks[0].mlp
    expected = edited[mid] + torch.relu(edited[mid] @ block.W_in + block.b_in) @ block.W_out + block.b_out
    torch.testing.assert_close(edited[post], expected, rtol=1e-12, atol=1e-12)


def test_attention_edges_take_inputs_that_require_grad():
    """The edges are sums of squares built in place (no autograd graph): inputs that require grad give
    the same numbers as detached ones instead of failing."""
    from evaluation.lib.sections.attention import AttentionSection

    g = torch.Generator().manual_seed(0)
    H, d, d_h, T, B = 2, 6, 3, 4, 5
    W_Q, W_K, W_V = (torch.randn(H, d, d_h, generator=g, dtype=F64) for _ in range(3))
    b_Q, b_K, b_V = (torch.randn(H, d_h, generator=g, dtype=F64) for _ in range(3))
    section = AttentionSection(W_Q, b_Q, W_K, b_K, W_V, b_V, torch.randn(H, d_h, d, generator=g, dtype=F64),
                               torch.zeros(d, dtype=F64), scale=d_h ** 0.5)
    x = torch.randn(B, T, d, generator=g, dtype=F64)
    C_t, W = torch.randn(4, d, generator=g, dtype=F64), torch.randn(d, 3, generator=g, dtype=F64)
    f = torch.randn(B, T, 4, generator=g, dtype=F64)
    want = section.edges(x, ([1.0], [1.0]), [(f, C_t, W)], 2 ** 22)
    got = section.edges(x.requires_grad_(True), ([1.0], [1.0]), [(f.requires_grad_(True), C_t, W)], 2 ** 22)
    assert torch.equal(got[0], want[0])
