"""Configs of the amortized (refresh-time) matrix computations, shared by the Shampoo family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._checks import require_bool, require_float, require_int
from ..linalg import OrthogonalIterationResult, orthogonal_iteration, safe_eigh

__all__ = [
    "CoupledNewtonConfig",
    "EigenConfig",
    "EighEigendecompositionConfig",
    "QREigendecompositionConfig",
    "eigendecompose",
]


@dataclass(frozen=True, kw_only=True)
class _SpectralOptions:
    """``pseudo_inverse`` zeroes the inverse on the numerical null space (``rank_rtol · λ_max``)
    instead of damping it with ``epsilon``; it then allows ``epsilon = 0``."""

    pseudo_inverse: bool = False
    rank_rtol: float | None = None

    def __post_init__(self) -> None:
        require_bool("pseudo_inverse", self.pseudo_inverse)
        require_float(
            "rank_rtol", self.rank_rtol, low=0.0, high=1.0, low_open=True, high_open=True, allow_none=True
        )


@dataclass(frozen=True, kw_only=True)
class EigenConfig(_SpectralOptions):
    """Inverse root from ``torch.linalg.eigh`` with the fallback ladder (float64 retry, jitter)."""

    retry_double_precision: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_bool("retry_double_precision", self.retry_double_precision)


@dataclass(frozen=True, kw_only=True)
class CoupledNewtonConfig:
    """Inverse root by the coupled Newton iteration (matmuls only; integer roots ``1/exponent``)."""

    max_iterations: int = 100
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        require_int("max_iterations", self.max_iterations, low=1)
        require_float("tolerance", self.tolerance, low=0.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class EighEigendecompositionConfig(_SpectralOptions):
    """Eigenvectors and eigenvalues from ``torch.linalg.eigh`` with the fallback ladder."""

    retry_double_precision: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_bool("retry_double_precision", self.retry_double_precision)


@dataclass(frozen=True, kw_only=True)
class QREigendecompositionConfig(_SpectralOptions):
    """Warm-started orthogonal iteration: ``power_iter_steps`` of ``Q ← qr(A Q)`` from the previous
    eigenvectors (the first refresh of a block uses ``eigh``). ``sort_eigenvectors`` orders the
    previous columns by descending Rayleigh quotient first, permuting dependent state with them."""

    power_iter_steps: int = 1
    sort_eigenvectors: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require_int("power_iter_steps", self.power_iter_steps, low=1)
        require_bool("sort_eigenvectors", self.sort_eigenvectors)


EigendecompositionConfig = EighEigendecompositionConfig | QREigendecompositionConfig


def eigendecompose(
    matrices: Tensor, config: EigendecompositionConfig, previous: Tensor, *, warm: bool
) -> OrthogonalIterationResult:
    """Eigenbasis of a batch of symmetric factors under ``config``.

    The QR path needs a warm start: with ``warm=False`` (some block never refreshed) the whole
    batch goes through ``eigh``. ``permutation`` is non-``None`` only when previous columns were
    reordered, in which case state indexed by those columns must be permuted the same way.
    """
    if isinstance(config, QREigendecompositionConfig) and warm:
        return orthogonal_iteration(
            matrices, previous, power_iter_steps=config.power_iter_steps, sort=config.sort_eigenvectors
        )
    retry = config.retry_double_precision if isinstance(config, EighEigendecompositionConfig) else True
    values, vectors, failed = safe_eigh(matrices, retry_float64=retry)
    return OrthogonalIterationResult(values, vectors, None, failed)
