"""lightning_shampoo: Kronecker-factored second-order optimizers as a one-line change for Lightning."""

from ._safe_globals import register_safe_globals
from .averaging import ClassicMomentumConfig, GeneralizedPrimalAveragingConfig, ScheduleFreeConfig
from .callbacks import (
    IterateAveragingSwitch,
    PreconditionerHealthMonitor,
    PreconditionFrequencyScheduler,
    SGDFallback,
    ShampooCallback,
)
from .compat import WeightDecayType
from .configure import configure_shampoo
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
    PSGDKronPreconditionerConfig,
    PSGDUpdateProbabilitySchedule,
    QREigendecompositionConfig,
    RMSpropPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    SGDPreconditionerConfig,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditionerConfig,
    SVDOrthogonalizationConfig,
)
from .pt2 import ShampooPT2CompileConfig
from .strategies import ShampooDDPStrategy, ShampooFSDPStrategy

register_safe_globals()  # callbacks that save param groups whole stay weights_only-loadable

__version__ = "0.1.0"

__all__ = [
    "AdaGradPreconditionerConfig",
    "AdamPreconditionerConfig",
    "BlockHealth",
    "ClassicMomentumConfig",
    "CoupledNewtonConfig",
    "EigenConfig",
    "EigendecomposedShampooPreconditionerConfig",
    "EigenvalueCorrectedShampooPreconditionerConfig",
    "EighEigendecompositionConfig",
    "GeneralizedPrimalAveragingConfig",
    "IterateAveragingSwitch",
    "KLShampooPreconditionerConfig",
    "NewtonSchulzOrthogonalizationConfig",
    "PSGDKronPreconditionerConfig",
    "PSGDUpdateProbabilitySchedule",
    "PreconditionFrequencyScheduler",
    "PreconditionerConfig",
    "PreconditionerHealthMonitor",
    "QREigendecompositionConfig",
    "RMSpropPreconditionerConfig",
    "RootInvShampooPreconditionerConfig",
    "SGDFallback",
    "SGDPreconditionerConfig",
    "SVDOrthogonalizationConfig",
    "ScheduleFreeConfig",
    "Shampoo",
    "ShampooCallback",
    "ShampooDDPStrategy",
    "ShampooFSDPStrategy",
    "ShampooPT2CompileConfig",
    "SignDescentPreconditionerConfig",
    "SpectralDescentPreconditionerConfig",
    "WeightDecayType",
    "configure_shampoo",
]
