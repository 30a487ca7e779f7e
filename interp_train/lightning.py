"""Attach regularizers to any LightningModule without touching its ``training_step``.

    model = MyLitModule(...)
    attach_regularizers(model, [GradientNorm(weight=0.1), NoisePenalty(weight=1.0, sigma=0.1)])
    Trainer(...).fit(model, datamodule)

``attach_regularizers`` makes the module an instance of a subclass that mixes in
:class:`RegularizedMixin` (same attributes, same hooks). Its ``training_step`` calls the original
one for the task loss, then adds the weighted regularizer terms and logs, under ``train/``,
the raw task loss, every unweighted term, every weighted term, every weight and the total
(``reg/task_loss``, ``reg/<name>/<term>``, ``reg/<name>/<term>_weighted``, ``reg/<name>/weight``,
``reg/total_loss``).
Regularizers are registered as the submodule ``regularizers``, so their schedule state is part
of the module's checkpoint. Equivalently, subclass: ``class Mine(RegularizedMixin, MyLitModule)``
and call ``self.set_regularizers(...)`` in ``__init__``.

One forward pass per step: a regularizer that reads activations records them on the clean forward
pass of its ``RegularizerContext``. If the ``training_step`` computes the task loss on its own
``self(x)``, the step pays a second forward and backward pass. To share one, compute the task
loss from ``output = self.regularizer_forward(batch)`` instead (``RecipeModule`` does so unless
``shared_forward=False``): that output *is* the context's clean pass, which the terms then reuse.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from interp_train.losses import per_example_cross_entropy
from interp_train.regularizers.base import (
    LossFn,
    Regularizer,
    RegularizerContext,
    after_optimizer_step,
    apply_regularizers,
    declared_sites,
)
from interp_train.sites import check_sites

LOG_PREFIX = "reg"
BatchFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor, Mapping[str, Any]]]


def default_batch_fn(batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(inputs, targets, extras) from a batch ``(x, y, *rest)`` or a dict with x/y (or input/target)."""
    if isinstance(batch, Mapping):
        for xk, yk in (("x", "y"), ("input", "target"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk], {k: v for k, v in batch.items() if k not in (xk, yk)}
        raise KeyError(f"cannot find inputs/targets in a batch with keys {sorted(batch)}; pass batch_fn=...")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        extras = {f"extra{i}": v for i, v in enumerate(batch[2:])}
        if len(batch) >= 3:
            extras["latents"] = batch[2]
        return batch[0], batch[1], extras
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into (inputs, targets); pass batch_fn=...")


class RegularizedMixin:
    """Mixin for a LightningModule: adds regularizer terms to the loss its training_step returns."""

    regularizers: nn.ModuleList

    def set_regularizers(
        self,
        regularizers: Sequence[Regularizer],
        loss_fn: LossFn = per_example_cross_entropy,
        batch_fn: BatchFn = default_batch_fn,
    ) -> None:
        for reg in regularizers:
            if not isinstance(reg, Regularizer):
                raise TypeError(f"expected Regularizer instances, got {type(reg).__name__}")
        check_sites(self, declared_sites(regularizers))
        self.regularizers = nn.ModuleList(regularizers)
        for reg in regularizers:  # e.g. gates in the forward pass: part of the module before weights are loaded
            reg.attach(self)
        self._regularizer_loss_fn = loss_fn
        self._regularizer_batch_fn = batch_fn

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            for reg in getattr(self, "regularizers", []):
                reg.setup(self, datamodule)

    def optimizer_step(self, *args, **kwargs):
        # Weight-space regularizers (WeightSparsity) act on the weights right after each step.
        out = super().optimizer_step(*args, **kwargs)
        after_optimizer_step(self, getattr(self, "regularizers", []))
        return out

    def __init_subclass__(cls, **kwargs):
        # A subclass that writes its own training_step (class M(RegularizedMixin, LightningModule))
        # would shadow the mixin's; wrap it so the regularizers still apply.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("training_step")
        if own is not None and not getattr(own, "_adds_regularizers", False):
            cls.training_step = _regularizing(own)

    def training_step(self, batch, *args, **kwargs):
        return super().training_step(batch, *args, **kwargs)

    def regularizer_forward(self, batch) -> torch.Tensor:
        """The model's output on the batch's inputs, for a ``training_step`` to compute its task loss
        from: with regularizers it is their context's clean forward pass (activations recorded at
        their sites), so the terms added after the step reuse it instead of running a second pass."""
        # set_regularizers, which sets the batch_fn, may not have been called yet
        inputs, targets, extras = getattr(self, "_regularizer_batch_fn", default_batch_fn)(batch)
        regs = list(getattr(self, "regularizers", []))
        if not regs:
            return self(inputs)
        ctx = self._regularizer_context(inputs, targets, extras, regs)
        self._step_context = (batch, ctx)
        return ctx.clean().output

    def _regularizer_context(self, inputs, targets, extras, regs) -> RegularizerContext:
        return RegularizerContext(self, inputs, targets, loss_fn=self._regularizer_loss_fn, extras=extras,
                                  sites=declared_sites(regs), step=int(self.global_step))

    def _add_regularizer_terms(self, batch, out):
        regs = list(getattr(self, "regularizers", []))
        shared, self._step_context = getattr(self, "_step_context", None), None
        if not regs:
            return out
        task_loss = out["loss"] if isinstance(out, Mapping) else out
        if not isinstance(task_loss, torch.Tensor):
            raise TypeError("training_step must return the loss tensor (or a dict with 'loss') to be regularized")
        if shared is not None and shared[0] is batch:
            ctx = shared[1]
        else:
            ctx = self._regularizer_context(*self._regularizer_batch_fn(batch), regs)
        result = apply_regularizers(ctx, regs, task_loss, advance=True)
        logs = result.logs()
        # Own namespace: the user's training_step may already log e.g. "train/loss".
        self.log(f"{LOG_PREFIX}/total_loss", logs.pop("loss"), prog_bar=True)
        self.log_dict({f"{LOG_PREFIX}/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        if isinstance(out, Mapping):
            return {**out, "loss": result.total}
        return result.total


def _regularizing(training_step):
    """Wraps a training_step so that the outermost call adds the regularizer terms exactly once
    (a training_step that calls super().training_step is wrapped at every level)."""

    @functools.wraps(training_step)
    def wrapped(self, batch, *args, **kwargs):
        depth = getattr(self, "_regularizer_call_depth", 0)
        if depth == 0:  # a context left by a step that raised must not serve the next batch
            self._step_context = None
        self._regularizer_call_depth = depth + 1
        try:
            out = training_step(self, batch, *args, **kwargs)
        finally:
            self._regularizer_call_depth = depth
        return self._add_regularizer_terms(batch, out) if depth == 0 else out

    wrapped._adds_regularizers = True
    return wrapped


RegularizedMixin.training_step = _regularizing(RegularizedMixin.training_step)

_MIXED: dict[type, type] = {}


def regularized_class(cls: type) -> type:
    """The subclass ``Regularized<cls>`` of ``(RegularizedMixin, cls)``, created once per class."""
    if issubclass(cls, RegularizedMixin):
        return cls
    if cls not in _MIXED:
        _MIXED[cls] = type(f"Regularized{cls.__name__}", (RegularizedMixin, cls), {"__module__": cls.__module__})
    return _MIXED[cls]


def attach_regularizers(
    module,
    regularizers: Sequence[Regularizer],
    loss_fn: LossFn = per_example_cross_entropy,
    batch_fn: BatchFn = default_batch_fn,
):
    """Adds ``regularizers`` to an existing LightningModule in place and returns it.

    loss_fn: per-example task loss used by regularizers that need one (``(output, y) -> (B,)``).
    batch_fn: splits a batch into (inputs, targets, extras); default handles (x, y, *rest) and dicts.
    The module is called as ``module(inputs)``, so it must define ``forward``.
    """
    module.__class__ = regularized_class(type(module))
    module.set_regularizers(regularizers, loss_fn=loss_fn, batch_fn=batch_fn)
    return module
