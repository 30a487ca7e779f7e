"""The recipe LightningModule, the shared data-module base, and ``load_recipe``.

A *recipe* is a data module + a model + YAML variants (``recipes/<task>/<variant>.yaml``) trained
by ``interp-train fit``. :class:`RecipeModule` wraps any ``nn.Module`` (built by jsonargparse from
its ``class_path``) and any number of regularizers; the task loss is the mean per-example
cross-entropy ``L = (1/B) sum_i l(f(x_i), y_i)`` (see ``interp_train.losses``), to which
:class:`~interp_train.lightning.RegularizedMixin` adds ``sum_r w_r(step) * sum_t terms_r[t]``.

A trained run directory holds ``config.yaml`` (the resolved config), ``checkpoints/last.ckpt``
and ``metrics.json``; ``load_recipe(run_dir)`` rebuilds module and data module from them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional, Sequence

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from interp_train.lightning import RegularizedMixin
from interp_train.losses import _align, per_example_cross_entropy
from interp_train.param_groups import param_groups
from interp_train.regularizers.base import Regularizer

OPTIMIZERS = ("adamw", "adam", "sgd")


def accuracy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of (example, position) pairs whose argmax logit is the target.

    Same output/target conventions as ``per_example_cross_entropy``: (B, C) with (B,),
    (B, T, C) with (B, T), or (B, T, C) with (B,) read at the last position.
    """
    logits, tgt = _align(output, targets)
    return (logits.argmax(-1) == tgt).float().mean()


class ClassifierModule(L.LightningModule):
    """Task part of a recipe: cross-entropy training of ``model``, loss/accuracy logging, optimizer.

    (RecipeModule puts RegularizedMixin in front of it, whose ``training_step`` wraps this one.)
    """

    def __init__(self, model: nn.Module, optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.0, lr_warmup_steps: int = 0):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {lr_warmup_steps!r}")
        self.model = model
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.betas = tuple(float(b) for b in betas)
        self.momentum = float(momentum)
        self.lr_warmup_steps = int(lr_warmup_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss_and_accuracy(self, batch, output: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y = batch[1]
        output = self(batch[0]) if output is None else output
        return per_example_cross_entropy(output, y).mean(), accuracy(output.detach(), y)

    def _training_output(self, batch) -> torch.Tensor | None:
        return None

    def training_step(self, batch, batch_idx):
        loss, acc = self._loss_and_accuracy(batch, self._training_output(batch))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss_and_accuracy(batch)
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/acc", acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        loss, acc = self._loss_and_accuracy(batch)
        self.log("test/loss", loss)
        self.log("test/acc", acc)

    def configure_optimizers(self):
        # HardConcreteL0's log α: no weight decay, its own learning rate (interp_train.param_groups)
        params = param_groups(self.model.parameters(), self.lr, self.weight_decay)
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        if self.lr_warmup_steps == 0:
            return opt
        warm = self.lr_warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecipeModule(RegularizedMixin, ClassifierModule):
    """A classifier ``model`` trained with cross-entropy plus ``regularizers``.

    Args:
        model: any module mapping a batch's inputs to logits (configure it with ``class_path``).
        regularizers: Regularizer instances (each with its weight schedule); several at once.
        optimizer: "adamw", "adam" or "sgd".
        lr, weight_decay, betas, momentum: optimizer settings (betas for Adam(W), momentum for SGD).
        lr_warmup_steps: the learning rate rises linearly from lr/lr_warmup_steps to lr over this
            many steps (0: constant lr).
        shared_forward: compute the task loss on the regularizers' clean forward pass
            (``regularizer_forward``), one forward and backward pass per step; False: on a forward
            pass of its own, as every run trained up to 2026-12-04 did (the regularizers that read
            activations then pay a second pass; the gradients agree up to floating-point rounding).
    """

    def __init__(
        self,
        model: nn.Module,
        regularizers: Optional[list[Regularizer]] = None,
        optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        momentum: float = 0.0,
        lr_warmup_steps: int = 0,
        shared_forward: bool = True,
    ):
        ClassifierModule.__init__(self, model, optimizer, lr, weight_decay, betas, momentum, lr_warmup_steps)
        self.set_regularizers(list(regularizers or []))
        self.shared_forward = bool(shared_forward)

    def _training_output(self, batch) -> torch.Tensor | None:
        return self.regularizer_forward(batch) if self.shared_forward and len(self.regularizers) else None


class SplitDataModule(L.LightningDataModule):
    """Base for the recipe data modules: in-memory train/val/test ``TensorDataset`` splits.

    Subclasses set ``task`` and implement ``build() -> {"train": ds, "val": ds, "test": ds}``.
    ``batch_size=None`` means full batch (the whole split in one batch).
    """

    task: str = "unnamed"

    def __init__(self, batch_size: Optional[int] = 64, num_workers: int = 0, eval_batch_size: Optional[int] = None):
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (full batch), got {batch_size!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] | None = None

    def build(self) -> dict[str, TensorDataset]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, TensorDataset]:
        if self._splits is None:
            self._splits = self.build()
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        self.splits  # noqa: B018 - builds once

    def train_inputs(self) -> torch.Tensor:
        """All training inputs, (N, ...)."""
        return self.splits["train"].tensors[0]

    def _loader(self, split: str, batch_size: Optional[int], shuffle: bool) -> DataLoader:
        ds = self.splits[split]
        bs = len(ds) if batch_size is None else min(batch_size, len(ds))
        return DataLoader(ds, batch_size=bs, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size or self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size or self.batch_size, shuffle=False)


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[torch.Tensor]:
    """A seeded random partition of range(n) into parts of sizes round(f * n) (last part: the rest)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for f in fractions[:-1]:
        size = int(round(f * n))
        parts.append(perm[start:start + size])
        start += size
    parts.append(perm[start:])
    return parts


# ----------------------------------------------------------------------------- reloading


def find_run_files(path: str | Path) -> tuple[Path, Path]:
    """(config.yaml, checkpoint) for a run directory or a checkpoint file inside one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run directory or checkpoint at {str(path)!r}")
    if path.is_dir():
        run_dir = path
        candidates = [run_dir / "checkpoints" / "last.ckpt", *sorted((run_dir / "checkpoints").glob("*.ckpt"))]
        ckpt = next((c for c in candidates if c.is_file()), None)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint (*.ckpt) under {str(run_dir / 'checkpoints')!r}")
    else:
        ckpt, run_dir = path, path.parent
    for directory in [run_dir, *run_dir.parents][:3]:
        if (directory / "config.yaml").is_file():
            return directory / "config.yaml", ckpt
    raise FileNotFoundError(f"no config.yaml next to {str(path)!r} (looked in {str(run_dir)!r} and its parents)")


def _recipe_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RecipeModule, "model")
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    return parser


def load_recipe(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[RecipeModule, L.LightningDataModule]:
    """(module, datamodule) of a trained recipe, in one call, from its run dir or checkpoint file.

    Reads the resolved ``config.yaml`` saved next to the checkpoint (no need to re-type the
    config), builds the model, regularizers and data module, and loads the checkpoint's weights
    (and regularizer schedule state). The module is returned in eval mode.
    """
    import yaml

    config_file, ckpt = find_run_files(path)
    with open(config_file) as fh:
        raw = yaml.safe_load(fh)
    parser = _recipe_parser()
    cfg = parser.parse_object({"model": raw["model"], "data": raw["data"]})
    init = parser.instantiate_classes(cfg)
    module = RecipeModule(**vars(init.model)) if not isinstance(init.model, RecipeModule) else init.model
    state = torch.load(ckpt, map_location=map_location, weights_only=False)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as err:  # size mismatch / missing or unexpected keys
        details = "; ".join(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        raise ValueError(f"the weights in {str(ckpt)!r} do not fit the model that {str(config_file)!r} describes "
                         f"(was the config edited, or the checkpoint copied from another run?): {details}") from None
    module.eval()
    return module, init.data
