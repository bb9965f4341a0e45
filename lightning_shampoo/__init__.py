"""lightning_shampoo: Kronecker-factored second-order optimizers as a one-line change for Lightning."""

from .health import BlockHealth
from .optim import Shampoo
from .preconditioners import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    CoupledNewtonConfig,
    EigenConfig,
    EigendecomposedShampooPreconditionerConfig,
    EigenvalueCorrectedShampooPreconditionerConfig,
    EighEigendecompositionConfig,
    KLShampooPreconditionerConfig,
    NewtonSchulzOrthogonalizationConfig,
    PreconditionerConfig,
    QREigendecompositionConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
    SVDOrthogonalizationConfig,
)

__version__ = "0.1.0"

__all__ = [
    "AdaGradPreconditionerConfig",
    "AdamPreconditionerConfig",
    "BlockHealth",
    "CoupledNewtonConfig",
    "EigenConfig",
    "EigendecomposedShampooPreconditionerConfig",
    "EigenvalueCorrectedShampooPreconditionerConfig",
    "EighEigendecompositionConfig",
    "KLShampooPreconditionerConfig",
    "NewtonSchulzOrthogonalizationConfig",
    "PreconditionerConfig",
    "QREigendecompositionConfig",
    "RMSpropPreconditionerConfig",
    "RootInvShampooPreconditionerConfig",
    "SGDPreconditionerConfig",
    "SVDOrthogonalizationConfig",
    "Shampoo",
    "SignDescentPreconditionerConfig",
    "SpectralDescentPreconditionerConfig",
]
