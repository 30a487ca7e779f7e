"""Recipes: every recipe x variant trains (fast_dev_run), data modules, tangents, reloading."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from interp_train.cli import InterpTrainCLI
from interp_train.recipes import accuracy, load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ALL_VARIANTS = sorted(str(p.relative_to(RECIPES)) for p in RECIPES.glob("*/*.yaml"))

# Tiny sizes so each fast_dev_run takes seconds; the model/data wiring is what is tested.
SMALL = {
    "modular_addition": ["--data.init_args.p", "13", "--model.model.init_args.d_vocab", "14",
                         "--model.model.init_args.d_vocab_out", "13"],
    "text": ["--data.init_args.max_bytes", "20000", "--data.init_args.seq_len", "16",
             "--model.model.init_args.n_ctx", "16", "--data.init_args.batch_size", "8"],
    "manifold": ["--data.init_args.n_train", "256", "--data.init_args.n_val", "64", "--data.init_args.n_test", "64"],
    "digit_manifold": ["--data.init_args.n_train", "256", "--data.init_args.n_val", "64", "--data.init_args.n_test", "64",
                       "--data.init_args.vae_steps", "30", "--data.init_args.vae_hidden", "32"],
}


@pytest.fixture(scope="module")
def vision_files(tmp_path_factory):
    """Small local stand-ins for MNIST (uint8 28x28) and CIFAR-10 (uint8 HWC 32x32)."""
    folder = tmp_path_factory.mktemp("vision")
    rng = np.random.default_rng(0)
    files = {}
    for name, shape in (("mnist", (28, 28)), ("cifar10", (32, 32, 3))):
        arrays = {f"x_{s}": rng.integers(0, 256, (n, *shape), dtype=np.uint8) for s, n in (("train", 40), ("test", 16))}
        arrays |= {f"y_{s}": rng.integers(0, 10, n) for s, n in (("train", 40), ("test", 16))}
        files[name] = folder / f"{name}.npz"
        np.savez(files[name], **arrays)
    return files


def fast_dev_args(variant: str, root: Path, vision_files) -> list[str]:
    task = variant.split("/")[0]
    args = ["fit", "--config", str(RECIPES / variant), "--trainer.fast_dev_run", "true",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--checkpoint_root", str(root), *SMALL.get(task, [])]
    if task in vision_files:
        args += ["--data.init_args.local_file", str(vision_files[task]), "--trainer.accelerator", "cpu"]
    return args


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_recipe_variant_trains_a_step(variant, tmp_path, vision_files, monkeypatch):
    config = yaml.safe_load((RECIPES / variant).read_text())
    if variant == "text/tinystories.yaml":
        pytest.skip("TinyStories needs the internet; its offline error is tested below")
    workdir = tmp_path / "cwd"  # run from an empty folder: the checkout's own checkpoints/ stays out of it
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cli = InterpTrainCLI(args=fast_dev_args(variant, tmp_path / "runs", vision_files))
    metrics = json.loads((cli.run_directory / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"])
    assert 0.0 <= metrics["train/acc"] <= 1.0
    assert cli.run_directory == tmp_path / "runs" / cli.datamodule.task / Path(variant).stem / "seed0"
    regs = config["model"].get("regularizers") or []
    assert len(cli.model.regularizers) == len(regs)
    for reg in cli.model.regularizers:  # every regularizer ran and logged its weight
        assert any(k.endswith(f"/{reg.name}/weight") for k in metrics), sorted(metrics)
        assert reg.step == 1
    # --checkpoint_root is respected: nothing is written into a default checkpoints/ of the working folder
    assert list(workdir.iterdir()) == []


def test_accuracy_matches_explicit_loop():
    out, y = torch.randn(7, 5, 4), torch.randint(0, 4, (7, 5))
    manual = sum(int(out[i, t].argmax() == y[i, t]) for i in range(7) for t in range(5)) / 35
    assert float(accuracy(out, y)) == pytest.approx(manual)
    last = torch.randint(0, 4, (7,))  # (B, T, C) with (B,) targets: last position
    assert float(accuracy(out, last)) == pytest.approx(sum(int(out[i, -1].argmax() == last[i]) for i in range(7)) / 7)


def test_digits_splits_partition_the_data_set():
    from sklearn.datasets import load_digits

    from interp_train.data.digits import DigitsDataModule

    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.2)
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == round(0.2 * 1797) and sizes["val"] == round(0.1 * 1797)
    rows = {tuple(r.tolist()) + (int(t),) for k in dm.splits for r, t in zip(*dm.splits[k].tensors)}
    ref = load_digits()
    assert rows == {tuple((r / 16.0).astype(np.float32).tolist()) + (int(t),) for r, t in zip(ref.data, ref.target)}
    assert dm.train_inputs().shape == (sizes["train"], 64)
    with pytest.raises(ValueError, match=r"val_fraction \(0.5\) and test_fraction \(0.6\)"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.6)


def test_modular_addition_table_and_split():
    from interp_train.data.modular import ModularAdditionDataModule

    dm = ModularAdditionDataModule(p=7, train_fraction=0.3)
    x_tr, y_tr = dm.splits["train"].tensors
    x_te, y_te = dm.splits["test"].tensors
    assert len(y_tr) == round(0.3 * 49) and len(y_tr) + len(y_te) == 49
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        for (a, b, eq), t in zip(x.tolist(), y.tolist()):
            assert eq == 7 and t == (a + b) % 7
    pairs = {tuple(r[:2]) for r in x_tr.tolist()} | {tuple(r[:2]) for r in x_te.tolist()}
    assert pairs == {(a, b) for a in range(7) for b in range(7)}
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\), got 1.5"):
        ModularAdditionDataModule(p=7, train_fraction=1.5)


def test_manifold_batches_are_on_the_manifold_with_latent_labels():
    from interp_train.data.manifold import ManifoldDataModule, latent_labels

    dm = ManifoldDataModule(latent_dim=3, ambient_dim=20, n_classes=3, n_train=50, n_val=10, n_test=10)
    x, y, z = next(iter(dm.train_dataloader()))
    assert torch.allclose(x.double(), dm.generator(z.double()), atol=1e-5)
    assert torch.equal(y, latent_labels(z, 3, seed=0))
    assert set(dm.splits["train"].tensors[1].tolist()) <= {0, 1, 2}


def test_manifold_tangents_match_finite_differences_of_g():
    from interp_train.data.manifold import ManifoldDataModule

    dm = ManifoldDataModule(latent_dim=3, ambient_dim=20, n_train=30, n_val=5, n_test=5)
    z = dm.train_latents()[:6].double()
    h = 1e-6
    fd = torch.stack([(dm.generator(z + h * e) - dm.generator(z - h * e)) / (2 * h)
                      for e in torch.eye(3, dtype=torch.float64)], dim=-1)  # (B, d, k) central differences
    U = dm.tangent_basis(z)
    assert torch.allclose(U.transpose(1, 2) @ U, torch.eye(3, dtype=torch.float64).expand(6, 3, 3), atol=1e-10)
    # span(U) == span(fd): projecting the finite-difference tangents onto U leaves them unchanged
    assert torch.allclose(U @ (U.transpose(1, 2) @ fd), fd, atol=1e-6)
    provider = dm.tangent_provider("exact")  # looks the latent up from x alone
    x = dm.train_inputs()[:6]
    Ux = provider.basis(x).double()
    assert torch.allclose(Ux @ Ux.transpose(1, 2), U @ U.transpose(1, 2), atol=1e-5)


def test_text_windows_are_shifted_bytes_of_pydoc():
    from interp_train.data.text import ByteTextDataModule, pydoc_text

    dm = ByteTextDataModule(seq_len=8, max_bytes=400)
    raw = pydoc_text().encode("utf-8")[:400]
    for split in dm.splits.values():
        x, y = split.tensors
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert bytes(row_x + row_y[-1:]) in raw
    assert sum(len(s) for s in dm.splits.values()) == (400 - 1) // 8


def test_tinystories_offline_error_is_clear(monkeypatch):
    import datasets

    from interp_train.data.text import ByteTextDataModule

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"roneneldan/TinyStories .*offline, use source='pydoc'"):
        ByteTextDataModule(source="tinystories").setup("fit")


def test_vision_without_torchvision_names_the_missing_piece(monkeypatch):
    from interp_train.data.vision import VisionDataModule

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    with pytest.raises(RuntimeError, match=r"needs torchvision .*interp-train\[vision\]"):
        VisionDataModule(dataset="mnist", backend="torchvision").setup("fit")
    with pytest.raises(ValueError, match=r"unknown vision dataset 'svhn'; allowed: mnist, cifar10"):
        VisionDataModule(dataset="svhn")


def test_vision_local_file_shapes(vision_files):
    from interp_train.data.vision import VisionDataModule

    dm = VisionDataModule(dataset="cifar10", local_file=str(vision_files["cifar10"]), val_fraction=0.25)
    x, y = dm.splits["train"].tensors
    raw = np.load(vision_files["cifar10"])
    assert x.shape == (30, 3, 32, 32) and len(dm.splits["val"]) == 10 and len(dm.splits["test"]) == 16
    first = dm.splits["test"].tensors[0][0]
    assert torch.allclose(first, torch.from_numpy(raw["x_test"][0]).permute(2, 0, 1).float() / 255)


def test_load_recipe_rebuilds_the_trained_model(tmp_path):
    cli = InterpTrainCLI(args=["fit", "--config", str(RECIPES / "digits/grad_norm.yaml"), "--trainer.max_steps", "3",
                               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                               "--checkpoint_root", str(tmp_path), "--test_after_fit", "false"])
    run_dir = tmp_path / "digits" / "grad_norm" / "seed0"
    module, dm = load_recipe(run_dir)
    assert type(dm).__name__ == "DigitsDataModule" and module.regularizers[0].step == 3
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    x = torch.rand(5, 64)
    # independent reference: the MLP's own layers applied by hand with the checkpoint's weights
    h = x
    for i in (0, 2, 4):
        h = h @ state[f"model.layers.{i}.weight"].T + state[f"model.layers.{i}.bias"]
        h = torch.relu(h) if i < 4 else h
    assert torch.allclose(module(x), h, atol=1e-6)
    assert torch.allclose(module(x), cli.model.cpu()(x), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no config.yaml next to"):
        load_recipe(next((run_dir / "checkpoints").glob("*.ckpt")).rename(tmp_path / "lonely.ckpt"))
