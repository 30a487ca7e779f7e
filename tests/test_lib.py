"""LIB bases: docs/DESIGN.md §4.8 properties, agreement with the naive dense reference, bad input."""

import pytest
import torch
from torch import nn

from evaluation.lib.fit import LIBConfig, fit_lib
from evaluation.lib.naive import naive_fit_lib
from interp_train.sites import run_model

F64 = torch.float64
MLP_LAYERS = ["0", "1", "output"]
TF_LAYERS = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "output"]


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def mlp_data(n=24, batch=8):
    x = torch.randn(n, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    return [x[i:i + batch] for i in range(0, n, batch)]


def transformer():
    from transformer_lens import TransformerBridge, TransformerBridgeConfig
    cfg = TransformerBridgeConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, n_heads=2, d_vocab=7, d_vocab_out=5,
                                  d_mlp=16, act_fn="relu", normalization_type=None, seed=0)
    return TransformerBridge.boot_native(cfg).double()


def token_data(n=24, batch=8):
    toks = torch.randint(0, 7, (n, 3), generator=torch.Generator().manual_seed(3))
    return [(toks[i:i + batch], torch.zeros(batch)) for i in range(0, n, batch)]


def activations(model, data, name):
    x = torch.cat([b[0] if isinstance(b, tuple) else b for b in data])
    with torch.no_grad():
        res = run_model(model, x, record=[] if name == "output" else [name])
    act = res.output if name == "output" else res.activations[name]
    return act.reshape(-1, act.shape[-1]).to(F64)


def raw_gram(rows):
    """G_raw = E[aᵀa] for a = [1, f], computed directly."""
    a = torch.cat([torch.ones(rows.shape[0], 1, dtype=F64), rows], 1)
    return a.T @ a / rows.shape[0]


def align_signs(C, ref):
    """Flip columns of C to match ref (eigenvectors are defined up to sign)."""
    return C * torch.sign((C * ref).sum(0, keepdim=True))


@pytest.fixture(scope="module")
def mlp_fit():
    model, data = mlp(), mlp_data()
    return model, data, fit_lib(model, data, MLP_LAYERS, progress=False)


def test_pinv_inverts_C_in_both_bases(mlp_fit):
    _, _, res = mlp_fit
    for bases in (res.lib, res.pca):
        for b in bases.values():
            k = b.C.shape[1]
            torch.testing.assert_close(b.C_pinv @ b.C, torch.eye(k, dtype=F64), atol=1e-11, rtol=0)


def test_lib_features_uncorrelated_with_second_moment_lambda(mlp_fit):
    model, data, res = mlp_fit
    for name in MLP_LAYERS[:-1]:
        b = res.lib[name]
        G = raw_gram(activations(model, data, name))
        torch.testing.assert_close(b.C.T @ G @ b.C, torch.diag(b.Lambda), atol=1e-12, rtol=1e-10)
        assert (b.Lambda[1:].diff() <= 1e-15).all(), "non-constant features sorted by Lambda, descending"


def test_pca_basis_is_centred_and_unwhitened(mlp_fit):
    model, data, res = mlp_fit
    rows = activations(model, data, "0")
    b = res.pca["0"]
    f_hat = b.transform(rows)
    variances = torch.linalg.eigvalsh((rows - rows.mean(0)).T @ (rows - rows.mean(0)) / rows.shape[0]).flip(0)
    torch.testing.assert_close(b.Lambda[1:], variances[: b.C.shape[1] - 1], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(f_hat.T @ f_hat / rows.shape[0], torch.diag(b.Lambda), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(b.C[1:, 1:].T @ b.C[1:, 1:], torch.eye(b.C.shape[1] - 1, dtype=F64))


def test_constant_feature_is_constant_and_others_have_mean_zero(mlp_fit):
    model, data, res = mlp_fit
    for bases in (res.lib, res.pca):
        for name in MLP_LAYERS[:-1]:
            f_hat = bases[name].transform(activations(model, data, name))
            assert f_hat[:, 0].std() < 1e-12
            torch.testing.assert_close(f_hat[:, 0].mean() ** 2, bases[name].Lambda[0], atol=1e-14, rtol=1e-10)
            assert f_hat[:, 1:].mean(0).abs().max() < 1e-12


def explicit_mlp_sections(model):
    """The sections of mlp() written out from its weights (no hooks, no run_model)."""
    W2, b2 = model[2].weight.detach(), model[2].bias.detach()
    return {"0": torch.tanh, "1": lambda f: f @ W2.T + b2}


def jacobian_gram_in_lib_coordinates(model, data, res, name):
    """K = E_x[(∂ĥ/∂f̂)ᵀ (∂ĥ/∂f̂)] over the non-constant features, ĥ = next layer's LIB features,
    from dense jacrev Jacobians of the explicit section: ∂ĥ/∂f̂ = C_outᵀ J C⁺ᵀ."""
    nxt = MLP_LAYERS[MLP_LAYERS.index(name) + 1]
    section, rows = explicit_mlp_sections(model)[name], activations(model, data, name)
    C_out, C_pinv = res.lib[nxt].C[1:, 1:], res.lib[name].C_pinv[:, 1:]
    K, along_mean = 0.0, 0.0
    for f in rows:
        J = C_out.T @ torch.func.jacrev(section)(f)
        K = K + (J @ C_pinv.T).T @ (J @ C_pinv.T)
        along_mean = along_mean + (J @ rows.mean(0)).pow(2).sum()
    return K / rows.shape[0], along_mean / rows.shape[0]


def test_jacobian_gram_is_the_identity_in_lib_coordinates(mlp_fit):
    """LIB diagonalises the activations' second moment (Λ, test above) and the Jacobian Gram at once
    (M = R⁺ M′ R⁺ᵀ = V Λ Vᵀ, so C⁺ M′ C⁺ᵀ = I over the non-constant features): a wrong M′, e.g. its
    diagonal, gives another basis. Λ_0 is the derivative along the mean, E|Ĵ μ|²."""
    model, data, res = mlp_fit
    for name in MLP_LAYERS[:-1]:
        K, along_mean = jacobian_gram_in_lib_coordinates(model, data, res, name)
        k = res.lib[name].C.shape[1]
        torch.testing.assert_close(K[1:, 1:], torch.eye(k - 1, dtype=F64), atol=1e-10, rtol=0)
        torch.testing.assert_close(res.lib[name].Lambda[0], along_mean, atol=1e-14, rtol=1e-10)


def test_uncentred_fit_uses_the_second_moment_and_an_unscaled_constant():
    """center=False: PCA diagonalises E[f fᵀ]; the constant direction carries no mean, so Λ_0 = M_00 = 0,
    which is under the truncation: the constant column stays e_0 (f̂_0 = 1) and C⁺ stays finite."""
    model, data = mlp(), mlp_data()
    cfg = LIBConfig(center=False)
    res = fit_lib(model, data, MLP_LAYERS, cfg, progress=False)
    e0 = torch.zeros(8, dtype=F64)
    e0[0] = 1.0
    for name in MLP_LAYERS[:-1]:
        rows = activations(model, data, name)
        second = rows.T @ rows / rows.shape[0]
        pca, lib = res.pca[name], res.lib[name]
        k = pca.C.shape[1]  # layer "0" has rank 6 (5 inputs and the bias) over the data: one direction dropped
        assert k == (7 if name == "0" else 8)
        torch.testing.assert_close(pca.Lambda[1:], torch.linalg.eigvalsh(second).flip(0)[:k - 1], atol=1e-12,
                                   rtol=1e-10)
        torch.testing.assert_close(pca.C[1:, 1:].T @ second @ pca.C[1:, 1:], torch.diag(pca.Lambda[1:]),
                                   atol=1e-12, rtol=1e-10)
        assert torch.equal(pca.C[:, 0], e0) and torch.equal(pca.C[0, 1:], torch.zeros(k - 1, dtype=F64))
        assert lib.Lambda[0] == 0 and torch.equal(lib.C[:, 0], e0)
        f_hat = lib.transform(rows)
        assert torch.equal(f_hat[:, 0], torch.ones(rows.shape[0], dtype=F64))
        torch.testing.assert_close(f_hat[:, 1:].T @ f_hat[:, 1:] / rows.shape[0], torch.diag(lib.Lambda[1:]),
                                   atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lib.C_pinv @ lib.C, torch.eye(lib.C.shape[1], dtype=F64), atol=1e-11, rtol=0)
        K, _ = jacobian_gram_in_lib_coordinates(model, data, res, name)
        torch.testing.assert_close(K[1:, 1:], torch.eye(lib.C.shape[1] - 1, dtype=F64), atol=1e-10, rtol=0)
    assert_same_fit(res, naive_fit_lib(model, data, MLP_LAYERS, cfg))


def test_no_derivative_along_the_mean_leaves_the_constant_column_unscaled():
    """Centred fit of a section whose weights annihilate the data mean μ: Λ_0 = E|W μ|² = 0 ≤ truncation,
    so C[:, 0] = e_0 (f̂_0 = 1, not sqrt(Λ_0) = 0) and C⁺ stays finite."""
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]]))
    x = torch.randn(30, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    x = x - x.mean(0) + torch.tensor([1.5, 1.5, 0.0], dtype=F64)  # mean exactly along the null space
    data, layers = [x[:15], x[15:]], ["input", "output"]
    res = fit_lib(model, data, layers, progress=False)
    lib = res.lib["input"]
    assert abs(lib.Lambda[0]) < 1e-24 < lib.Lambda[-1] * 1e-12
    assert torch.equal(lib.C[:, 0], torch.tensor([1.0, 0, 0, 0], dtype=F64))
    torch.testing.assert_close(lib.transform(x)[:, 0], torch.ones(30, dtype=F64), atol=0, rtol=0)
    torch.testing.assert_close(lib.C_pinv @ lib.C, torch.eye(lib.C.shape[1], dtype=F64), atol=1e-12, rtol=0)
    assert_same_fit(res, naive_fit_lib(model, data, layers, LIBConfig()))


def test_streamed_batches_equal_one_batch(mlp_fit):
    model, data, res = mlp_fit
    one = fit_lib(model, [torch.cat(data)], MLP_LAYERS, progress=False)
    for name in MLP_LAYERS:
        torch.testing.assert_close(one.lib[name].Lambda, res.lib[name].Lambda, atol=1e-13, rtol=1e-10)
        torch.testing.assert_close(align_signs(one.lib[name].C, res.lib[name].C), res.lib[name].C,
                                   atol=1e-11, rtol=1e-9)
    for name in MLP_LAYERS[:-1]:
        torch.testing.assert_close(one.lib_edges[name], res.lib_edges[name], atol=1e-13, rtol=1e-10)
        torch.testing.assert_close(one.pca_edges[name], res.pca_edges[name], atol=1e-13, rtol=1e-10)


def assert_same_fit(res, ref):
    for name in res.node_layers:
        for got, want in ((res.lib[name], ref.lib[name]), (res.pca[name], ref.pca[name])):
            torch.testing.assert_close(got.Lambda, want.Lambda, atol=1e-12, rtol=1e-9)
            torch.testing.assert_close(align_signs(got.C, want.C), want.C, atol=1e-10, rtol=1e-8)
            torch.testing.assert_close(got.mean, want.mean, atol=1e-13, rtol=1e-10)
    for name in res.node_layers[:-1]:
        assert res.lib_edges[name].abs().max() > 1e-6
        torch.testing.assert_close(res.lib_edges[name], ref.lib_edges[name], atol=1e-13, rtol=1e-9)
        torch.testing.assert_close(res.pca_edges[name], ref.pca_edges[name], atol=1e-13, rtol=1e-9)
    # the neuron basis (C = I) and its edges, wherever both fits computed them
    for name in res.node_layers:
        torch.testing.assert_close(res.neuron[name].Lambda, ref.neuron[name].Lambda, atol=1e-12, rtol=1e-9)
        assert torch.equal(res.neuron[name].C, torch.eye(res.neuron[name].C.shape[0], dtype=torch.float64))
    for name in res.node_layers[:-1] if "neuron" in res.edges and "neuron" in ref.edges else []:
        assert res.neuron_edges[name].abs().max() > 1e-6
        torch.testing.assert_close(res.neuron_edges[name], ref.neuron_edges[name], atol=1e-13, rtol=1e-9)


@pytest.mark.parametrize("integration,n", [("gradient", 1), ("trapezoid", 3), ("gauss-legendre", 2)])
def test_matches_naive_dense_reference_on_mlp(integration, n):
    model, data = mlp(), mlp_data()
    cfg = LIBConfig(integration=integration, n_intervals=n, rotate_final=integration == "trapezoid")
    assert_same_fit(fit_lib(model, data, MLP_LAYERS, cfg, progress=False), naive_fit_lib(model, data, MLP_LAYERS, cfg))


@pytest.fixture(scope="module")
def transformer_references():
    """The naive reference twice: Jacobians through run_model's site edits, and through an explicit
    forward written from the weights (evaluation.lib.explicit), which shares no code with the fit."""
    from evaluation.io.checkpoints import bridge_to_hooked_transformer_state_dict
    from evaluation.lib.explicit import ExplicitTransformer, ExplicitTransformerForward

    model, data = transformer(), token_data(n=12, batch=4)
    explicit = ExplicitTransformer(bridge_to_hooked_transformer_state_dict(model),
                                   dict(n_layers=1, d_head=4, act_fn="relu", normalization_type=None))
    toks = torch.cat([b[0] for b in data])
    for name in TF_LAYERS:  # the explicit forward reads the same weights
        torch.testing.assert_close(explicit(toks, name), activations(model, data, name).reshape(12, 3, -1),
                                   atol=1e-13, rtol=1e-12)
    cfg = LIBConfig()
    return (naive_fit_lib(model, data, TF_LAYERS, cfg),
            naive_fit_lib(model, data, TF_LAYERS, cfg, forward=ExplicitTransformerForward(explicit)))


@pytest.mark.parametrize("jacobians,methods", [
    ("structured", ["closed form: attention", "closed form: mlp", "closed form: unembed"]),
    ("autograd", ["autograd (jacobians='autograd')"] * 3),
])
def test_matches_naive_dense_reference_on_transformer_with_positions_and_attention(
        jacobians, methods, transformer_references):
    model, data = transformer(), token_data(n=12, batch=4)
    res = fit_lib(model, data, TF_LAYERS, LIBConfig(jacobians=jacobians), progress=False)
    assert [res.methods[name] for name in TF_LAYERS[:-1]] == methods
    for ref in transformer_references:
        assert_same_fit(res, ref)


def test_rotating_the_final_layer_leaves_earlier_bases_and_edges_unchanged():
    model, data = transformer(), token_data()
    plain = fit_lib(model, data, TF_LAYERS, LIBConfig(rotate_final=False), progress=False)
    rotated = fit_lib(model, data, TF_LAYERS, LIBConfig(rotate_final=True), progress=False)
    assert not torch.allclose(rotated.lib["output"].C[:, 1:3], plain.lib["output"].C[:, 1:3])
    for name in TF_LAYERS[:-1]:
        torch.testing.assert_close(rotated.lib[name].Lambda, plain.lib[name].Lambda, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(align_signs(rotated.lib[name].C, plain.lib[name].C), plain.lib[name].C,
                                   atol=1e-10, rtol=1e-8)
    for name in TF_LAYERS[:-2]:
        torch.testing.assert_close(rotated.lib_edges[name], plain.lib_edges[name], atol=1e-13, rtol=1e-9)
    # the last section's edges rotate with the output, but their column sums (∑_i over outputs) do not
    last = TF_LAYERS[-2]
    torch.testing.assert_close(rotated.lib_edges[last].sum(0), plain.lib_edges[last].sum(0), atol=1e-13, rtol=1e-9)


# ---- bad input -------------------------------------------------------------------------------

def test_unknown_layer_lists_available_names():
    with pytest.raises(KeyError, match=r"unknown layer 'nope'.*one of: 0, 1, 2"):
        fit_lib(mlp(), mlp_data(), ["0", "nope", "output"], progress=False)


def test_output_must_be_last_and_data_reiterable():
    with pytest.raises(ValueError, match=r"'output' .* can only be the last node layer"):
        fit_lib(mlp(), mlp_data(), ["output", "1"], progress=False)
    with pytest.raises(TypeError, match=r"data must be re-iterable"):
        fit_lib(mlp(), iter(mlp_data()), MLP_LAYERS, progress=False)


def test_nan_activations_name_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"node layer 'output' has non-finite \(NaN or inf\) activations"):
        fit_lib(model, mlp_data(), MLP_LAYERS, progress=False)


def test_constant_layer_is_a_clear_error():
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()  # layers "0" and "1" are constant; "1" is met first (fits go backwards)
    with pytest.raises(ValueError, match=r"node layer '1' is constant over the data \(every variance is 0\)"):
        fit_lib(model, mlp_data(), MLP_LAYERS, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(integration="simpson"), r"unknown integration 'simpson'; use one of"),
    (dict(n_intervals=3), r"integration='gradient' evaluates alpha = 1 only; n_intervals must be 1, got 3"),
    (dict(integration="trapezoid", n_intervals=0), r"n_intervals must be an integer >= 1, got 0"),
    (dict(stochastic_sources=0), r"stochastic_sources must be None or an integer >= 1, got 0"),
    (dict(truncation=-1.0), r"truncation must be a number in \[0, 1\), got -1.0"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LIBConfig(**kwargs)


@pytest.mark.parametrize("jacobians", ["autograd", "structured"])
def test_float32_jacobians_are_close_to_float64_and_leave_the_model_alone(jacobians):
    model, data = transformer(), token_data()
    exact = fit_lib(model, data, TF_LAYERS, LIBConfig(jacobians=jacobians), progress=False)
    fast = fit_lib(model, data, TF_LAYERS, LIBConfig(jacobian_dtype="float32", jacobians=jacobians), progress=False)
    assert all(p.dtype == F64 for p in model.parameters())
    # (the weights are float32 numbers, so the linear unembedding section is exact in float32 too;
    # the closed form builds the Jacobian Gram in float64 and only the per-example edge products in float32)
    for name in TF_LAYERS[:-1]:
        got, want = fast.lib[name].Lambda, exact.lib[name].Lambda
        assert got.shape == want.shape
        if jacobians == "structured":
            assert name == TF_LAYERS[-2] or not torch.equal(fast.lib_edges[name], exact.lib_edges[name])
        else:
            assert name == TF_LAYERS[-2] or not torch.equal(got, want)   # float32 rounding is visible ...
        torch.testing.assert_close(got, want, atol=1e-5 * want.max(), rtol=1e-4)  # ... but small
        torch.testing.assert_close(fast.lib_edges[name], exact.lib_edges[name],
                                   atol=1e-5 * exact.lib_edges[name].max(), rtol=1e-3)
    # a float64 copy of a float32 model: float inputs are cast along
    mlp32, x = mlp().float(), mlp_data()
    res = fit_lib(mlp32, [b.float() for b in x], MLP_LAYERS, LIBConfig(jacobian_dtype="float64"), progress=False)
    ref = naive_fit_lib(mlp32.double(), x, MLP_LAYERS, LIBConfig())
    torch.testing.assert_close(res.lib["0"].Lambda, ref.lib["0"].Lambda, atol=1e-5, rtol=1e-5)


def test_config_rejects_unknown_jacobian_dtype():
    with pytest.raises(ValueError, match=r"unknown jacobian_dtype 'float16'; use one of \(None, 'float32', 'float64'\)"):
        LIBConfig(jacobian_dtype="float16")


class _FlatteningMLP(nn.Module):
    """An MLP that flattens its input, as interp_train.models.mlp.MLP does with images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.layers = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.layers(x.flatten(1))


def test_an_image_input_is_one_position_of_all_its_pixels():
    """An MLP fed (B, 1, 3, 4) images is the same map as the MLP fed the (B, 12) flattened images, so
    its LIB (every basis, every edge) must be the same: the input layer has 12 features, not 3
    positions of 4."""
    model = _FlatteningMLP().double()
    images = torch.randn(24, 1, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    layers = ["input", "layers.1", "output"]
    as_images = fit_lib(model, [images[:12], images[12:]], layers, progress=False)
    flat = images.flatten(1)
    as_vectors = fit_lib(model, [flat[:12], flat[12:]], layers, progress=False)
    assert as_images.lib["input"].C.shape[0] == 12 + 1  # the constant and 12 pixels
    assert_same_fit(as_images, as_vectors)


def test_a_feature_map_node_layer_matches_the_naive_reference():
    """A CNN with a (B, C, H, W) node layer (the conv block's output) against the naive dense fit."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    x = torch.randn(20, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(8))
    data, layers = [x[:10], x[10:]], ["input", "1", "output"]
    res = fit_lib(model, data, layers, progress=False)
    assert res.lib["1"].C.shape[0] == 2 * 4 * 4 + 1 and res.pca["input"].C.shape[0] == 17
    assert_same_fit(res, naive_fit_lib(model, data, layers, LIBConfig()))
