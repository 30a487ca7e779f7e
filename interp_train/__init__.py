"""interp-train: regularizers that make a network's internals less arbitrary."""

from interp_train.lightning import RegularizedMixin, attach_regularizers
from interp_train.regularizers.base import (
    NonFiniteRegularizerError,
    RegularizedLoss,
    Regularizer,
    RegularizerContext,
    after_optimizer_step,
    regularized_loss,
)
from interp_train.schedules import Constant, Cosine, LinearWarmup

__all__ = [
    "Constant",
    "Cosine",
    "LinearWarmup",
    "NonFiniteRegularizerError",
    "RegularizedLoss",
    "RegularizedMixin",
    "Regularizer",
    "RegularizerContext",
    "after_optimizer_step",
    "attach_regularizers",
    "regularized_loss",
]
