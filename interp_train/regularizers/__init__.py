"""Regularizers: loss-term plugins. See ``base.Regularizer`` for the API."""

from interp_train.regularizers.base import (
    NonFiniteRegularizerError,
    RegularizedLoss,
    Regularizer,
    RegularizerContext,
    apply_regularizers,
    regularized_loss,
)

__all__ = [
    "NonFiniteRegularizerError",
    "RegularizedLoss",
    "Regularizer",
    "RegularizerContext",
    "apply_regularizers",
    "regularized_loss",
]
