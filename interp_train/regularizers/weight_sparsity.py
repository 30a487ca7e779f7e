"""Weight sparsity (Gao et al. 2025, "Weight-sparse transformers have interpretable circuits"), docs/DESIGN.md §6.1.

Hard constraint, ``WeightSparsity``: after every optimizer step each selected weight tensor W
(n = numel(W) entries) keeps only its k largest-magnitude entries,

    W <- W ⊙ 1[|W| among the k(t) largest of |W|],   k(t) = max(1, round(d(t) · n)),

with the density d(t) annealed from 1 (dense) to the target density: by default linearly over the
first half of training, d(t) = 1 + (density − 1) · min(1, t / anneal_steps), t the number of
optimizer steps taken (``schedules.LinearWarmup(value=density, start=1, warmup_steps=anneal_steps)``;
pass any Schedule as ``density`` to choose another path). Ties at the k-th magnitude are broken
arbitrarily, so exactly k entries survive. The optimizer's state (e.g. Adam moments) is left alone:
a zeroed entry may regrow at the next step and compete again, as in Gao et al.

Soft variant, ``WeightL1``: the loss term ``l1 = (1/N) Σ_W Σ_ij |W_ij|`` over the same selection
(N the number of selected entries, so the weight does not scale with the model size).

Selection (both classes): parameters with at least two dimensions (weight matrices; biases and
LayerNorm gains stay dense) whose name in ``model.named_parameters()`` matches one of the fnmatch
patterns ``params`` (default ``"*"``: all of them). Embeddings (``nn.Embedding`` weights) and the
unembedding (a module path segment ``unembed`` or ``lm_head``) are excluded unless
``include_embeddings=True``; parameters of the regularizers themselves are never selected. Every
pattern must match at least one selected parameter, otherwise a ValueError lists the candidates.

Usage: in Lightning (``RecipeModule`` or ``attach_regularizers``) the projection runs after each
optimizer step by itself, and ``anneal_steps=None`` means half of ``trainer.max_steps``. In a plain
loop pass ``anneal_steps`` and call ``after_optimizer_step(model, regs)`` after ``optimizer.step()``.
"""

from __future__ import annotations

import fnmatch
import math
import weakref
from typing import Sequence

import torch
from torch import nn

from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.schedules import LinearWarmup, Schedule, WeightLike

UNEMBED_SEGMENTS = ("unembed", "lm_head")
_MAX_LISTED = 60


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not math.isfinite(density) \
            or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1] (the fraction of entries kept), got {density!r}")
    return float(density)


def _check_patterns(params) -> tuple[str, ...]:
    if isinstance(params, str):
        params = (params,)
    params = tuple(params)
    if not params or not all(isinstance(p, str) and p for p in params):
        raise ValueError(f"params must be a non-empty list of fnmatch patterns over parameter names, got {params!r}")
    return params


def _embedding_ids(model: nn.Module) -> set[int]:
    """ids of embedding and unembedding parameters: nn.Embedding weights, and the parameters of any
    submodule reachable as an attribute or path segment ``unembed``/``lm_head`` (TransformerLens
    bridges also list the unembedding under other names, e.g. ``head``)."""
    ids = set()
    for path, module in model.named_modules():
        unembed = [getattr(module, a, None) for a in UNEMBED_SEGMENTS]
        if isinstance(module, nn.Embedding) or any(s in UNEMBED_SEGMENTS for s in path.split(".")):
            unembed.append(module)
        ids.update(id(p) for sub in unembed if isinstance(sub, nn.Module) for p in sub.parameters())
    return ids


def _candidates(model: nn.Module, include_embeddings: bool) -> dict[str, nn.Parameter]:
    skip = {id(p) for m in model.modules() if isinstance(m, Regularizer) for p in m.parameters()}
    if not include_embeddings:
        skip |= _embedding_ids(model)
    return {name: p for name, p in model.named_parameters() if p.ndim >= 2 and id(p) not in skip}


def select_parameters(model: nn.Module, params: Sequence[str] = ("*",),
                      include_embeddings: bool = False) -> dict[str, nn.Parameter]:
    """{name: parameter} of the weight tensors (ndim >= 2) matching any fnmatch pattern in ``params``.

    Raises ValueError naming a pattern that matches none of them, with the candidates listed.
    """
    params = _check_patterns(params)
    candidates = _candidates(model, include_embeddings)
    selected: dict[str, nn.Parameter] = {}
    for pattern in params:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            names = list(candidates)
            shown = ", ".join(names[:_MAX_LISTED]) + (f", ... and {len(names) - _MAX_LISTED} more"
                                                       if len(names) > _MAX_LISTED else "")
            note = "" if include_embeddings else " (embeddings and unembedding need include_embeddings=True)"
            raise ValueError(f"parameter pattern {pattern!r} matches no weight tensor of {type(model).__name__}"
                             f"{note}; candidates: {shown or 'none'}")
        selected.update((n, candidates[n]) for n in hits)
    return selected


class PerModel:
    """A value computed for one model and reused while that same model is alive.

    Keyed by a weak reference, not by the model's id: CPython gives a new model the id of a freed
    one, and an id-keyed cache would then hand out the freed model's parameters. A copy (deepcopy,
    pickle) starts empty, so a copied regularizer recomputes for the copied model.
    """

    def __init__(self):
        self._model: weakref.ref | None = None
        self._value = None

    def get(self, model: nn.Module, compute):
        if self._model is None or self._model() is not model:
            self._value = compute()
            self._model = weakref.ref(model)
        return self._value

    def __getstate__(self):
        return {"_model": None, "_value": None}


def kept_count(numel: int, density: float) -> int:
    """k = max(1, round(density · numel))."""
    return max(1, min(numel, int(round(density * numel))))


@torch.no_grad()
def keep_top_k_(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Zeroes all but the k largest-magnitude entries of ``weight`` in place; returns it."""
    n = weight.numel()
    if k < n:
        flat = weight.view(-1) if weight.is_contiguous() else weight.reshape(-1)
        drop = torch.topk(flat.abs(), n - k, largest=False, sorted=False).indices
        flat[drop] = 0
        if not weight.is_contiguous():
            weight.copy_(flat.view_as(weight))
    return weight


class WeightSparsity(Regularizer):
    """Keeps the k(t) largest-magnitude entries of each selected weight tensor after every optimizer
    step (module docstring). No loss term.

    Args:
        density: target fraction of entries kept, in (0, 1]; or a Schedule of the optimizer step
            giving the density (values must stay in (0, 1]).
        anneal_steps: optimizer steps over which the density goes linearly from 1 to ``density``
            (0: sparse from the first step). None: half of ``trainer.max_steps`` (Lightning).
        params: fnmatch patterns over ``model.named_parameters()`` names (see module docstring).
        include_embeddings: also sparsify the embedding and unembedding matrices.
    """

    def __init__(self, density: float | Schedule = 0.1, anneal_steps: int | None = None,
                 params: Sequence[str] = ("*",), include_embeddings: bool = False, name: str | None = None):
        super().__init__(1.0, name)
        if isinstance(density, Schedule):
            self.density_schedule: Schedule | None = density
            self.target_density = None
        else:
            self.target_density = _check_density(density)
            self.density_schedule = None
        if anneal_steps is not None and (isinstance(anneal_steps, bool) or int(anneal_steps) != anneal_steps
                                         or anneal_steps < 0):
            raise ValueError(f"anneal_steps must be an integer >= 0 or None (half of training), got {anneal_steps!r}")
        self.anneal_steps = None if anneal_steps is None else int(anneal_steps)
        self.params = _check_patterns(params)
        self.include_embeddings = bool(include_embeddings)
        self.optimizer_steps = 0
        self._selected = PerModel()  # list[(name, parameter)] of the model last seen

    # ------------------------------------------------------------------ schedule
    def density(self, step: int | None = None) -> float:
        """d(t) after ``step`` optimizer steps (default: the steps taken so far)."""
        step = self.optimizer_steps if step is None else step
        if self.density_schedule is not None:
            return _check_density(self.density_schedule(step))
        if self.anneal_steps is None:
            raise ValueError("WeightSparsity does not know its anneal_steps: pass anneal_steps=... (in a plain loop) "
                             "or train with Lightning, where it defaults to half of trainer.max_steps")
        return LinearWarmup(value=self.target_density, warmup_steps=self.anneal_steps, start=1.0)(step)

    def setup(self, model: nn.Module, datamodule=None) -> None:
        self.selected(model)  # fail before training on a pattern that matches nothing
        if self.anneal_steps is None and self.density_schedule is None:
            trainer = getattr(model, "_trainer", None)
            max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
            if max_steps is None or max_steps < 0:
                max_steps = int(trainer.estimated_stepping_batches) if trainer is not None else -1
            if max_steps is None or max_steps < 0 or not math.isfinite(max_steps):
                raise ValueError("WeightSparsity(anneal_steps=None) anneals over half of training, but the trainer "
                                 "has no finite max_steps; pass anneal_steps=...")
            self.anneal_steps = int(max_steps) // 2

    # ------------------------------------------------------------------ projection
    def selected(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs this regularizer sparsifies in ``model`` (cached per model)."""
        return self._selected.get(
            model, lambda: list(select_parameters(model, self.params, self.include_embeddings).items()))

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        self.optimizer_steps += 1
        density = self.density()
        for _, weight in self.selected(model):
            keep_top_k_(weight.data, kept_count(weight.numel(), density))

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        return {}

    # ------------------------------------------------------------------ checkpoint state
    def get_extra_state(self) -> dict:
        return {**super().get_extra_state(), "optimizer_steps": self.optimizer_steps,
                "anneal_steps": self.anneal_steps}

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        if state.get("anneal_steps") is not None:
            self.anneal_steps = int(state["anneal_steps"])

    def extra_repr(self) -> str:
        target = self.density_schedule if self.density_schedule is not None else self.target_density
        return (f"name={self.name!r}, density={target!r}, anneal_steps={self.anneal_steps}, params={list(self.params)}, "
                f"include_embeddings={self.include_embeddings}, optimizer_steps={self.optimizer_steps}")


class WeightL1(Regularizer):
    """Term ``l1`` = mean |W_ij| over the entries of the selected weight tensors (module docstring):
    the soft, differentiable counterpart of ``WeightSparsity``; reads no activations."""

    def __init__(self, weight: WeightLike = 1e-3, params: Sequence[str] = ("*",), include_embeddings: bool = False,
                 name: str | None = None):
        super().__init__(weight, name)
        self.params = _check_patterns(params)
        self.include_embeddings = bool(include_embeddings)

        self._selected = PerModel()  # list[parameter] of the model last seen

    def selected(self, model: nn.Module) -> list[nn.Parameter]:
        return self._selected.get(
            model, lambda: list(select_parameters(model, self.params, self.include_embeddings).values()))

    def setup(self, model: nn.Module, datamodule=None) -> None:
        self.selected(model)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        weights = self.selected(ctx.model)
        total = sum(w.abs().sum() for w in weights)
        return {"l1": total / sum(w.numel() for w in weights)}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, params={list(self.params)}, include_embeddings={self.include_embeddings}"
