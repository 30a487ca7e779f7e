"""Decoder-generated digit manifold: exact Jacobians, determinism, labels, cache, validation."""

from __future__ import annotations

import pytest
import torch

from interp_train.data.digit_decoder import DigitVAEConfig, digit_images, trained_decoder
from interp_train.data.digit_manifold import DigitManifoldDataModule, nearest_mean_labels

TINY = dict(vae_steps=30, vae_hidden=32, n_train=200, n_val=50, n_test=50)


@pytest.fixture(scope="module")
def dm(tmp_path_factory):
    module = DigitManifoldDataModule(cache_dir=str(tmp_path_factory.mktemp("cache")), **TINY)
    module.setup()
    return module


def test_jacobian_matches_central_differences_and_reverse_mode(dm):
    g = dm.generator
    z = dm.splits["train"].tensors[2][:5].double()
    jac = g.jacobian(z)
    assert jac.shape == (5, 256, 10) and jac.dtype == torch.float64
    h = 1e-5
    eye = torch.eye(10, dtype=torch.float64)
    fd = torch.stack([(g(z + h * e) - g(z - h * e)) / (2 * h) for e in eye], dim=-1)
    torch.testing.assert_close(jac, fd, atol=1e-7, rtol=1e-6)
    # reverse mode through a fresh float64 copy of the decoder weights (no shared code path with vmap/jacfwd)
    decoder = torch.nn.Sequential(*[m for m in g._decoder]).double()
    for i in range(len(z)):
        rev = torch.autograd.functional.jacobian(decoder, z[i])
        torch.testing.assert_close(jac[i], rev, atol=1e-10, rtol=1e-10)
    assert float(jac.abs().max()) > 1e-3  # the decoder is not constant


def test_batches_are_decoded_latents_with_conditioning_labels(dm):
    x, y, z = dm.splits["train"].tensors
    assert x.shape == (200, 1, 16, 16) and z.shape == (200, 10) and y.dtype == torch.long
    torch.testing.assert_close(x.flatten(1).double(), dm.generator(z.double()), atol=1e-6, rtol=0)
    assert ((x >= 0) & (x <= 1)).all()
    assert torch.equal(y, nearest_mean_labels(z, dm.means))  # label = the cell of the conditioning class
    assert set(y.tolist()) == set(range(10))
    # latents are scattered around their class mean with the prior's spread
    resid = z.double() - dm.means[y]
    assert 0.6 < float(resid.std()) < 1.2


def test_same_seeds_same_data_even_when_retrained(dm, tmp_path):
    other = DigitManifoldDataModule(cache_dir=str(tmp_path / "fresh"), **TINY)  # trains the VAE again
    other.setup()
    assert other.decoder_info["cached"] is False
    for split in ("train", "val", "test"):
        for a, b in zip(dm.splits[split].tensors, other.splits[split].tensors):
            assert torch.equal(a, b)
    reseeded = DigitManifoldDataModule(cache_dir=str(tmp_path / "fresh"), data_seed=1, **TINY)
    reseeded.setup()
    assert reseeded.decoder_info["cached"] is True
    assert not torch.equal(reseeded.splits["train"].tensors[2], dm.splits["train"].tensors[2])


def test_cache_is_written_once_atomically_and_keyed_by_config(tmp_path):
    cfg = DigitVAEConfig(steps=5, hidden=16)
    state, info = trained_decoder(cfg, tmp_path)
    files = sorted(p.name for p in (tmp_path / "digit_vae").iterdir())
    assert files == [f"{cfg.key()}.pt"]  # no temporary file left behind
    again, info2 = trained_decoder(cfg, tmp_path)
    assert info2["cached"] and all(torch.equal(state[k], again[k]) for k in state)
    assert DigitVAEConfig(steps=5, hidden=16, seed=1).key() != cfg.key()


def test_exact_tangent_provider_spans_the_decoder_jacobian(dm):
    provider = dm.tangent_provider("exact")
    x, _, z = dm.splits["val"].tensors
    U = provider.basis(x[:8])  # latents found by lookup
    assert U.shape == (8, 256, 10)
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(10).expand(8, -1, -1), atol=1e-5, rtol=0)
    jac = dm.generator.jacobian(z[:8].double()).float()
    residual = jac - U @ (U.transpose(1, 2) @ jac)
    assert float(residual.norm() / jac.norm()) < 1e-4


def test_images_are_the_resized_digits():
    x8, y = digit_images(8)
    assert x8.shape == (1797, 64) and float(x8.max()) == 1.0
    x16, _ = digit_images(16, n_classes=3)
    assert x16.shape[1] == 256 and set(torch.unique(_).tolist()) == {0, 1, 2}


@pytest.mark.parametrize("bad", [dict(latent_dim=0), dict(image_size=4), dict(n_classes=11), dict(radius=-1.0),
                                 dict(steps=2.5)])
def test_bad_vae_config_names_the_value(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DigitVAEConfig(**bad)


def test_bad_data_arguments_raise(dm):
    with pytest.raises(ValueError, match="n_train"):
        DigitManifoldDataModule(n_train=0)
    with pytest.raises(ValueError, match="prior_std"):
        DigitManifoldDataModule(prior_std=0.0)
    with pytest.raises(ValueError, match="latents must be"):
        dm.generator(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="latents must be"):
        dm.generator.jacobian(torch.zeros(3, 10, dtype=torch.long))


@pytest.mark.slow
def test_decoded_digits_are_recognised_as_their_conditioning_class(tmp_path):
    """A classifier fitted on the real (resized) digits reads the generated images as their label."""
    from sklearn.linear_model import LogisticRegression

    module = DigitManifoldDataModule(cache_dir=str(tmp_path), n_train=1000, n_val=10, n_test=10)
    module.setup()
    x_real, y_real = digit_images(16)
    clf = LogisticRegression(max_iter=2000).fit(x_real.numpy(), y_real.numpy())
    x, y, _ = module.splits["train"].tensors
    agreement = (clf.predict(x.flatten(1).numpy()) == y.numpy()).mean()
    assert agreement > 0.8, agreement
