"""Fourier content of modular-addition features (evaluation.metrics.fourier; issue 5).

Fast tests check the measurement on synthetic features with known Fourier content against
exact fractions and a naive least-squares fit. The slow test trains the recipe's CPU variant
(p = 59) through the recipe API, fits LIB + PCA on the residual stream, and asserts that the
top LIB directions are dominated by one or two Fourier frequencies.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from evaluation.metrics.fourier import (
    default_positions, direction_values, fourier_design, fourier_fractions, fourier_table, random_directions,
    variance_share,
)

P = 13


def grid(p=P):
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    return a, b


def wave(x, k, p=P, phase=0.0):
    return torch.cos(2 * math.pi * k * x / p + phase)


def test_design_is_orthonormal():
    phi = fourier_design(P).reshape(P * P, -1)
    assert phi.shape == (P * P, 6 * 3 * 2)  # F = 6 frequencies, 3 terms, cos/sin
    torch.testing.assert_close(phi.T @ phi, torch.eye(phi.shape[1], dtype=torch.float64), atol=1e-12, rtol=0)


def test_pure_frequency_and_mixture_exact_fractions():
    a, b = grid()
    # variance of A cos(θ) over a full period is A²/2: weights 3² : 2² : 1² : noise-free constant offset
    v = 3 * wave(a, 2, phase=0.3) + 2 * wave(a + b, 5, phase=-1.0) + 1 * wave(b, 2) + 7.0
    fit = fourier_fractions(v[:, None], P)
    total = 9 + 4 + 1
    assert fit.frequencies[0, :2].tolist() == [2, 5]
    torch.testing.assert_close(fit.fractions[0, :2], torch.tensor([10 / total, 4 / total], dtype=torch.float64))
    torch.testing.assert_close(fit.top_fraction(1), torch.tensor([10 / total], dtype=torch.float64))
    torch.testing.assert_close(fit.top_fraction(2), torch.tensor([1.0], dtype=torch.float64))
    # term split of frequency 2: a carries 9, b carries 1 (of 14)
    torch.testing.assert_close(fit.term_fractions[0, 0], torch.tensor([9 / total, 1 / total, 0.0], dtype=torch.float64))
    torch.testing.assert_close(fit.variance, torch.tensor([total / 2], dtype=torch.float64))


def test_product_term_is_half_unexplained():
    # cos(ka)cos(kb) = [cos(k(a+b)) + cos(k(a−b))]/2: half its variance is in the a−b term
    a, b = grid()
    fit = fourier_fractions((wave(a, 3) * wave(b, 3))[:, None], P)
    assert fit.frequencies[0, 0] == 3
    torch.testing.assert_close(fit.top_fraction(1), torch.tensor([0.5], dtype=torch.float64))
    fit_with_diff = fourier_fractions((wave(a, 3) * wave(b, 3))[:, None], P, terms=("a", "b", "a+b", "a-b"))
    torch.testing.assert_close(fit_with_diff.top_fraction(1), torch.tensor([1.0], dtype=torch.float64))


def test_agrees_with_naive_least_squares_on_random_features():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(P * P, 4, generator=g, dtype=torch.float64)
    fit = fourier_fractions(v, P)
    a, b = grid()
    for j in range(4):
        for K in (1, 2, 3):
            ks = fit.frequencies[j, :K].tolist()
            cols = [torch.ones_like(a)]
            for k in ks:
                for x in (a, b, a + b):
                    cols += [wave(x, k), torch.sin(2 * math.pi * k * x / P)]
            X = torch.stack(cols, 1).numpy()
            y = v[:, j].numpy()
            resid = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
            r2 = 1 - (resid ** 2).sum() / ((y - y.mean()) ** 2).sum()
            assert fit.top_fraction(K)[j].item() == pytest.approx(r2, abs=1e-10)
    # the best K frequencies are optimal: no other single frequency explains more
    assert torch.all(fit.fractions[:, :-1] >= fit.fractions[:, 1:])


def test_pooled_positions_and_degenerate_feature():
    a, b = grid()
    # position 0: cos(2a) (variance 1/2); position 1: 2 sin(4b) + 5 (variance 2)
    vals = torch.stack([wave(a, 2)[:, None], (2 * torch.sin(2 * math.pi * 4 * b / P) + 5)[:, None]])
    fit = fourier_fractions(vals, P)
    assert fit.frequencies[0, :2].tolist() == [4, 2]
    torch.testing.assert_close(fit.fractions[0, :2], torch.tensor([0.8, 0.2], dtype=torch.float64))
    flat = fourier_fractions(torch.stack([wave(a, 1), torch.full_like(a, 3.0)], 1), P)
    assert flat.fractions[0, 0].item() == pytest.approx(1.0)
    assert torch.isnan(flat.fractions[1]).all()


def test_direction_values_and_variance_share():
    a, b = grid()
    # activations (p², T=3, d=2): dim 0 = cos(a) at position 0, constant 4 at position 2; dim 1 noise-free b
    act = torch.zeros(P * P, 3, 2, dtype=torch.float64)
    act[:, 0, 0] = wave(a, 1)
    act[:, 2, 0] = 4.0
    act[:, 1, 1] = b
    e0 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    vals = direction_values(act, e0, (0,))
    torch.testing.assert_close(vals[0, :, 0], wave(a, 1))
    # naive: variance over all (input, position) rows vs within-position variance at position 0
    rows = act[:, :, 0].reshape(-1)
    expected = act[:, 0, 0].var(unbiased=False) / (3 * rows.var(unbiased=False))
    torch.testing.assert_close(variance_share(act, e0, (0,)), expected.reshape(1))
    assert variance_share(act, e0, (2,)).item() == pytest.approx(0.0, abs=1e-15)


def test_default_positions_and_random_directions():
    assert default_positions("blocks.0.hook_resid_pre") == (0, 1)
    assert default_positions("blocks.0.hook_resid_mid") == (2,)
    assert default_positions("output", n_ctx=5) == (4,)
    u = random_directions(16, 5, seed=3)
    torch.testing.assert_close(u.norm(dim=0), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(u, random_directions(16, 5, seed=3))


def test_bad_input():
    with pytest.raises(ValueError, match="p must be an integer >= 3"):
        fourier_design(2)
    with pytest.raises(ValueError, match="unknown Fourier terms"):
        fourier_design(P, terms=("a", "a*b"))
    with pytest.raises(ValueError, match=r"values must have shape \(p², n\)"):
        fourier_fractions(torch.zeros(P * P + 1, 2), P)
    fit = fourier_fractions(torch.randn(P * P, 2, dtype=torch.float64), P)
    with pytest.raises(ValueError, match="K must be an integer in"):
        fit.top_fraction(0)
    with pytest.raises(ValueError, match="positions"):
        direction_values(torch.zeros(4, 3, 2), torch.zeros(2, 1), (3,))


# ---------------------------------------------------------------------------- slow: trained model

RUN_ENV = "INTERP_TRAIN_FOURIER_RUN"  # a trained cpu-variant run dir to load instead of training
MID, POST = "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"
TRAIN_STEPS = 1000  # held-out accuracy 100 % for seeds 0-3 (the recipe reaches >= 99 % at steps 350-650)


@pytest.fixture(scope="module")
def trained_modular(tmp_path_factory):
    """The recipe's CPU variant (p = 59, full batch) trained for TRAIN_STEPS steps through the
    interp-train CLI, deterministically (CPU, one thread, deterministic algorithms, seed 0), or loaded
    from $INTERP_TRAIN_FOURIER_RUN with load_recipe."""
    from interp_train.recipes import load_recipe

    if os.environ.get(RUN_ENV):
        module, datamodule = load_recipe(os.environ[RUN_ENV])
        return module, datamodule, {"loaded": os.environ[RUN_ENV]}
    from pathlib import Path

    from interp_train.cli import InterpTrainCLI

    config = Path(__file__).resolve().parent.parent / "recipes" / "modular_addition" / "cpu.yaml"
    root = tmp_path_factory.mktemp("fourier_runs")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        cli = InterpTrainCLI(args=["--config", str(config), "--checkpoint_root", str(root), "--seed_everything", "0",
                                   "--trainer.max_steps", str(TRAIN_STEPS), "--trainer.accelerator", "cpu",
                                   "--trainer.enable_progress_bar", "false",
                                   "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
                                   "--trainer.enable_checkpointing", "false"], run=False)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        seconds = time.perf_counter() - start
        acc = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"]
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    cli.model.eval()
    return cli.model, cli.datamodule, {"train_seconds": round(seconds, 1), "held_out_acc": float(acc),
                                       "steps": cli.trainer.global_step}


def mean_top(entry, basis, K="top_1"):
    return float(np.mean([r[K] for r in entry[basis]]))


@pytest.mark.slow
def test_top_lib_directions_of_trained_modular_addition_are_fourier(trained_modular):
    """Top 6 non-constant LIB directions, read at the '=' position over all p² inputs, against the
    top 6 PCA directions and 32 random directions of the same layer.

    What the math says: a grokked model computes with a few key frequencies k (cos/sin of k·a,
    k·b and, after the MLP, k·(a+b)), so the stream at '=' is itself made of those few frequencies
    and even a random direction is a mixture of them (mean best-2 fraction ≈ 0.8, best-3 ≈ 0.9):
    the best-K fractions for K ≥ 2 barely separate structured from random directions. What does
    is the best single frequency (best-1): LIB ranks directions by how the rest of the network
    uses them, and the network reads each key frequency separately, so each top LIB direction
    should be about one frequency, far above a random mixture. PCA ranks by variance, which in a
    grokked model is also carried by the key frequencies, so PCA is Fourier too; LIB is asserted
    to be at least as Fourier as PCA up to a margin, not better (docs/DESIGN.md §4 does not claim it).

    Asserted, at resid_mid and resid_post: LIB mean best-1 > random mean best-1 + margin (0.2 at
    resid_mid; 0.05 at resid_post, where the stream at '=' holds fewer frequencies and a random
    mixture of them is already more Fourier); LIB mean best-1 > PCA mean best-1 − 0.1; LIB mean
    best-2 > 0.9; LIB needs at most as many directions as PCA for 99 % (docs/DESIGN.md §4).
    Measured, seeds 0 / 1 / 2 (1000 steps, all-pairs accuracy 100 %), mean best-1 LIB / PCA / random:
    resid_mid 0.94 / 0.82 / 0.59, 0.95 / 0.93 / 0.63, 0.97 / 0.95 / 0.55; resid_post 0.96 / 0.94 / 0.60,
    0.90 / 0.77 / 0.77, 0.96 / 0.97 / 0.67; LIB mean best-2 ≥ 0.95; directions for 99 %, LIB / PCA:
    resid_mid 10/12, 8/10, 8/11, resid_post 6/12, 6/10, 6/11. The smallest margins (seed 1:
    0.13 over random at resid_post; seed 2: LIB 0.01 below PCA at resid_post) stay clear of the
    thresholds.
    """
    from evaluation.lib.fit import LIBConfig, fit_lib
    from evaluation.metrics.lib_summary import feature_count
    from interp_train.data.modular import modular_addition_table

    module, datamodule, info = trained_modular
    model, p = module.model, datamodule.p
    tokens, targets = modular_addition_table(p)
    batches = [(tokens[i:i + 1024], targets[i:i + 1024]) for i in range(0, len(tokens), 1024)]
    with torch.no_grad():
        info["all_pairs_acc"] = float((model(tokens)[:, -1].argmax(-1) == targets).double().mean())
    assert info["all_pairs_acc"] > 0.99, info  # the structure below is that of a grokked model
    start = time.perf_counter()
    result = fit_lib(model, batches, [MID, POST, "output"], LIBConfig(), progress=False)
    info["lib_seconds"] = round(time.perf_counter() - start, 1)
    table = fourier_table(model, result, p, [MID, POST], n_top=6, n_random=32, Ks=(1, 2, 3))
    print(info)
    for layer in (MID, POST):
        entry = table[layer]
        assert entry["positions"] == [2]
        best1 = {basis: mean_top(entry, basis) for basis in ("lib", "pca", "random")}
        best2 = mean_top(entry, "lib", "top_2")
        counts = feature_count(result.lib[layer].Lambda), feature_count(result.pca[layer].Lambda)
        print(layer, "mean best-1", best1, "LIB mean best-2", round(best2, 3), "LIB/PCA directions for 99 %:", counts)
        assert best1["lib"] > best1["random"] + (0.2 if layer == MID else 0.05), (layer, best1)
        assert best1["lib"] > best1["pca"] - 0.1, (layer, best1)
        assert best2 > 0.9, (layer, entry["lib"])
        assert counts[0] <= counts[1], (layer, counts)


@pytest.mark.parametrize("training", [True, False])
def test_layer_activations_run_in_eval_mode_and_restore_the_mode(training):
    """A model whose training mode is random (HardConcreteL0 gates are drawn in training, fixed in eval):
    the activations are the eval-mode forward's, whatever mode the model came in, which is restored."""
    from evaluation.metrics.fourier import layer_activations
    from interp_train.data.modular import modular_addition_table
    from interp_train.models.transformer import Transformer
    from interp_train.regularizers import HardConcreteL0

    p = 5
    torch.manual_seed(0)
    model = Transformer(d_vocab=p + 1, d_vocab_out=p, n_ctx=3, d_model=8, n_heads=2, d_head=4, d_mlp=16, init_seed=0)
    HardConcreteL0(init_log_alpha=0.0).setup(model)
    tokens, _ = modular_addition_table(p)
    model.eval()
    with torch.no_grad():
        want = model(tokens).to(torch.float64)
        assert not torch.equal(model.train()(tokens).to(torch.float64), want)  # training mode differs
    model.train(training)
    got = layer_activations(model, "output", p, batch_size=7)
    assert model.training is training and all(m.training is training for m in model.modules())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
