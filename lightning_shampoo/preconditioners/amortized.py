"""Configs of the amortized (refresh-time) matrix computations, shared by the Shampoo family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..linalg import OrthogonalIterationResult, orthogonal_iteration, safe_eigh

__all__ = [
    "CoupledNewtonConfig",
    "EigenConfig",
    "EighEigendecompositionConfig",
    "QREigendecompositionConfig",
    "eigendecompose",
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
        if self.rank_rtol is not None and not 0.0 < self.rank_rtol < 1.0:
            raise ValueError(f"rank_rtol must be in (0, 1), got {self.rank_rtol}")


@dataclass(frozen=True, kw_only=True)
class EigenConfig(_SpectralOptions):
    """Inverse root from ``torch.linalg.eigh`` with the fallback ladder (float64 retry, jitter)."""

    retry_double_precision: bool = True


@dataclass(frozen=True, kw_only=True)
class CoupledNewtonConfig(_DampingOptions):
    """Inverse root by the coupled Newton iteration (matmuls only; integer roots ``1/exponent``).
    With ``epsilon_rtol``, ``λ_max`` is estimated within a few percent (no eigendecomposition)."""

    max_iterations: int = 100
    tolerance: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if not self.tolerance > 0.0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")


@dataclass(frozen=True, kw_only=True)
class EighEigendecompositionConfig(_SpectralOptions):
    """Eigenvectors and eigenvalues from ``torch.linalg.eigh`` with the fallback ladder."""

    retry_double_precision: bool = True


@dataclass(frozen=True, kw_only=True)
class QREigendecompositionConfig(_SpectralOptions):
    """Warm-started orthogonal iteration: ``power_iter_steps`` of ``Q ← qr(A Q)`` from the previous
    eigenvectors (the first refresh of a block uses ``eigh``). ``sort_eigenvectors`` orders the
    previous columns by descending Rayleigh quotient first, permuting dependent state with them."""

    power_iter_steps: int = 1
    sort_eigenvectors: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.power_iter_steps < 1:
            raise ValueError(f"power_iter_steps must be >= 1, got {self.power_iter_steps}")


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
