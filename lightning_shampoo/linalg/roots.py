"""Inverse p-th roots of symmetric positive semi-definite matrices, batched over leading dims."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .eigh import safe_eigh
from .elementwise import finite_matrices, stable_pow
from .psgd import spectral_norm_lower_bound

__all__ = [
    "NewtonResult",
    "RootResult",
    "coupled_newton_inverse_root",
    "inverse_root_from_eigh",
    "matrix_inverse_root",
    "scaled_epsilon",
]


def _per_matrix(value: float | Tensor, like: Tensor) -> Tensor:
    """Broadcast a scalar or a per-matrix ``[...]`` tensor against eigenvalues ``[..., d]``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.unsqueeze(-1) if t.ndim > 0 else t


def scaled_epsilon(largest: Tensor, epsilon: float | Tensor, epsilon_rtol: float) -> Tensor | float:
    """Scale-aware damping ``ε + ε_rtol · max(λ_max, 0)`` per matrix (``largest: [...]``).

    An absolute ``ε`` far below a factor's rounding error (``≈ d·u·λ_max`` for unit round-off
    ``u``) leaves the inverse root's null-space weights to that rounding: ``(noise + ε)^(-α)``
    then changes by O(1) under a 1e-7 change of the data. A damping relative to the factor's
    scale caps the damped factor's condition number at ``1 + 1/ε_rtol`` whatever its units.
    ``epsilon_rtol = 0`` returns ``epsilon`` unchanged (Distributed Shampoo's rule).
    """
    if epsilon_rtol == 0.0:
        return epsilon
    eps = torch.as_tensor(epsilon, dtype=largest.dtype, device=largest.device)
    return eps + epsilon_rtol * largest.clamp_min(0.0)


def inverse_root_from_eigh(
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    exponent: float,
    epsilon: float | Tensor,
    *,
    pseudo_inverse: bool = False,
    rank_rtol: float | None = None,
    epsilon_rtol: float = 0.0,
) -> Tensor:
    """``Q diag((max(λ, 0) + ε)^(-exponent)) Qᵀ``.

    Negative eigenvalues (round-off on a PSD matrix) are clamped to zero. With ``pseudo_inverse``,
    eigenvalues below ``rank_rtol · λ_max`` are treated as an exact null space and get zero weight,
    so ``epsilon`` may be zero. ``epsilon_rtol`` damps with :func:`scaled_epsilon` instead of ``ε``.
    """
    lam = eigenvalues.clamp_min(0.0)
    eps = _per_matrix(scaled_epsilon(lam.amax(-1), epsilon, epsilon_rtol), lam)
    scaled = stable_pow(lam + eps, -exponent)
    if pseudo_inverse:
        rtol = rank_rtol if rank_rtol is not None else lam.shape[-1] * torch.finfo(lam.dtype).eps
        keep = lam > rtol * lam.amax(-1, keepdim=True)
        scaled = torch.where(keep, scaled, torch.zeros_like(scaled))
    return (eigenvectors * scaled.unsqueeze(-2)) @ eigenvectors.mT


class RootResult(NamedTuple):
    """Inverse root ``[..., d, d]``, ascending eigenvalues ``[..., d]`` and a failure mask ``[...]``."""

    root: Tensor
    eigenvalues: Tensor
    failed: Tensor


def matrix_inverse_root(
    matrices: Tensor,
    exponent: float,
    epsilon: float | Tensor,
    *,
    pseudo_inverse: bool = False,
    rank_rtol: float | None = None,
    epsilon_rtol: float = 0.0,
) -> RootResult:
    """Inverse root through :func:`safe_eigh`; failed matrices are flagged, not raised."""
    values, vectors, failed = safe_eigh(matrices)
    root = inverse_root_from_eigh(
        values,
        vectors,
        exponent,
        epsilon,
        pseudo_inverse=pseudo_inverse,
        rank_rtol=rank_rtol,
        epsilon_rtol=epsilon_rtol,
    )
    failed = failed | ~finite_matrices(root)
    return RootResult(root, values, failed)


class NewtonResult(NamedTuple):
    """Inverse root ``[..., d, d]``, final residual ``max|M - I|`` ``[...]`` and a failure mask ``[...]``."""

    root: Tensor
    residual: Tensor
    failed: Tensor


def coupled_newton_inverse_root(
    matrices: Tensor,
    root: int,
    epsilon: float | Tensor = 0.0,
    *,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    check_every: int = 5,
    epsilon_rtol: float = 0.0,
) -> NewtonResult:
    """``(A + εI)^(-1/root)`` by the coupled Newton iteration (integer roots only).

    ``epsilon_rtol``: damp with :func:`scaled_epsilon` of ``λ_max``, estimated from below within a
    few percent by :func:`spectral_norm_lower_bound` (``O(d²)`` matmuls; no eigendecomposition).

    ``X₀ = z^{1/p} I``, ``M₀ = z A`` with ``z = (p+1) / (2‖A‖_F)`` puts the spectrum of ``M₀`` in
    ``(0, (p+1)/2]``, where the iteration ``T = ((p+1)I − M)/p``, ``X ← X T``, ``M ← Tᵖ M`` converges
    monotonically to ``M = I``, ``X = A^{-1/p}``. Only matmuls: no eigendecomposition.
    """
    if not isinstance(root, int) or root < 1:
        raise ValueError(f"root must be a positive integer, got {root!r}")
    d = matrices.shape[-1]
    eye = torch.eye(d, dtype=matrices.dtype, device=matrices.device)
    if epsilon_rtol != 0.0:
        epsilon = scaled_epsilon(spectral_norm_lower_bound(matrices), epsilon, epsilon_rtol)
    eps = torch.as_tensor(epsilon, dtype=matrices.dtype, device=matrices.device)
    a = matrices + (eps[..., None, None] if eps.ndim > 0 else eps) * eye
    norm = torch.linalg.matrix_norm(a, "fro").clamp_min(torch.finfo(a.dtype).tiny)
    z = ((root + 1) / (2.0 * norm))[..., None, None]
    x = stable_pow(z, 1.0 / root) * eye
    m = z * a
    residual = (m - eye).abs().amax((-1, -2))
    # A matrix stops iterating once it has converged (or diverged), whatever its batch
    # neighbours do: its result must not depend on which batch it was computed in.
    active = torch.ones_like(residual, dtype=torch.bool)
    for iteration in range(1, max_iterations + 1):
        t = ((root + 1) * eye - m) / root
        keep = active[..., None, None]
        x = torch.where(keep, x @ t, x)
        m = torch.where(keep, torch.linalg.matrix_power(t, root) @ m, m)
        if iteration % check_every == 0 or iteration == max_iterations:
            residual = (m - eye).abs().amax((-1, -2))
            active &= (residual >= tolerance) & torch.isfinite(residual)
            if not bool(active.any()):
                break
    failed = ~torch.isfinite(residual) | (residual > max(tolerance, 1e-3)) | ~finite_matrices(x)
    return NewtonResult(x, residual, failed)
