"""The regularizer plugin API.

A regularizer is an ``nn.Module`` with a ``name``, a ``weight`` (a number or a
:class:`~interp_train.schedules.Schedule`) and one method, ``terms(ctx)``, that returns named,
*unweighted* scalar loss terms for a batch. The total loss is

    total = task_loss + sum_r w_r(step) * sum_t terms_r[t]

(regularizers with ``replaces_task_loss = True``, such as adversarial training, drop the clean
task loss from the total; it is still logged). The training step of each regularizer is kept
in its ``extra_state``, so it is saved in and restored from (Lightning) checkpoints.

Regularizers that act on the weights instead of the loss (``WeightSparsity``) implement
``after_optimizer_step(model)``, which runs after every optimizer step; regularizers that change
the model's forward pass (``HardConcreteL0``'s gates) implement ``attach(model)``, which runs when
they are bound to the model, before its weights are loaded.

Two ways to use regularizers:
* plain PyTorch: ``out = regularized_loss(model, x, y, regs); out.total.backward(); opt.step();
  after_optimizer_step(model, regs)``
* Lightning: ``attach_regularizers(lit_module, regs)`` (see ``interp_train.lightning``); the
  after-step hook is called by the module's ``optimizer_step``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from interp_train.losses import per_example_cross_entropy
from interp_train.schedules import Schedule, WeightLike, as_schedule
from interp_train.sites import Edit, ForwardResult, check_sites, run_model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteRegularizerError(FloatingPointError):
    """A regularizer produced a NaN or infinite term."""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class RegularizerContext:
    """Everything a regularizer may need for one batch.

    model: the module that is called as ``model(inputs)``.
    inputs, targets: the batch; ``extras`` holds further batch entries (e.g. manifold latents).
    loss_fn: per-example loss, ``loss_fn(output, targets) -> (B,)``.
    step: the training step (for logging and error messages).

    ``clean()`` is the unperturbed forward pass, shared by all regularizers of a step: it records
    every site any regularizer declared (the input is made to require grad), so gradients with
    respect to them come from one forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss_fn: LossFn = per_example_cross_entropy,
        extras: Mapping[str, Any] | None = None,
        sites: Iterable[str] = (),
        step: int = 0,
    ):
        self.model = model
        self.inputs = inputs
        self.targets = targets
        self.loss_fn = loss_fn
        self.extras = dict(extras or {})
        self.sites = list(dict.fromkeys(sites))
        self.step = step
        self._clean: ForwardResult | None = None

    def clean(self) -> ForwardResult:
        """The clean forward pass (cached) with activations at all declared sites."""
        if self._clean is None:
            self._clean = run_model(self.model, self.inputs, record=self.sites, input_requires_grad=True)
        return self._clean

    def set_clean(self, result: ForwardResult) -> None:
        self._clean = result

    def activation(self, site: str) -> torch.Tensor:
        """The clean activation at ``site`` (part of the graph)."""
        result = self.clean()
        if site not in result.activations:
            raise KeyError(f"site {site!r} was not declared by any regularizer (declared: {self.sites})")
        return result.activations[site]

    def run(self, edit: Mapping[str, Edit] | None = None, record: Iterable[str] = ()) -> ForwardResult:
        """A new forward pass with the given activations replaced (see ``sites.run_model``)."""
        return run_model(self.model, self.inputs, record=record, edit=edit)

    def per_example_loss(self, output: torch.Tensor) -> torch.Tensor:
        losses = self.loss_fn(output, self.targets)
        if losses.ndim != 1 or losses.shape[0] != self.batch_size:
            raise ValueError(
                f"loss_fn must return one loss per example, shape ({self.batch_size},), got {tuple(losses.shape)}"
            )
        return losses

    @property
    def batch_size(self) -> int:
        return int(self.inputs.shape[0])


class Regularizer(nn.Module):
    """Base class. Subclasses implement ``terms(ctx) -> {term_name: unweighted scalar}``.

    Args:
        weight: a number >= 0 or a Schedule (Constant, LinearWarmup, Cosine) of the step.
        name: the prefix of the logged terms; defaults to the class name in snake case.
    """

    replaces_task_loss: bool = False
    # True for a term that is one statistic of all rows of the batch (e.g. an effective rank), not a
    # mean over examples: such a regularizer passes its rows through ``batch_rows`` first.
    batch_statistic: bool = False

    def __init__(self, weight: WeightLike = 1.0, name: str | None = None):
        super().__init__()
        self.schedule: Schedule = as_schedule(weight)
        self.name = name or _snake(type(self).__name__)
        self.step = 0
        # hook applied to the rows of a batch statistic (rows -> rows); None: the rows themselves.
        # interp_train.distributed.global_batch sets it to the all-gather over DDP ranks.
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows a batch statistic is computed from: ``self.gather(rows)`` when the hook is set, else ``rows``."""
        return rows if self.gather is None else self.gather(rows)

    @property
    def sites(self) -> tuple[str, ...]:
        """Sites whose clean activations this regularizer reads from ``ctx.clean()``."""
        site = getattr(self, "at", None)
        return (site,) if isinstance(site, str) else tuple(site or ())

    def current_weight(self) -> float:
        return self.schedule(self.step)

    def attach(self, model: nn.Module) -> None:
        """Called when the regularizer is bound to ``model`` (the Lightning mixin's ``set_regularizers``,
        i.e. when the module is built, before any checkpoint is loaded), for regularizers that change
        the model itself (HardConcreteL0's gates); must be idempotent. Default: nothing."""

    def setup(self, model: nn.Module, datamodule: Any = None) -> None:
        """Called once before training (Lightning: in ``setup('fit')``); e.g. to fit tangent
        spaces from the datamodule's training data. Default: nothing."""

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Called after every optimizer step with the model being trained (e.g. to project the
        weights onto a constraint set). Default: nothing."""

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.schedule!r}, step={self.step}"


@dataclass
class RegularizedLoss:
    """Result of one regularized step: ``total`` to backpropagate, and everything to log."""

    total: torch.Tensor
    task_loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def logs(self) -> dict[str, float]:
        """Flat dict for loggers: task_loss, each raw term, each weighted term, each weight, total."""
        out = {"task_loss": float(self.task_loss.detach()), "loss": float(self.total.detach())}
        for key, value in self.terms.items():
            reg = key.split("/")[0]
            out[key] = float(value.detach())
            out[f"{key}_weighted"] = self.weights[reg] * float(value.detach())
        for reg, w in self.weights.items():
            out[f"{reg}/weight"] = w
        return out


def _check_unique_names(regularizers: Sequence[Regularizer]) -> None:
    names = [r.name for r in regularizers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"regularizer names must be unique, got duplicates {dupes}; pass name=... to tell them apart")


def apply_regularizers(
    ctx: RegularizerContext,
    regularizers: Sequence[Regularizer],
    task_loss: torch.Tensor,
    advance: bool = True,
) -> RegularizedLoss:
    """Adds every regularizer's weighted terms to ``task_loss``.

    Regularizers whose current weight is 0 are skipped (no compute). Raises
    NonFiniteRegularizerError naming the regularizer, term and step on a NaN/inf term.
    ``advance``: increment each regularizer's step afterwards (training steps only).
    """
    _check_unique_names(regularizers)
    replaced = any(r.replaces_task_loss and r.current_weight() > 0 for r in regularizers)
    total = task_loss.new_zeros(()) if replaced else task_loss
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for reg in regularizers:
        weight = reg.current_weight()
        weights[reg.name] = weight
        if weight > 0:
            for term_name, value in reg.terms(ctx).items():
                if value.ndim != 0:
                    raise ValueError(f"regularizer {reg.name!r} term {term_name!r} must be a scalar, got shape {tuple(value.shape)}")
                if not torch.isfinite(value):
                    raise NonFiniteRegularizerError(
                        f"regularizer {reg.name!r} produced a non-finite term {term_name!r} = {float(value)} "
                        f"at step {reg.step}"
                    )
                terms[f"{reg.name}/{term_name}"] = value
                total = total + weight * value
        if advance:
            reg.step += 1
    return RegularizedLoss(total=total, task_loss=task_loss, terms=terms, weights=weights)


def after_optimizer_step(model: nn.Module, regularizers: Iterable[Regularizer]) -> None:
    """Runs every regularizer's ``after_optimizer_step(model)``; call it right after ``optimizer.step()``
    in a plain loop (Lightning modules with attached regularizers do it themselves)."""
    for reg in regularizers:
        reg.after_optimizer_step(model)


def declared_sites(regularizers: Iterable[Regularizer]) -> list[str]:
    return list(dict.fromkeys(s for r in regularizers for s in r.sites))


def regularized_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    regularizers: Sequence[Regularizer],
    loss_fn: LossFn = per_example_cross_entropy,
    extras: Mapping[str, Any] | None = None,
    advance: bool | None = None,
) -> RegularizedLoss:
    """The whole regularized loss for a plain PyTorch loop, in one call.

    Runs the clean forward pass once (shared by the task loss and the regularizers), computes
    the mean task loss ``loss_fn(model(inputs), targets).mean()`` and adds the weighted terms.
    ``advance`` defaults to ``model.training``.

        out = regularized_loss(model, x, y, [GradientNorm(weight=0.1)])
        out.total.backward(); optimizer.step()
    """
    sites = declared_sites(regularizers)
    check_sites(model, sites)
    ctx = RegularizerContext(model, inputs, targets, loss_fn=loss_fn, extras=extras, sites=sites,
                             step=regularizers[0].step if regularizers else 0)
    task_loss = ctx.per_example_loss(ctx.clean().output).mean()
    return apply_regularizers(ctx, regularizers, task_loss, advance=model.training if advance is None else advance)
