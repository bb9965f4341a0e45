"""Orthogonal (QR power) iteration and polar-factor orthogonalization (Newton–Schulz, SVD)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NEWTON_SCHULZ_COEFFICIENTS",
    "OrthogonalIterationResult",
    "newton_schulz",
    "off_diagonal_within",
    "orthogonal_iteration",
    "qr_algorithm",
    "rayleigh_quotients",
    "svd_orthogonalize",
]

#: Quintic coefficients (a, b, c) of the Muon Newton–Schulz iteration ``X ← aX + (bA + cA²)X``.
NEWTON_SCHULZ_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def rayleigh_quotients(matrices: Tensor, basis: Tensor) -> Tensor:
    """``diag(Qᵀ A Q)`` for a batch: the eigenvalue estimates of ``A`` in the columns of ``Q``."""
    return (basis * (matrices @ basis)).sum(-2)


class OrthogonalIterationResult(NamedTuple):
    """Eigenvalue estimates ``[..., d]`` (orthogonal iteration: descending when sorted; QR
    algorithm: ascending), eigenvectors ``[..., d, d]``,
    the column permutation applied to the previous basis before iterating (``None`` without
    sorting) and a failure mask ``[...]``."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    permutation: Tensor | None
    failed: Tensor


def orthogonal_iteration(
    matrices: Tensor, basis: Tensor, *, power_iter_steps: int = 1, sort: bool = True
) -> OrthogonalIterationResult:
    """Refine an eigenbasis of symmetric ``A`` warm-started from the previous one: ``Q ← qr(A Q)``.

    With ``sort`` the previous columns are first ordered by descending Rayleigh quotient, so the
    iteration keeps dominant directions in front. Whoever stores quantities indexed by these
    columns (SOAP's second moment) must apply the returned ``permutation`` to them as well.
    """
    if power_iter_steps < 1:
        raise ValueError(f"power_iter_steps must be >= 1, got {power_iter_steps}")
    permutation = None
    q = basis
    if sort:
        permutation = rayleigh_quotients(matrices, q).argsort(dim=-1, descending=True)
        q = q.gather(-1, permutation.unsqueeze(-2).expand_as(q))
    for _ in range(power_iter_steps):
        q, _ = torch.linalg.qr(matrices @ q)
    values = rayleigh_quotients(matrices, q)
    failed = ~torch.isfinite(q.sum((-2, -1)) + values.sum(-1))  # one reduction (see finite_matrices)
    return OrthogonalIterationResult(values, q, permutation, failed)


def off_diagonal_within(estimates: Tensor, tolerance: float) -> Tensor:
    """``‖B − diag(B)‖_F ≤ tolerance · ‖B‖_F`` per matrix of ``B = QᵀAQ``: how far ``Q`` is from
    diagonalising ``A`` (the relative error of ``A ≈ Q diag(B) Qᵀ``). The off-diagonal mass is
    summed directly (not as ``‖B‖² − ‖diag B‖²``, which cancels below ~1e-8 relative), so
    ``tolerance = 0`` holds only for an exactly diagonal ``B``."""
    squares = estimates.square()
    off = (squares - torch.diag_embed(squares.diagonal(dim1=-2, dim2=-1))).sum((-2, -1))
    return off <= tolerance**2 * squares.sum((-2, -1))


def qr_algorithm(
    matrices: Tensor, basis: Tensor, *, max_iterations: int = 1, tolerance: float = 0.0
) -> OrthogonalIterationResult:
    """Warm-started QR algorithm on symmetric ``A`` (Distributed Shampoo's QR eigendecomposition).

    ``B = QᵀAQ``; while ``B`` is not diagonal within ``tolerance`` (see ``off_diagonal_within``)
    and fewer than ``max_iterations`` steps ran: ``(P, R) = qr(B)``, ``B ← RP``, ``Q ← QP`` — the
    same subspace step as ``Q ← qr(AQ)``, one matrix at a time (a matrix within tolerance stops,
    whatever its batch neighbours do). Finally the columns are sorted by ascending ``diag(B)``
    (stable). ``permutation`` is ``None``: the sort follows the iteration, which mixes columns, so
    state indexed by the previous columns has no permutation to follow (Distributed Shampoo
    leaves it in place).
    """
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    if not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"tolerance must be in [0, 1], got {tolerance}")
    q = basis
    b = q.mT @ matrices @ q
    active = ~off_diagonal_within(b, tolerance)
    for _ in range(max_iterations):
        if not bool(active.any()):  # refresh time: a host sync is fine here
            break
        p, r = torch.linalg.qr(b)
        keep = active[..., None, None]
        b = torch.where(keep, r @ p, b)
        q = torch.where(keep, q @ p, q)
        active &= ~off_diagonal_within(b, tolerance)
    values, order = b.diagonal(dim1=-2, dim2=-1).sort(dim=-1, stable=True)
    q = q.gather(-1, order.unsqueeze(-2).expand_as(q))
    failed = ~torch.isfinite(q.sum((-2, -1)) + values.sum(-1))  # one reduction (see finite_matrices)
    return OrthogonalIterationResult(values, q, None, failed)


def newton_schulz(
    matrices: Tensor,
    *,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NEWTON_SCHULZ_COEFFICIENTS,
    epsilon: float = 1e-7,
) -> Tensor:
    """Approximate the polar factor ``U Vᵀ`` of ``G = U S Vᵀ`` with the quintic Newton–Schulz map.

    The quintic is tuned for speed, not exactness: singular values land in roughly [0.7, 1.2]
    rather than exactly 1, which is what Muon-style updates want. Batched over leading dims.
    """
    a, b, c = coefficients
    transpose = matrices.shape[-2] > matrices.shape[-1]
    x = matrices.mT if transpose else matrices
    x = x / (torch.linalg.matrix_norm(x, "fro", keepdim=True) + epsilon)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if transpose else x


def svd_orthogonalize(matrices: Tensor, *, rank_rtol: float | None = None) -> Tensor:
    """Exact polar factor ``U Vᵀ`` via reduced SVD; null directions get zero (so ``0 ↦ 0``)."""
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    rtol = rank_rtol if rank_rtol is not None else max(matrices.shape[-2:]) * torch.finfo(s.dtype).eps
    keep = (s > rtol * s.amax(-1, keepdim=True)) & (s > 0)
    return (u * keep.unsqueeze(-2).to(u.dtype)) @ vh
