"""Regularizers: loss-term plugins. See ``base.Regularizer`` for the API.

Families (formulas in each class docstring and in docs/DESIGN.md §3):
* smoothness: GradientNorm, FiniteDifferenceGradientNorm, JacobianNorm, NoisePenalty,
  RandomizedSmoothing, PGDAdversarial
* manifold: OffManifoldNoisePenalty, OffManifoldGradientPenalty (tangent spaces from
  ``interp_train.tangents``)
* degeneracy: ActivationDegeneracy, GradientDegeneracy, FiringPatternDegeneracy
* interaction: InteractionSparsity; connection cost: ConnectionCost (+ NeuronSwapCallback)
* activation sparsity: ActivationSparsity (scale-free L1/L2 of each example's centred activations)
* weight sparsity: WeightSparsity (top-k projection after each optimizer step), WeightL1,
  HardConcreteL0 (learned hard-concrete gates on the weights, expected-L0 term)
"""

from interp_train.regularizers.base import (
    NonFiniteRegularizerError,
    RegularizedLoss,
    Regularizer,
    RegularizerContext,
    after_optimizer_step,
    apply_regularizers,
    regularized_loss,
)
from interp_train.regularizers.activation_sparsity import ActivationSparsity
from interp_train.regularizers.connection_cost import ConnectionCost
from interp_train.regularizers.hard_concrete import HardConcreteL0
from interp_train.regularizers.degeneracy import ActivationDegeneracy, FiringPatternDegeneracy, GradientDegeneracy
from interp_train.regularizers.interaction import InteractionSparsity
from interp_train.regularizers.manifold import OffManifoldGradientPenalty, OffManifoldNoisePenalty
from interp_train.regularizers.weight_sparsity import WeightL1, WeightSparsity
from interp_train.regularizers.smoothness import (
    FiniteDifferenceGradientNorm,
    GradientNorm,
    JacobianNorm,
    NoisePenalty,
    PGDAdversarial,
    RandomizedSmoothing,
)

__all__ = [
    "ActivationDegeneracy",
    "ActivationSparsity",
    "ConnectionCost",
    "FiniteDifferenceGradientNorm",
    "FiringPatternDegeneracy",
    "GradientDegeneracy",
    "GradientNorm",
    "HardConcreteL0",
    "InteractionSparsity",
    "JacobianNorm",
    "NoisePenalty",
    "NonFiniteRegularizerError",
    "OffManifoldGradientPenalty",
    "OffManifoldNoisePenalty",
    "PGDAdversarial",
    "RandomizedSmoothing",
    "RegularizedLoss",
    "Regularizer",
    "RegularizerContext",
    "WeightL1",
    "WeightSparsity",
    "after_optimizer_step",
    "apply_regularizers",
    "regularized_loss",
]
