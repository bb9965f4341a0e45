"""Pure numerical kernels on batched ``[..., d, d]`` tensors: no optimizer state, no Lightning."""

from .eigh import DEFAULT_JITTERS, EighResult, safe_eigh
from .elementwise import finite_matrices, stable_pow
from .orthogonal import (
    NEWTON_SCHULZ_COEFFICIENTS,
    OrthogonalIterationResult,
    newton_schulz,
    orthogonal_iteration,
    rayleigh_quotients,
    svd_orthogonalize,
)
from .psgd import (
    balance_factors,
    lipschitz_update,
    procrustes_step,
    smallest_singular_value_estimate,
    spectral_norm_lower_bound,
    update_eq,
    update_q0p5eq1p5,
    update_quad,
)
from .roots import (
    NewtonResult,
    RootResult,
    coupled_newton_inverse_root,
    inverse_root_from_eigh,
    matrix_inverse_root,
    scaled_epsilon,
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
    "balance_factors",
    "coupled_newton_inverse_root",
    "finite_matrices",
    "inverse_root_from_eigh",
    "lipschitz_update",
    "matrix_inverse_root",
    "newton_schulz",
    "orthogonal_iteration",
    "procrustes_step",
    "rayleigh_quotients",
    "safe_eigh",
    "scaled_epsilon",
    "smallest_singular_value_estimate",
    "spectral_norm_lower_bound",
    "spectrum_stats",
    "stable_pow",
    "svd_orthogonalize",
    "update_eq",
    "update_q0p5eq1p5",
    "update_quad",
]
