"""Hard-concrete L0 relaxation (Louizos, Welling & Kingma 2018, "Learning sparse neural networks
through L0 regularization"), docs/DESIGN.md §6.4: the soft, learned counterpart of WeightSparsity.

Every selected weight entry W_ij is multiplied in the forward pass by a gate z_ij ∈ [0, 1] with its
own learned log α_ij. In training the gates are drawn from the hard-concrete distribution,

    u ~ U(0, 1),   s = sigmoid((log u − log(1 − u) + log α) / β),   s̄ = s (ζ − γ) + γ,
    z = min(1, max(0, s̄)),

(a binary concrete stretched to (γ, ζ) ⊃ [0, 1] and clipped, so z is exactly 0 or 1 with positive
probability, and differentiable in log α through s); at evaluation the gates are deterministic,
z = min(1, max(0, sigmoid(log α) (ζ − γ) + γ)) (Louizos et al.'s test-time estimator). The loss term
is the expected number of non-zero gates, as a fraction of the N selected entries,

    l0 = (1/N) Σ_ij P(z_ij ≠ 0) = (1/N) Σ_ij sigmoid(log α_ij − β log(−γ / ζ)),

which is differentiable in log α, does not depend on the batch (no per-example scale to
normalise) and lies in [0, 1] whatever the model's size. Defaults β = 2/3, γ = −0.1, ζ = 1.1 (the
paper's); log α starts at ``init_log_alpha`` = 2 (P(z ≠ 0) ≈ 0.97, evaluation gate ≈ 0.96), so a
model starts close to dense.

Mechanism: the gates are a ``torch.nn.utils.parametrize`` parametrization ``W ↦ W ⊙ z`` of each
selected weight (``HardConcreteGate``, holding log α), registered by ``attach(model)`` — which the
Lightning mixin calls when the regularizers are bound to the module (before any checkpoint is
loaded, so checkpoints and resumed runs carry ``…parametrizations.weight.original`` and ``….0.
log_alpha``); in a plain loop ``setup(model)`` attaches. The gates belong to the model: the
optimizer of the model's parameters trains log α (without weight decay and at the learning rate ×
``gate_lr_scale``: log α carries the attributes ``no_weight_decay`` and ``lr_scale``, which
``interp_train.param_groups`` turns into an optimizer group), ``model.eval()`` makes them
deterministic, and every later reader of ``module.weight`` (LIB, circuits, compare) sees the gated
weights. A gated model can be copied and pickled whole (``copy.deepcopy``, ``pickle``,
``torch.save(model)``, multiprocessing), which PyTorch refuses for parametrized modules by default
(``_picklable_parametrize.py``); a copy holds its own gates (log α still without weight decay and at
its learning-rate scale), and the copied regularizer trains those.

Density target (optional, ``target_density``): instead of a fixed weight, the penalty's weight is a
Lagrange multiplier λ ≥ 0 of the constraint "evaluation density ≤ target" (a proxy-Lagrangian:
Cotter et al. 2019; for L0 gates, Gallego-Posada et al. 2022, "Controlled sparsity via constrained
optimization"). The weights and gates minimise task loss + λ · l0 (the differentiable surrogate
above); after every optimizer step λ takes a step of dual ascent on the constraint as evaluated,

    λ ← λ + dual_lr · (density_eval − target)  while density_eval > target,   else λ ← 0,

density_eval being the share of selected entries whose evaluation gate is non-zero (what
``density`` reports and what a pruned model keeps). λ grows while the model is denser than the
target and is reset to 0 as soon as it is not ("dual restarts", Gallego-Posada et al.: the
constraint is an inequality, so a satisfied one exerts no pull); without the reset λ would first
have to unwind what it gathered on the way down, and Adam, which moves a gate by about its learning
rate whatever the size of a consistent gradient, keeps closing gates all that time (on modular
addition, target 0.4: 12-15 % non-zero at the end). So runs of different seeds end near the
same density instead of wherever a fixed weight leaves them. λ starts at ``weight`` (a number) and is saved with
the step in the regularizer's state (checkpoints, resume).

Selection as WeightSparsity: weight tensors (ndim ≥ 2) whose ``named_parameters()`` name matches
an fnmatch pattern of ``params``; embeddings and unembedding only with ``include_embeddings``; a
pattern that matches none raises a ValueError listing the candidates.
"""

from __future__ import annotations

import math
import weakref
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from interp_train.checks import check_number
from interp_train.regularizers._picklable_parametrize import make_picklable
from interp_train.regularizers.base import Regularizer, RegularizerContext
from interp_train.regularizers.weight_sparsity import _check_patterns, select_parameters
from interp_train.schedules import WeightLike

_U_EPS = 1e-6  # u is drawn from U(eps, 1 - eps): log u and log(1 - u) stay finite


class HardConcreteGate(nn.Module):
    """Parametrization W ↦ W ⊙ z with hard-concrete gates z (module docstring); one log α per entry."""

    def __init__(self, shape: Sequence[int], init_log_alpha: float, beta: float, gamma: float, zeta: float,
                 lr_scale: float = 1.0):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(tuple(shape), float(init_log_alpha)))
        self.beta, self.gamma, self.zeta, self.lr_scale = float(beta), float(gamma), float(zeta), float(lr_scale)
        self._mark()

    def _mark(self) -> None:
        # read by interp_train.param_groups when the optimizer is built
        self.log_alpha.no_weight_decay = True
        self.log_alpha.lr_scale = self.lr_scale

    def __setstate__(self, state) -> None:
        # copy.deepcopy rebuilds a Parameter without its Python attributes: mark log α again
        super().__setstate__(state)
        self.__dict__.setdefault("lr_scale", 1.0)  # pickled before lr_scale existed
        self._mark()

    def gates(self, sample: bool | None = None) -> torch.Tensor:
        """z: a draw when ``sample`` (default: in training mode), else the deterministic gate."""
        sample = self.training if sample is None else sample
        if sample:
            u = torch.rand_like(self.log_alpha).clamp(_U_EPS, 1 - _U_EPS)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """P(z ≠ 0) = sigmoid(log α − β log(−γ/ζ)), entrywise."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gates()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_alpha.shape)}, beta={self.beta:g}, gamma={self.gamma:g}, zeta={self.zeta:g}"


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, attr = name.rsplit(".", 1) if "." in name else ("", name)
    return model.get_submodule(path), attr


class HardConcreteL0(Regularizer):
    """Term ``l0``: the expected fraction of non-zero hard-concrete gates on the selected weights
    (module docstring); the gates multiply the weights in the forward pass once attached.

    Args:
        weight: the penalty's weight (number or Schedule).
        params, include_embeddings: the selection, as for WeightSparsity.
        init_log_alpha: starting log α of every gate.
        beta, gamma, zeta: temperature and stretch interval (γ < 0, ζ > 1).
        gate_lr_scale: log α trains at the optimizer's learning rate × this (> 0; RecipeModule and
            ``interp_train.param_groups``). Adam moves log α by about lr per step, so from the start
            at 2 a gate needs ~4.4 / (lr · gate_lr_scale) steps to close.
        target_density: in (0, 1): the weight becomes the multiplier λ of "evaluation density ≤
            target", starting at ``weight`` and updated after every optimizer step (module
            docstring); None (default): the fixed ``weight``.
        dual_lr: λ's step size per optimizer step and unit of density excess (> 0; with a target only).
    """

    def __init__(self, weight: WeightLike = 1e-2, params: Sequence[str] = ("*",), include_embeddings: bool = False,
                 init_log_alpha: float = 2.0, beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1,
                 gate_lr_scale: float = 1.0, target_density: float | None = None, dual_lr: float = 0.01,
                 name: str | None = None):
        if target_density is not None:
            if isinstance(target_density, bool) or not isinstance(target_density, (int, float)) \
                    or not 0 < target_density < 1:
                raise ValueError(f"target_density must be a number in (0, 1) (the share of gated entries left "
                                 f"non-zero at evaluation) or None, got {target_density!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                    or weight < 0:
                raise ValueError(f"with target_density, weight is the starting multiplier λ and must be a finite "
                                 f"number >= 0 (no schedule: λ follows the constraint), got {weight!r}")
            check_number(dual_lr, "dual_lr", positive=True)
        super().__init__(weight, name)
        self.target_density = None if target_density is None else float(target_density)
        self.dual_lr = float(dual_lr)
        self.multiplier = float(weight) if target_density is not None else None
        self.params = _check_patterns(params)
        self.include_embeddings = bool(include_embeddings)
        for label, value in (("init_log_alpha", init_log_alpha), ("beta", beta), ("gamma", gamma), ("zeta", zeta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{label} must be a finite number, got {value!r}")
        if beta <= 0:
            raise ValueError(f"beta (the concrete temperature) must be > 0, got {beta!r}")
        # log α's learning rate as a multiple of the optimizer's
        gate_lr_scale = check_number(gate_lr_scale, "gate_lr_scale", positive=True)
        if not (gamma < 0 and zeta > 1):
            raise ValueError(f"the stretch interval must contain [0, 1]: gamma < 0 < 1 < zeta, got gamma={gamma!r}, "
                             f"zeta={zeta!r}")
        self.init_log_alpha, self.beta, self.gamma, self.zeta = float(init_log_alpha), float(beta), float(gamma), \
            float(zeta)
        self.gate_lr_scale = float(gate_lr_scale)
        self._gates: list[tuple[str, HardConcreteGate]] | None = None
        # the model known to hold self._gates (a cache; a weak reference, since a freed model's id can be
        # reused by a new one; not pickled)
        self._holder: weakref.ref | None = None

    def __getstate__(self):
        # A copy (deepcopy / pickle of the model with its regularizers) holds the copied gates, which
        # belong to the copied model: forget the original model, _holds finds the copy.
        return {**super().__getstate__(), "_holder": None}

    def _holds(self, model: nn.Module) -> bool:
        """Whether ``model`` carries this regularizer's gates."""
        if self._gates is None:
            return False
        if self._holder is None or self._holder() is not model:
            gate = self._gates[0][1]
            if not any(m is gate for m in model.modules()):
                return False
            self._holder = weakref.ref(model)
        return True

    # ------------------------------------------------------------------ attaching the gates
    def attach(self, model: nn.Module) -> None:
        """Registers a HardConcreteGate on every selected weight of ``model`` (once per model)."""
        if self._holds(model):
            return
        gates = []
        seen: set[int] = set()
        for name, param in select_parameters(model, self.params, self.include_embeddings).items():
            if id(param) in seen or ".parametrizations." in name:  # listed twice; already gated (or a log α)
                continue
            seen.add(id(param))
            module, attr = _owner(model, name)
            gate = HardConcreteGate(param.shape, self.init_log_alpha, self.beta, self.gamma, self.zeta,
                                    self.gate_lr_scale)
            parametrize.register_parametrization(module, attr, gate.to(device=param.device, dtype=param.dtype))
            make_picklable(module)
            gates.append((name, gate))
        if not gates:
            raise ValueError(f"regularizer {self.name!r}: every weight matched by {list(self.params)} is already "
                             "gated (parametrized): by another regularizer, or this model is a copy of a gated "
                             "model; copy the model together with its regularizers (the LightningModule, or "
                             "copy.deepcopy((model, regularizer))) so that the copied regularizer holds the "
                             "copy's gates")
        self._gates, self._holder = gates, weakref.ref(model)

    def setup(self, model: nn.Module, datamodule=None) -> None:
        self.attach(model)

    def gates(self, model: nn.Module) -> list[tuple[str, HardConcreteGate]]:
        """(weight name, gate) pairs attached to ``model``."""
        if not self._holds(model):
            raise RuntimeError(f"regularizer {self.name!r} has no gates on this model: call reg.attach(model) (or "
                               "reg.setup(model)) before training; the Lightning mixin does so when the regularizers "
                               "are set")
        return self._gates

    @torch.no_grad()
    def density(self, model: nn.Module) -> float:
        """Fraction of selected entries whose evaluation gate is non-zero."""
        gates = [g for _, g in self.gates(model)]
        return sum(int((g.gates(sample=False) > 0).sum()) for g in gates) / sum(g.log_alpha.numel() for g in gates)

    # ------------------------------------------------------------------ the density target
    def current_weight(self) -> float:
        return self.schedule(self.step) if self.multiplier is None else self.multiplier

    def after_optimizer_step(self, model: nn.Module) -> None:
        """With a target density: one step of dual ascent on λ (module docstring)."""
        if self.target_density is not None:
            excess = self.density(model) - self.target_density
            self.multiplier = self.multiplier + self.dual_lr * excess if excess > 0 else 0.0

    def get_extra_state(self) -> dict:
        state = super().get_extra_state()
        if self.multiplier is not None:
            state["multiplier"] = self.multiplier
        return state

    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        if self.multiplier is not None and "multiplier" in state:
            self.multiplier = float(state["multiplier"])

    # ------------------------------------------------------------------ the loss term
    def expected_density(self, model: nn.Module) -> torch.Tensor:
        """The l0 term: mean P(z ≠ 0) over the selected entries (differentiable in log α)."""
        gates = [g for _, g in self.gates(model)]
        return sum(g.prob_nonzero().sum() for g in gates) / sum(g.log_alpha.numel() for g in gates)

    def terms(self, ctx: RegularizerContext) -> dict[str, torch.Tensor]:
        return {"l0": self.expected_density(ctx.model)}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, params={list(self.params)}, include_embeddings={self.include_embeddings}, "
                f"init_log_alpha={self.init_log_alpha:g}, beta={self.beta:g}, gamma={self.gamma:g}, "
                f"zeta={self.zeta:g}, gate_lr_scale={self.gate_lr_scale:g}"
                + ("" if self.target_density is None else
                   f", target_density={self.target_density:g}, dual_lr={self.dual_lr:g}, λ={self.multiplier:g}"))
