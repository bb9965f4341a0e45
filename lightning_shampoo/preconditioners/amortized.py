"""Configs of the amortized (refresh-time) matrix computations, shared by the Shampoo family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._checks import require_bool, require_float, require_int
from ..linalg import OrthogonalIterationResult, orthogonal_iteration, safe_eigh
from ..linalg.orthogonal import off_diagonal_within, qr_algorithm

__all__ = [
    "CoupledNewtonConfig",
    "EigenConfig",
    "EighEigendecompositionConfig",
    "QREigendecompositionConfig",
    "TraceScalingOptions",
    "eigendecompose",
    "trace_scale",
]


@dataclass(frozen=True, kw_only=True)
class _DampingOptions:
    """``epsilon_rtol``: Shampoo's inverse roots damp each factor with ``ε + ε_rtol · λ_max``
    (``linalg.scaled_epsilon``) instead of the absolute ``ε`` alone, so the damping follows the
    factor's scale and stays above its rounding error (``ε_rtol`` of a few ``d·u``, ``u`` the unit
    round-off, or more). 0 (default): ``ε`` alone, Distributed Shampoo's rule. The ``"shampoo"``,
    ``"eigen"`` and ``"kl_shampoo"`` presets set it. SOAP inverts no factor and ignores it."""

    epsilon_rtol: float = 0.0

    def __post_init__(self) -> None:
        rtol = self.epsilon_rtol
        if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not 0.0 <= rtol < 1.0:
            raise ValueError(f"epsilon_rtol must be a number in [0, 1), got {rtol!r}")


@dataclass(frozen=True, kw_only=True)
class _SpectralOptions(_DampingOptions):
    """``pseudo_inverse`` zeroes the inverse on the numerical null space (``rank_rtol · λ_max``)
    instead of damping it with ``epsilon``; it then allows ``epsilon = 0``."""

    pseudo_inverse: bool = False
    rank_rtol: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_bool("pseudo_inverse", self.pseudo_inverse)
        require_float(
            "rank_rtol", self.rank_rtol, low=0.0, high=1.0, low_open=True, high_open=True, allow_none=True
        )


@dataclass(frozen=True, kw_only=True)
class TraceScalingOptions:
    """Distributed Shampoo's trace scaling of the Shampoo family's factors: at each refresh the
    bias-corrected factor ``A`` becomes ``A · max(tr A, ε)^(-trace_scaling_exponent)`` before its
    root or eigenbasis is computed (``ε`` is the group's epsilon; exponent ½: ``A / sqrt(tr A)``).
    Scaling a factor by ``c`` scales its root ``(cA + εI)^(-α)`` by about ``c^(-α)`` while keeping
    its eigenvectors, so it mainly moves where ``ε`` sits relative to the spectrum."""

    use_trace_scaling: bool = False
    trace_scaling_exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.use_trace_scaling and not 0.0 < self.trace_scaling_exponent <= 1.0:
            raise ValueError(
                "trace_scaling_exponent must be in (0, 1] with use_trace_scaling, "
                f"got {self.trace_scaling_exponent}"
            )


def trace_scale(matrices: Tensor, exponent: float, epsilon: float | Tensor) -> Tensor:
    """``A · max(tr A, ε)^(-exponent)`` per matrix of a batch (see ``TraceScalingOptions``)."""
    trace = matrices.diagonal(dim1=-2, dim2=-1).sum(-1)
    eps = torch.as_tensor(epsilon, dtype=trace.dtype, device=trace.device)
    scale = torch.maximum(trace, eps).pow(-exponent)
    return matrices * scale[..., None, None]


@dataclass(frozen=True, kw_only=True)
class EigenConfig(_SpectralOptions):
    """Inverse root from ``torch.linalg.eigh`` with the fallback ladder (float64 retry, jitter)."""

    retry_double_precision: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_bool("retry_double_precision", self.retry_double_precision)


@dataclass(frozen=True, kw_only=True)
class CoupledNewtonConfig(_DampingOptions):
    """Inverse root by the coupled Newton iteration (matmuls only; integer roots ``1/exponent``).
    With ``epsilon_rtol``, ``λ_max`` is estimated within a few percent (no eigendecomposition)."""

    max_iterations: int = 100
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("max_iterations", self.max_iterations, low=1)
        require_float("tolerance", self.tolerance, low=0.0, low_open=True)


def _check_tolerance(tolerance: float) -> None:
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must be in [0, 1], got {tolerance}")


@dataclass(frozen=True, kw_only=True)
class EighEigendecompositionConfig(_SpectralOptions):
    """Eigenvectors and eigenvalues from ``torch.linalg.eigh`` with the fallback ladder.
    ``tolerance`` (Distributed Shampoo's): a block whose stored eigenvectors still diagonalise its
    factor to that relative off-diagonal mass keeps them, with the Rayleigh quotients as its new
    eigenvalues, instead of a new ``eigh`` (0: always ``eigh``)."""

    retry_double_precision: bool = True
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tolerance(self.tolerance)
        require_bool("retry_double_precision", self.retry_double_precision)


@dataclass(frozen=True, kw_only=True)
class QREigendecompositionConfig(_SpectralOptions):
    """Warm-started QR refresh of the stored eigenbasis, by default exactly Distributed Shampoo's:
    up to ``max_iterations`` QR-algorithm steps (``linalg.qr_algorithm``) on ``A + εI`` from the
    stored eigenvectors — the identity on a block's first refresh — stopping early once the basis
    diagonalises ``A + εI`` to ``tolerance``; columns then sorted by ascending eigenvalue estimate,
    and SOAP's second moment left where it is.

    ``reference_soap=True`` is the reference SOAP's refresh instead (our earlier default): ``eigh``
    on a block's first refresh, no damping, the previous columns sorted by descending Rayleigh
    quotient *before* iterating (``sort_eigenvectors``) with dependent state (SOAP's second
    moment) permuted along, then ``max_iterations`` steps of ``Q ← qr(A Q)``.
    ``power_iter_steps`` is our former name of ``max_iterations``."""

    max_iterations: int = 1
    tolerance: float = 0.0
    reference_soap: bool = False
    sort_eigenvectors: bool = True
    power_iter_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("power_iter_steps", self.power_iter_steps, low=1, allow_none=True)
        require_int("max_iterations", self.max_iterations, low=1)
        require_bool("sort_eigenvectors", self.sort_eigenvectors)
        require_bool("reference_soap", self.reference_soap)
        if self.power_iter_steps is not None:  # the former name: fold it into max_iterations
            if self.max_iterations not in (1, self.power_iter_steps):
                raise ValueError(
                    f"power_iter_steps={self.power_iter_steps} and max_iterations={self.max_iterations} "
                    "disagree; power_iter_steps is the former name of max_iterations: give one"
                )
            object.__setattr__(self, "max_iterations", self.power_iter_steps)
            object.__setattr__(self, "power_iter_steps", None)
        _check_tolerance(self.tolerance)


EigendecompositionConfig = EighEigendecompositionConfig | QREigendecompositionConfig


def eigendecompose(
    matrices: Tensor,
    config: EigendecompositionConfig,
    previous: Tensor,
    *,
    warm: bool,
    epsilon: float | Tensor = 0.0,
) -> OrthogonalIterationResult:
    """Eigenbasis of a batch of symmetric factors under ``config``; the eigenvalues are those of
    ``matrices`` (undamped) whatever damping the basis computation used.

    ``previous`` holds the stored eigenvectors (the identity before a block's first refresh).
    The reference-SOAP QR path needs a warm start: with ``warm=False`` (some block never
    refreshed) the whole batch goes through ``eigh``. ``permutation`` is non-``None`` only when
    previous columns were reordered, in which case state indexed by those columns must be
    permuted the same way. ``epsilon`` (per block or scalar) damps Distributed Shampoo's QR path.
    """
    if isinstance(config, QREigendecompositionConfig) and not config.reference_soap:
        eps = torch.as_tensor(epsilon, dtype=matrices.dtype, device=matrices.device)
        eye = torch.eye(matrices.shape[-1], dtype=matrices.dtype, device=matrices.device)
        damped = matrices + (eps[..., None, None] if eps.ndim > 0 else eps) * eye
        result = qr_algorithm(
            damped, previous, max_iterations=config.max_iterations, tolerance=config.tolerance
        )
        undamped = result.eigenvalues - (eps[..., None] if eps.ndim > 0 else eps)
        return result._replace(eigenvalues=undamped)
    if isinstance(config, QREigendecompositionConfig) and warm:
        return orthogonal_iteration(
            matrices, previous, power_iter_steps=config.max_iterations, sort=config.sort_eigenvectors
        )
    retry = config.retry_double_precision if isinstance(config, EighEigendecompositionConfig) else True
    values, vectors, failed = safe_eigh(matrices, retry_float64=retry)
    tolerance = config.tolerance if isinstance(config, EighEigendecompositionConfig) else 0.0
    if tolerance > 0.0:  # blocks whose stored basis still diagonalises their factor keep it
        estimates = previous.mT @ matrices @ previous
        keep = off_diagonal_within(estimates, tolerance)
        values = torch.where(keep[..., None], estimates.diagonal(dim1=-2, dim2=-1), values)
        vectors = torch.where(keep[..., None, None], previous, vectors)
        failed = failed & ~keep
    return OrthogonalIterationResult(values, vectors, None, failed)
