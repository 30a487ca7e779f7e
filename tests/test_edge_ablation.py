"""Edge-ablation sparsity (evaluation.metrics.edge_ablation): planted networks whose needed edges
are known analytically, a naive per-output reference for the ablated forward pass, bad input."""

import itertools

import pytest
import torch
from torch import nn

from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.metrics.edge_ablation import (
    EdgeAblationConfig, ablated_logits, basis_set, edge_ablation_sparsity, keep_mask,
)

SIGMA = torch.tensor([1.0, 1.3, 1.6, 1.1, 0.9, 0.7], dtype=torch.float64)


def factorial_inputs(extra=None):
    """x = t·σ ⊙ s, s ∈ {±1}⁶ (all 64 sign patterns), t ∈ {0.5, 1, 2}: mean 0 and a diagonal
    covariance exactly, so the PCA and LIB bases of a diagonal network are its axes."""
    s = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=torch.float64)
    x = torch.cat([t * SIGMA * s for t in (0.5, 1.0, 2.0)])
    return x


def planted_two_sections():
    """x (6) → h = diag(a) x (6) → z = B h (2 logits): z_0 = Σ_{i<3} b_i a_i x_i = Σ_{i<3} c_i s_i t
    (c = (1.5, 1.3, 1.28)), z_1 = 0; labels argmax z, i.e. the sign of z_0.

    Neuron and PCA bases (axis-aligned here: mean 0, diagonal covariances with distinct
    variances): units 3..5 of h are computed (edges x_j → h_j) but read by no logit, with edge
    weights below every relevant one. Keeping the 3 relevant edges of a section reproduces the
    model; dropping the term of any c_i (its input at its mean 0) flips the sign of z_0 wherever
    the other two nearly cancel (a quarter of the examples), dropping all three ties the logits:
    n* = 3 per section. LIB: the output reads one direction, c·x, so every LIB layer but the logits
    has one feature and each section one edge from it, which is needed: n* = 1 per section.
    """
    a = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.25, 0.2], dtype=torch.float64)
    B = torch.zeros(2, 6, dtype=torch.float64)
    B[0, :3] = torch.tensor([1.5, 1.0, 0.8])
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.Linear(6, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(a))
        model[1].weight.copy_(B)
    x = factorial_inputs()
    y = model(x).argmax(-1)
    return model.eval(), x, y


@pytest.mark.parametrize("basis", ["lib", "pca", "neuron"])
def test_planted_network_needs_exactly_its_edges(basis):
    model, x, y = planted_two_sections()
    result = fit_lib(model, [(x, y)], ["input", "0", "output"], LIBConfig(), progress=False)
    out = edge_ablation_sparsity(model, (x, y), result, basis)
    assert out.accuracy == 1.0
    needed = 1 if basis == "lib" else 3
    assert {k: s.n_kept for k, s in out.sections.items()} == {"input": needed, "0": needed}
    assert out.total_kept == 2 * needed
    # one fewer edge breaks the accuracy by far more than the tolerance (the bisection probed it or lower)
    for s in out.sections.values():
        failing = [n for n, acc in s.probes.items() if n < needed]
        assert failing and all(s.probes[n] < 0.9 for n in failing)
    assert out.fraction == pytest.approx(2 * needed / sum((E.shape[0] - 1) * (E.shape[1] - 1)
                                                 for E in basis_set(result, basis)[1].values()))


def planted_offset():
    """z_0 = Σ_{i<3} c_i x_i + 0.2 (x_6 − 5), z_1 = 0 (one section), x_6 = 5 ± 0.01 (its variance
    1e-4); |Σ c_i x_i| ∈ {1.08, 1.48, 1.52, 4.08}·t. In the neuron basis the edge x_6 → z_0 ranks
    4th (E ≈ 1.0 < 2.8): mean ablation may drop it (z_0 moves by 2e-3, less than every
    |z_0| ≥ 0.54), zero ablation may not (z_0 drops by 1, past |z_0| = 0.54, 0.74, 0.76):
    n* = 3 with "mean", 4 with "zero"."""
    s = factorial_inputs()
    x6 = 5.0 + 0.01 * torch.sign(s[:, 3:4]) * torch.sign(s[:, 4:5])
    x = torch.cat([s, x6], dim=1)
    model = nn.Sequential(nn.Linear(7, 2)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, :3] = torch.tensor([1.5, 1.0, 0.8])
        model[0].weight[0, 6] = 0.2
        model[0].bias.copy_(torch.tensor([-1.0, 0.0]))
    return model.eval(), x, model(x).argmax(-1)


def test_mean_and_zero_ablation_differ_in_the_neuron_basis_only():
    model, x, y = planted_offset()
    result = fit_lib(model, [(x, y)], ["input", "output"], LIBConfig(), progress=False)
    neuron = {a: edge_ablation_sparsity(model, (x, y), result, "neuron", EdgeAblationConfig(ablation=a)) for a in ("mean", "zero")}
    assert neuron["mean"].total_kept == 3
    assert neuron["zero"].total_kept == 4
    for basis in ("lib", "pca"):  # centred: every non-constant feature has mean 0, so mean = zero exactly
        runs = [edge_ablation_sparsity(model, (x, y), result, basis, EdgeAblationConfig(ablation=a))
                for a in ("mean", "zero")]
        assert runs[0].total_kept == runs[1].total_kept
        assert runs[0].sections["input"].probes == runs[1].sections["input"].probes


def naive_ablated_logits(mlp, x, keep, b_in, b_hidden, ablation):
    """Section input → tanh(W₁x + b₁) of a tiny MLP, one output feature at a time, with full
    reconstructions a′ = f̂′ C⁺ (square bases), then the last Linear on h′ = (ĥ′ C′⁺)[1:]."""
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    f_hat = torch.cat([ones, x], 1) @ b_in.C
    fill = torch.cat([torch.ones(1, dtype=torch.float64), b_in.mean]) @ b_in.C if ablation == "mean" \
        else torch.zeros(b_in.C.shape[1], dtype=torch.float64)
    h_clean = torch.tanh(x @ mlp[0].weight.T + mlp[0].bias)
    h_hat = torch.cat([ones, h_clean], 1) @ b_hidden.C
    new = h_hat.clone()
    for i in range(1, b_hidden.C.shape[1]):
        kept = torch.cat([torch.tensor([True]), keep[i - 1]])
        f_i = torch.where(kept, f_hat, fill)
        x_i = (f_i @ b_in.C_pinv)[:, 1:]
        h_i = torch.tanh(x_i @ mlp[0].weight.T + mlp[0].bias)
        new[:, i] = (torch.cat([ones, h_i], 1) @ b_hidden.C)[:, i]
    h_new = (new @ b_hidden.C_pinv)[:, 1:]
    return h_new @ mlp[2].weight.T + mlp[2].bias


@pytest.mark.parametrize("basis,ablation", [("lib", "mean"), ("pca", "zero"), ("neuron", "zero"), ("neuron", "mean")])
def test_ablated_forward_matches_a_naive_per_output_reference(basis, ablation):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6)).double().eval()  # 6 logits: LIB keeps 5 hidden features
    x = torch.randn(200, 4, dtype=torch.float64) + 0.5
    y = torch.randint(0, 6, (200,))
    layers = ["input", "1", "output"]
    result = fit_lib(mlp, [(x, y)], layers, LIBConfig(), progress=False)
    bases, edges = basis_set(result, basis)
    assert bases["input"].C.shape == (5, 5) and bases["1"].C.shape == (6, 6)  # square: no truncation
    for n in (0, 3, 7, 19):
        keep = keep_mask(edges["input"], n)
        ours = ablated_logits(mlp, x, "input", "1", bases["input"], bases["1"], keep, ablation)
        ref = naive_ablated_logits(mlp, x, keep, bases["input"], bases["1"], ablation)
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    full = keep_mask(edges["input"], 20)
    torch.testing.assert_close(ablated_logits(mlp, x, "input", "1", bases["input"], bases["1"], full, ablation), mlp(x))


def test_neuron_edges_of_a_fit_without_them_come_from_one_edge_pass():
    model, x, y = planted_two_sections()
    layers = ["input", "0", "output"]
    full = fit_lib(model, [(x, y)], layers, LIBConfig(), progress=False)
    bare = fit_lib(model, [(x, y)], layers, LIBConfig(neuron_edges=False), progress=False)
    with pytest.raises(ValueError, match="no neuron edges"):
        basis_set(bare, "neuron")
    _, edges = basis_set(bare, "neuron", model, [(x, y)])
    for layer in layers[:-1]:
        torch.testing.assert_close(edges[layer], full.edges["neuron"][layer])
    # the neuron basis's edges of this linear network: E_ij = W_ij² E[x_j²] (gradient rule)
    W = model[0].weight.detach()
    torch.testing.assert_close(edges["input"][1:, 1:], W ** 2 * (x ** 2).mean(0))


def test_keep_mask_takes_the_largest_non_constant_edges():
    E = torch.tensor([[9.0, 9.0, 9.0], [9.0, 0.5, 3.0], [9.0, 2.0, 0.1]])
    assert keep_mask(E, 2).tolist() == [[False, True], [True, False]]
    assert keep_mask(E, 0).sum() == 0 and keep_mask(E, 4).all()


def test_bad_input_names_the_value_and_what_is_allowed():
    with pytest.raises(ValueError, match=r"tolerance.*-0\.1"):
        EdgeAblationConfig(tolerance=-0.1)
    with pytest.raises(ValueError, match=r"'max'.*mean, zero"):
        EdgeAblationConfig(ablation="max")
    model, x, y = planted_offset()
    result = fit_lib(model, [(x, y)], ["input", "output"], LIBConfig(), progress=False)
    with pytest.raises(ValueError, match=r"'ica'.*lib, pca, neuron"):
        edge_ablation_sparsity(model, (x, y), result, "ica")
    with pytest.raises(ValueError, match=r"unknown section.*'0'"):
        edge_ablation_sparsity(model, (x, y), result, "lib", sections=["0"])


def tiny_transformer(tmp_path):
    import json

    from evaluation.lib_command import modular_addition_data
    from evaluation.io.checkpoints import load_hooked_transformer_state_dict
    from tests.test_checkpoints import random_ht_state_dict
    from tests.test_eval_cli import CFG, P

    sd = random_ht_state_dict(CFG)
    torch.save(sd, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    model = load_hooked_transformer_state_dict(sd, CFG).eval()
    x, y = modular_addition_data(P)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(x), 10)]
    layers = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid[-1]", "blocks.0.hook_resid_post[-1]", "output[-1]"]
    return model, x, batches, layers, fit_lib(model, batches, layers, LIBConfig(), progress=False)


def test_transformer_sections_keeping_every_edge_are_the_model(tmp_path):
    """A tiny TransformerLens model (position-indexed layers, resid_mid edited through the
    attention output, truncated LIB bases): keeping every edge reproduces the logits."""
    model, x, batches, layers, result = tiny_transformer(tmp_path)
    with torch.no_grad():
        for basis in ("lib", "pca", "neuron"):
            bases, edges = basis_set(result, basis)
            for l_in, l_out in zip(layers[:-1], layers[1:]):
                keep = torch.ones(edges[l_in].shape[0] - 1, edges[l_in].shape[1] - 1, dtype=torch.bool)
                torch.testing.assert_close(ablated_logits(model, x, l_in, l_out, bases[l_in], bases[l_out], keep,
                                                          "zero"), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lib_command_writes_the_python_calls_figures(tmp_path, capsys):
    """``interp-eval lib --edge-ablation`` writes the Python call's figures into lib.json; a bad
    tolerance is exit code 2 with nothing written."""
    import json

    from evaluation.cli import main
    from tests.test_eval_cli import P

    model, x, batches, layers, result = tiny_transformer(tmp_path)
    rc = main(["lib", str(tmp_path / "model.pt"), "--config", str(tmp_path / "config.json"), "--data",
               f"modular-addition:p={P}", "--batch-size", "10", "--no-ablation", "--edge-ablation",
               "--edge-ablation-tolerance", "0", "--out", str(tmp_path / "report"), "--quiet"])
    assert rc == 0
    written = json.loads((tmp_path / "report" / "lib.json").read_text())["metadata"]["edge_ablation"]
    for basis in ("lib", "pca", "neuron"):
        direct = edge_ablation_sparsity(model, batches, result, basis, EdgeAblationConfig(tolerance=0.0))
        assert written[basis]["total_kept"] == direct.total_kept
        assert [s["n_kept"] for s in written[basis]["sections"].values()] == [s.n_kept for s in direct.sections.values()]
    rc = main(["lib", str(tmp_path / "model.pt"), "--config", str(tmp_path / "config.json"), "--data",
               f"modular-addition:p={P}", "--edge-ablation", "--edge-ablation-tolerance", "-1",
               "--out", str(tmp_path / "bad")])
    assert rc == 2 and "tolerance must be a number in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def naive_section_ablated_logits(model, x, l_in, l_out, b_in, b_out, keep, ablation):
    """The module docstring's formula one output feature at a time, each with its own forward pass of
    the unstacked batch (no grouping of equal rows, no repeated batch)."""
    from evaluation.lib.positions import insert, select, site_of
    from interp_train.sites import run_model

    def aug(t):
        return torch.cat([torch.ones(*t.shape[:-1], 1, dtype=t.dtype), t], -1)

    s_in, s_out = site_of(l_in), site_of(l_out)
    clean = run_model(model, x, record=[s for s in (s_in, s_out) if s != "output"])
    f = select(l_in, clean.activations[s_in]).double()
    h = select(l_out, clean.output if s_out == "output" else clean.activations[s_out]).double()
    f_hat, h_hat = aug(f) @ b_in.C, aug(h) @ b_out.C
    fill = aug(b_in.mean.double()) @ b_in.C if ablation == "mean" else torch.zeros(b_in.C.shape[1], dtype=torch.float64)
    new = h_hat.clone()
    for i in range(1, b_out.C.shape[1]):
        x_i = f + ((fill - f_hat)[..., 1:] * ~keep[i - 1]) @ b_in.C_pinv[1:, 1:]
        edit = {s_in: lambda a, v=x_i: insert(l_in, a, v.to(a.dtype))}
        run = run_model(model, x, record=[] if s_out == "output" else [s_out], edit=edit)
        h_i = select(l_out, run.output if s_out == "output" else run.activations[s_out]).double()
        new[..., i] = (aug(h_i) @ b_out.C)[..., i]
    h_new = h + (new - h_hat)[..., 1:] @ b_out.C_pinv[1:, 1:]
    if s_out == "output":
        return insert(l_out, clean.output, h_new.to(clean.output.dtype))
    return run_model(model, x, edit={s_out: lambda a: insert(l_out, a, h_new.to(a.dtype))}).output


def test_transformer_sections_with_partial_masks_match_a_naive_per_output_reference(tmp_path):
    """Every section of a tiny TransformerLens model (resid_mid edited through the attention output,
    position-indexed layers), half its edges kept: the grouped passes, which repeat the batch only
    from the section's input layer on, give the per-output reference's logits."""
    from evaluation.metrics.edge_ablation import repeat_site

    model, x, batches, layers, result = tiny_transformer(tmp_path)
    x = x[:40]
    with torch.no_grad():
        for basis, ablation in (("lib", "zero"), ("neuron", "mean")):
            bases, edges = basis_set(result, basis)
            for l_in, l_out in zip(layers[:-1], layers[1:]):
                E = edges[l_in]
                keep = keep_mask(E, (E.shape[0] - 1) * (E.shape[1] - 1) // 2)
                ref = naive_section_ablated_logits(model, x, l_in, l_out, bases[l_in], bases[l_out], keep, ablation)
                # the first call checks the repeat against the stacked batch, the second uses it
                for stacked in (False, False, True):
                    ours = ablated_logits(model, x, l_in, l_out, bases[l_in], bases[l_out], keep, ablation,
                                          stacked=stacked)
                    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
                site = "blocks.0.hook_resid_pre" if l_in.startswith("blocks.0.hook_resid_mid") else l_in.split("[")[0]
                assert repeat_site(model, l_in, l_out) == site
