"""Recipe 5: MNIST and CIFAR-10 through torchvision or ``datasets`` (optional), or a local file.

torchvision is imported lazily inside functions only (its wheels may not load next to a
CPU-only torch); nothing else needs it. A local ``.npz`` file with arrays x_train, y_train,
x_test, y_test (images (N, C, H, W) or (N, H, W), uint8 0..255 or float 0..1) stands in for
the real data set offline and in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from interp_train.recipes import SplitDataModule, split_indices

DATASETS = ("mnist", "cifar10")
BACKENDS = ("auto", "torchvision", "datasets", "local")
_HF_NAMES = {"mnist": ("mnist", "image", "label"), "cifar10": ("cifar10", "img", "label")}


def _to_float_images(x: np.ndarray) -> torch.Tensor:
    """(N, C, H, W) float32 in [0, 1] from uint8 or float arrays, (N, H, W) or (N, H, W, C) too."""
    x = np.asarray(x)
    t = torch.from_numpy(x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def load_local(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = np.load(path)
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
    if missing:
        raise KeyError(f"local data file {str(path)!r} lacks arrays {missing}; it needs x_train, y_train, x_test, y_test")
    return (_to_float_images(data["x_train"]), torch.as_tensor(data["y_train"]).long(),
            _to_float_images(data["x_test"]), torch.as_tensor(data["y_test"]).long())


def load_torchvision(name: str, root: str, download: bool):
    try:
        import torchvision  # noqa: F401 - lazy on purpose
        from torchvision import datasets as tvd
    except Exception as exc:
        raise RuntimeError(
            f"the {name} recipe needs torchvision (pip install 'interp-train[vision]'), which failed to "
            f"import ({type(exc).__name__}: {exc}); or pass backend='datasets' or a local_file"
        ) from exc
    cls = tvd.MNIST if name == "mnist" else tvd.CIFAR10
    try:
        train, test = cls(root, train=True, download=download), cls(root, train=False, download=download)
    except Exception as exc:
        raise RuntimeError(f"torchvision could not load {name} under {root!r} ({exc}); offline, the data must "
                           "already be in that folder (or pass local_file)") from exc
    return (_to_float_images(np.asarray(train.data)), torch.as_tensor(np.asarray(train.targets)).long(),
            _to_float_images(np.asarray(test.data)), torch.as_tensor(np.asarray(test.targets)).long())


def load_hf(name: str):
    hf_name, image_key, label_key = _HF_NAMES[name]
    try:
        from datasets import load_dataset

        ds = load_dataset(hf_name)
    except Exception as exc:
        raise RuntimeError(f"the `datasets` library could not load {hf_name!r} ({type(exc).__name__}: {exc}); "
                           "offline, pass a local_file") from exc
    out = []
    for split in ("train", "test"):
        images = np.stack([np.asarray(im) for im in ds[split][image_key]])
        out += [_to_float_images(images), torch.as_tensor(ds[split][label_key]).long()]
    return tuple(out)


class VisionDataModule(SplitDataModule):
    """Image classification batches (x (B, C, H, W) in [0, 1], y (B,)).

    dataset: "mnist" or "cifar10" (also the task name). backend: "local" reads ``local_file``;
    "torchvision" / "datasets" load the real data; "auto" uses local_file if given, else tries
    torchvision, then datasets, and raises an error naming what is missing.
    The validation split is a seeded ``val_fraction`` of the training images.
    """

    def __init__(
        self,
        dataset: Literal["mnist", "cifar10"] = "mnist",
        backend: Literal["auto", "torchvision", "datasets", "local"] = "auto",
        root: str = "data",
        local_file: Optional[str] = None,
        download: bool = False,
        val_fraction: float = 0.1,
        max_train: Optional[int] = None,
        batch_size: Optional[int] = 128,
        split_seed: int = 0,
        num_workers: int = 0,
        eval_batch_size: Optional[int] = 1000,
    ):
        super().__init__(batch_size, num_workers, eval_batch_size)
        if dataset not in DATASETS:
            raise ValueError(f"unknown vision dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
        if backend == "local" and not local_file:
            raise ValueError("backend='local' needs local_file=<path to an .npz with x_train, y_train, x_test, y_test>")
        self.dataset, self.backend, self.root, self.local_file = dataset, backend, root, local_file
        self.download, self.val_fraction, self.max_train, self.split_seed = download, val_fraction, max_train, split_seed

    @property
    def task(self) -> str:  # type: ignore[override]
        return self.dataset

    def load_arrays(self):
        if self.backend == "local" or (self.backend == "auto" and self.local_file):
            return load_local(self.local_file)
        if self.backend == "torchvision":
            return load_torchvision(self.dataset, self.root, self.download)
        if self.backend == "datasets":
            return load_hf(self.dataset)
        errors = []
        for loader in (lambda: load_torchvision(self.dataset, self.root, self.download), lambda: load_hf(self.dataset)):
            try:
                return loader()
            except RuntimeError as exc:
                errors.append(str(exc))
        raise RuntimeError(f"cannot load {self.dataset}: " + " | ".join(errors))

    def build(self) -> dict[str, TensorDataset]:
        x_train, y_train, x_test, y_test = self.load_arrays()
        if self.max_train:
            x_train, y_train = x_train[: self.max_train], y_train[: self.max_train]
        train, val = split_indices(len(y_train), [1 - self.val_fraction, self.val_fraction], self.split_seed)
        return {"train": TensorDataset(x_train[train], y_train[train]),
                "val": TensorDataset(x_train[val], y_train[val]),
                "test": TensorDataset(x_test, y_test)}
