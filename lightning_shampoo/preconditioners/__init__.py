"""Preconditioner families: one module each, a frozen config plus a per-bucket kernel."""

from __future__ import annotations

from .amortized import (
    CoupledNewtonConfig,
    EigenConfig,
    EighEigendecompositionConfig,
    QREigendecompositionConfig,
)
from .base import Context, Preconditioner, PreconditionerConfig, RefreshResult
from .descent import (
    NewtonSchulzOrthogonalizationConfig,
    SignDescentPreconditioner,
    SignDescentPreconditionerConfig,
    SpectralDescentPreconditioner,
    SpectralDescentPreconditionerConfig,
    SVDOrthogonalizationConfig,
)
from .diagonal import (
    AdaGradPreconditionerConfig,
    AdamPreconditionerConfig,
    DiagonalPreconditioner,
    RMSpropPreconditionerConfig,
    SGDPreconditionerConfig,
)
from .psgd_kron import (
    PSGDKronPreconditioner,
    PSGDKronPreconditionerConfig,
    PSGDUpdateProbabilitySchedule,
)
from .shampoo import (
    EigendecomposedShampooPreconditionerConfig,
    KLShampooPreconditioner,
    KLShampooPreconditionerConfig,
    RootInvShampooPreconditionerConfig,
    ShampooPreconditioner,
)
from .soap import EigenvalueCorrectedShampooPreconditionerConfig, SOAPPreconditioner

__all__ = [
    "GRAFTING_CONFIGS",
    "AdaGradPreconditionerConfig",
    "AdamPreconditionerConfig",
    "Context",
    "CoupledNewtonConfig",
    "EigenConfig",
    "EigendecomposedShampooPreconditionerConfig",
    "EigenvalueCorrectedShampooPreconditionerConfig",
    "EighEigendecompositionConfig",
    "KLShampooPreconditionerConfig",
    "NewtonSchulzOrthogonalizationConfig",
    "PSGDKronPreconditionerConfig",
    "PSGDUpdateProbabilitySchedule",
    "Preconditioner",
    "PreconditionerConfig",
    "QREigendecompositionConfig",
    "RMSpropPreconditionerConfig",
    "RefreshResult",
    "RootInvShampooPreconditionerConfig",
    "SGDPreconditionerConfig",
    "SVDOrthogonalizationConfig",
    "SignDescentPreconditionerConfig",
    "SpectralDescentPreconditionerConfig",
    "make_preconditioner",
    "register_preconditioner",
]

#: Configs accepted as ``grafting_config`` (diagonal, so grafting never needs a refresh).
GRAFTING_CONFIGS = (
    SGDPreconditionerConfig,
    AdaGradPreconditionerConfig,
    RMSpropPreconditionerConfig,
    AdamPreconditionerConfig,
)

_REGISTRY: list[tuple[type[PreconditionerConfig], type[Preconditioner]]] = [
    (KLShampooPreconditionerConfig, KLShampooPreconditioner),
    (PSGDKronPreconditionerConfig, PSGDKronPreconditioner),
    (RootInvShampooPreconditionerConfig, ShampooPreconditioner),
    (EigendecomposedShampooPreconditionerConfig, ShampooPreconditioner),
    (EigenvalueCorrectedShampooPreconditionerConfig, SOAPPreconditioner),
    (SGDPreconditionerConfig, DiagonalPreconditioner),
    (AdaGradPreconditionerConfig, DiagonalPreconditioner),
    (SignDescentPreconditionerConfig, SignDescentPreconditioner),
    (SpectralDescentPreconditionerConfig, SpectralDescentPreconditioner),
]


def register_preconditioner(config_type: type[PreconditionerConfig], kernel: type[Preconditioner]) -> None:
    """Teach :func:`make_preconditioner` a new family (checked before the built-in ones)."""
    _REGISTRY.insert(0, (config_type, kernel))


def make_preconditioner(config: object, block_shape: tuple[int, ...], where: str) -> Preconditioner:
    """The kernel for ``config`` over blocks of ``block_shape``; ``where`` names them in errors."""
    for config_type, kernel in _REGISTRY:
        if isinstance(config, config_type):
            return kernel(config, block_shape, where)
    raise ValueError(
        f"preconditioner_config of type {type(config).__name__} is not a known preconditioner config; "
        f"expected one of {[c.__name__ for c, _ in _REGISTRY]}"
    )
