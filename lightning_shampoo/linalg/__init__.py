"""Pure numerical kernels on batched ``[..., d, d]`` tensors: no optimizer state, no Lightning."""

from .eigh import DEFAULT_JITTERS, EighResult, safe_eigh
from .orthogonal import (
    NEWTON_SCHULZ_COEFFICIENTS,
    OrthogonalIterationResult,
    newton_schulz,
    orthogonal_iteration,
    rayleigh_quotients,
    svd_orthogonalize,
)
from .roots import (
    NewtonResult,
    RootResult,
    coupled_newton_inverse_root,
    inverse_root_from_eigh,
    matrix_inverse_root,
)
from .spectrum import SpectrumStats, spectrum_stats

__all__ = [
    "DEFAULT_JITTERS",
    "NEWTON_SCHULZ_COEFFICIENTS",
    "EighResult",
    "NewtonResult",
    "OrthogonalIterationResult",
    "RootResult",
    "SpectrumStats",
    "coupled_newton_inverse_root",
    "inverse_root_from_eigh",
    "matrix_inverse_root",
    "newton_schulz",
    "orthogonal_iteration",
    "rayleigh_quotients",
    "safe_eigh",
    "spectrum_stats",
    "svd_orthogonalize",
]
