"""LayerNorm transformers (GPT-2 style) in closed form, against the naive jacrev reference, and Hugging Face loading."""

import pytest
import torch

from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.lib.naive import naive_fit_lib
from evaluation.lib.sections import check_edges, check_section, find_section
from evaluation.lib.edges import integration_rule
from tests.test_lib import assert_same_fit
from tests.test_structured import bridge, resid_layers, tokens

F64 = torch.float64
LN_KINDS = ["layernorm attention", "layernorm mlp", "layernorm attention", "layernorm mlp", "layernorm unembed"]


def ln_bridge(n_layers=2):
    """A native GPT-2-style bridge (LayerNorm, GELU) with random LayerNorm gains/biases and biases,
    so that γ ≠ 1 and β ≠ 0 are exercised (the default initialisation has γ = 1, β = 0)."""
    model = bridge(n_layers=n_layers, normalization_type="LN")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in name or name.startswith("ln"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=F64))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64))
    return model


@pytest.mark.parametrize("integration,n", [("gradient", 1), ("gauss-legendre", 2)])
def test_layernorm_transformer_in_closed_form_matches_jacrev(integration, n):
    model, data, layers = ln_bridge(), tokens(), resid_layers(2)
    cfg = LIBConfig(integration=integration, n_intervals=n, jacobians="structured")
    res = fit_lib(model, data, layers, cfg, progress=False)
    assert [m.split(": ")[-1] for m in res.methods.values()] == LN_KINDS
    assert_same_fit(res, naive_fit_lib(model, data, layers, cfg))


def test_layernorm_closed_forms_need_their_rank_one_terms():
    """The check against autograd fails when the LayerNorm's x̂x̂ᵀ/d term is dropped (so it can fail)."""
    model, layers = ln_bridge(), resid_layers(2)
    inputs = tokens()[0]
    rule = integration_rule("gauss-legendre", 2)
    for l_in, l_out in zip(layers[:-1], layers[1:]):
        section, _ = find_section(model, l_in, l_out)
        d_out = 6 if l_out == "output" else 12
        C_out = torch.randn(d_out + 1, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
        C_in = torch.randn(13, 7, dtype=F64, generator=torch.Generator().manual_seed(1))
        bases = [(C_in, torch.linalg.pinv(C_in), C_out)]
        assert check_section(section, model, inputs, l_in, l_out, C_out, 2 ** 20) is None
        assert check_edges(section, model, inputs, l_in, l_out, rule, bases, 2 ** 20) is None
        parts = section.ln.parts
        section.ln.parts = lambda x, alpha=1.0, parts=parts: (lambda r: (r[0], r[1], 0 * r[2]))(parts(x, alpha))
        assert "Jacobian Gram differs" in check_section(section, model, inputs, l_in, l_out, C_out, 2 ** 20)
        assert "edges differ" in check_edges(section, model, inputs, l_in, l_out, rule, bases, 2 ** 20)


def test_layernorm_closed_form_equals_autograd_with_float32_edges():
    model, data, layers = ln_bridge(n_layers=1), tokens(), resid_layers(1)
    auto = fit_lib(model, data, layers, LIBConfig(), progress=False)
    grad = fit_lib(model, data, layers, LIBConfig(jacobians="autograd"), progress=False)
    assert [m.split(": ")[-1] for m in auto.methods.values()] == ["layernorm attention", "layernorm mlp",
                                                                  "layernorm unembed"]
    assert_same_fit(auto, grad)
    f32 = fit_lib(model, data, layers, LIBConfig(jacobian_dtype="float32"), progress=False)
    for name in layers[:-1]:
        torch.testing.assert_close(f32.lib_edges[name], auto.lib_edges[name], rtol=1e-4,
                                   atol=1e-6 * auto.lib_edges[name].max())


def tiny_gpt2_dir(tmp_path, seed=0):
    """A random 2-layer GPT-2 saved by transformers' save_pretrained (no tokenizer files)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=4, n_positions=8, vocab_size=11, n_inner=24,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorm gains and biases away from their (1, 0) initialisation
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path / "tiny-gpt2"
    hf.save_pretrained(path)
    return path, hf


def test_hugging_face_directory_loads_through_the_bridge_with_the_models_logits(tmp_path):
    from evaluation.io.checkpoints import load_checkpoint

    path, hf = tiny_gpt2_dir(tmp_path)
    loaded = load_checkpoint(path)
    assert loaded.kind == "hugging-face" and type(loaded.model).__name__ == "TransformerBridge"
    toks = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(toks), hf(toks).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="directory without a Hugging Face config.json"):
        load_checkpoint(tmp_path)


def test_lib_on_a_hugging_face_gpt2_uses_the_layernorm_closed_forms(tmp_path):
    from evaluation.io.checkpoints import load_checkpoint

    path, _ = tiny_gpt2_dir(tmp_path)
    model = load_checkpoint(path).model.double()
    toks = torch.randint(0, 11, (8, 6), generator=torch.Generator().manual_seed(3))
    data, layers = [toks[:4], toks[4:]], resid_layers(2)
    res = fit_lib(model, data, layers, LIBConfig(jacobians="structured"), progress=False)
    assert [m.split(": ")[-1] for m in res.methods.values()] == LN_KINDS
    assert_same_fit(res, fit_lib(model, data, layers, LIBConfig(jacobians="autograd"), progress=False))


def test_hugging_face_directory_from_the_cli(tmp_path):
    from evaluation.cli import main

    path, _ = tiny_gpt2_dir(tmp_path)
    toks = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(4))
    data = tmp_path / "tokens.pt"
    torch.save({"inputs": toks}, data)
    out = tmp_path / "out"
    assert main(["lib", str(path), "--data", str(data), "--out", str(out), "--quiet", "--no-ablation"]) == 0
    import json
    methods = json.loads((out / "lib.json").read_text())["methods"]
    assert [m.split(": ")[-1] for m in methods.values()] == LN_KINDS


LN_PAPER = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]", "output[-1]"]


@pytest.mark.parametrize("integration,n", [("gradient", 1), ("gauss-legendre", 2)])
def test_layernorm_paper_layout_in_closed_form_matches_naive(integration, n):
    """resid_pre at every position, then the last position only, through LayerNorm sections."""
    model, data = ln_bridge(n_layers=1), tokens()
    cfg = LIBConfig(integration=integration, n_intervals=n, jacobians="structured")
    res = fit_lib(model, data, LN_PAPER, cfg, progress=False)
    assert [m.split(": ")[-1] for m in res.methods.values()] == ["layernorm attention", "layernorm mlp",
                                                                 "layernorm unembed"]
    naive = naive_fit_lib(model, data, LN_PAPER, cfg)
    assert_same_fit(res, naive)
    assert_same_fit(fit_lib(model, data, LN_PAPER, LIBConfig(integration=integration, n_intervals=n,
                                                              jacobians="autograd"), progress=False), naive)


@pytest.mark.parametrize("layers,closed", [
    # an earlier output position (attention rows t < T − 1 only); the second attention reads one
    # indexed input position (2) into another output position (the last)
    (["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[2]", "blocks.0.hook_resid_post[2]",
      "blocks.1.hook_resid_mid[-1]", "blocks.1.hook_resid_post[-1]", "output[-1]"],
     [True, True, True, True, True]),
    # the first position: the attention's output there reads position 0 only
    (["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[0]", "blocks.0.hook_resid_post[0]", "output[0]"],
     [True, True, True]),
    # every position out of one: the MLP passes it to its own position only
    (["blocks.0.hook_resid_mid[0]", "blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
      "output[-2]"], [True, True, True, True]),
])
def test_layernorm_mixed_positions_match_naive_in_closed_form_and_by_autograd(layers, closed):
    model, data = ln_bridge(n_layers=2 if len(layers) > 4 else 1), tokens()
    res = fit_lib(model, data, layers, LIBConfig(), progress=False)
    assert [m.startswith("closed form") for m in res.methods.values()] == closed
    naive = naive_fit_lib(model, data, layers, LIBConfig())
    assert_same_fit(res, naive)
    assert_same_fit(fit_lib(model, data, layers, LIBConfig(jacobians="autograd"), progress=False), naive)


@pytest.mark.parametrize("layers", [
    ["blocks.0.hook_resid_pre[1]", "blocks.0.hook_resid_mid"],        # one input position into every output position
    ["blocks.0.hook_resid_pre[-1]", "blocks.0.hook_resid_mid[-1]"],   # the same position in and out
    ["blocks.0.hook_resid_pre[0]", "blocks.0.hook_resid_mid[3]"],     # an earlier input position into a later output
])
@pytest.mark.parametrize("integration,n", [("gradient", 1), ("gauss-legendre", 2)])
def test_layernorm_attention_from_an_indexed_input_position_matches_naive(layers, integration, n):
    """The input position masks ρ_s (Gram) and f̂_s (edges); the rule's points scale that position only."""
    model, data = ln_bridge(n_layers=1), tokens()
    cfg = LIBConfig(integration=integration, n_intervals=n, jacobians="structured")
    res = fit_lib(model, data, layers, cfg, progress=False)
    assert list(res.methods.values()) == ["closed form: layernorm attention"]
    assert_same_fit(res, naive_fit_lib(model, data, layers, cfg))


def test_layernorm_attention_at_one_output_position_is_that_row_of_the_full_closed_form():
    """Property: the Gram at t₀ summed over every t₀ is the Gram over all positions."""
    model, layers = ln_bridge(n_layers=1), ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"]
    section, _ = find_section(model, *layers)
    x = torch.randn(3, 6, 12, dtype=F64, generator=torch.Generator().manual_seed(7))
    W = torch.randn(12, 5, dtype=F64, generator=torch.Generator().manual_seed(8))
    per_t = sum(section.gram(x, W, outputs_at=[t]) for t in range(6))
    torch.testing.assert_close(per_t, section.gram(x, W), rtol=1e-10, atol=1e-10 * section.gram(x, W).abs().max())
    torch.testing.assert_close(section.forward(x, outputs_at=[4]), section.forward(x)[:, [4]])


@pytest.mark.parametrize("jacobian_first", [True, False])
def test_layernorm_closed_form_in_blocks_of_one_position_and_either_mlp_layout_matches_jacrev(monkeypatch, jacobian_first):
    """The attention's edges and Gram summed one output position at a time (blocks of one, so every
    block boundary and causal cut is exercised), and the MLP's edges through each row's whole Jacobian
    or per basis, equal the naive jacrev fit (two-point rule: the points' sums are exercised too)."""
    from evaluation.lib.sections import layernorm_attention, layernorm_attention_edges, layernorm_position_wise
    monkeypatch.setattr(layernorm_attention_edges, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(layernorm_attention, "GRAM_BLOCK", 1)
    monkeypatch.setattr(layernorm_position_wise, "_jacobian_first", lambda *args: jacobian_first)
    model, data, layers = ln_bridge(n_layers=1), tokens(), resid_layers(1)
    cfg = LIBConfig(integration="gauss-legendre", n_intervals=2, jacobians="structured")
    res = fit_lib(model, data, layers, cfg, progress=False)
    assert [m.split(": ")[-1] for m in res.methods.values()] == ["layernorm attention", "layernorm mlp",
                                                                 "layernorm unembed"]
    assert_same_fit(res, naive_fit_lib(model, data, layers, cfg))


def test_rotated_squares_with_selecting_bases_equal_the_dense_products():
    """A basis side that only selects units (a permutation with a dropped unit, a zero column) is
    gathered instead of multiplied: ∑_r (Wᵀ J_r C̃ᵀ diag(f_r))² must equal the dense products."""
    from evaluation.lib.sections.layernorm_position_wise import _rotated_squares, _selection
    g = torch.Generator().manual_seed(3)
    d_out, d_in, n = 5, 4, 3
    J = torch.randn(d_out, n, d_in, dtype=F64, generator=g)                  # rows laid out (d_out, rows, d_in)
    W_sel = torch.zeros(d_out, 4, dtype=F64)
    W_sel[[3, 0, 4], [0, 1, 3]] = 1.0                                        # column 2 selects nothing
    C_sel = torch.zeros(6, d_in, dtype=F64)
    C_sel[[1, 2, 3, 5], [2, 0, 3, 1]] = 1.0                                  # rows 0 and 4 select nothing
    W_any, C_any = torch.randn(d_out, 4, dtype=F64, generator=g), torch.randn(6, d_in, dtype=F64, generator=g)
    f = torch.randn(n, 6, dtype=F64, generator=g)
    assert _selection(W_any) is None and _selection(W_sel).tolist() == [3, 0, -1, 4]
    for W in (W_sel, W_any):
        for C in (C_sel, C_any):
            want = sum((W.T @ J[:, r] @ C.T * f[r]).square() for r in range(n))
            got = _rotated_squares(J, _selection(W), _selection(C.T), W.T, C.T, f)
            torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
