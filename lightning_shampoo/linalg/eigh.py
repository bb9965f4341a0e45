"""Symmetric eigendecomposition that reports failure per matrix instead of raising.

Optimizer refreshes must survive numerical trouble: a single ill-conditioned block in a batch
must not stop training nor poison its neighbours. ``safe_eigh`` tries the batched call first
(the fast path), and only when that raises or returns non-finite values does it walk the
fallback ladder matrix by matrix: float64 retry, then growing diagonal jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .elementwise import finite_matrices

__all__ = ["DEFAULT_JITTERS", "EighResult", "safe_eigh"]

#: Diagonal shifts tried after the float64 retry, relative to the mean absolute diagonal.
DEFAULT_JITTERS: tuple[float, ...] = (1e-10, 1e-8, 1e-6, 1e-4)


class EighResult(NamedTuple):
    """Ascending eigenvalues ``[..., d]``, eigenvectors ``[..., d, d]`` and a failure mask ``[...]``.

    Failed matrices carry finite placeholders (eigenvalues 1, identity eigenvectors) so that callers
    can compute with the whole batch and discard those entries with the mask.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    failed: Tensor


def _ladder(matrix: Tensor, retry_float64: bool, jitters: Sequence[float]) -> tuple[Tensor, Tensor] | None:
    """Fallbacks for one matrix; returns ``None`` when every rung fails."""
    attempts: list[tuple[Tensor, float]] = []
    if retry_float64 and matrix.dtype != torch.float64:
        attempts.append((matrix.double(), 0.0))
    wide = matrix.double() if retry_float64 else matrix
    scale = float(wide.diagonal().abs().mean().clamp_min(torch.finfo(wide.dtype).tiny))
    eye = torch.eye(matrix.shape[-1], dtype=wide.dtype, device=wide.device)
    attempts += [(wide + (j * scale) * eye, j * scale) for j in jitters]
    for candidate, shift in attempts:
        try:
            values, vectors = torch.linalg.eigh(candidate)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        if bool(torch.isfinite(values.sum() + vectors.sum())):  # a false alarm tries the next rung
            return (values - shift).to(matrix.dtype), vectors.to(matrix.dtype)
    return None


def safe_eigh(
    matrices: Tensor,
    *,
    retry_float64: bool = True,
    jitters: Sequence[float] = DEFAULT_JITTERS,
) -> EighResult:
    """Eigendecompose a batch of symmetric matrices, never raising for numerical trouble.

    Non-finite inputs are reported as failed without being decomposed. This synchronises with the
    device (to learn whether the batched call failed); call it only on refresh steps.
    """
    if matrices.ndim < 2 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"matrices must have shape [..., d, d], got {tuple(matrices.shape)}")
    d = matrices.shape[-1]
    batch = matrices.shape[:-2]
    eye = torch.eye(d, dtype=matrices.dtype, device=matrices.device)
    # One sum per matrix (not an elementwise isfinite of the whole batch); its host sync tells
    # whether any placeholder is needed at all (the common case: none, and no ``where``).
    finite_in = finite_matrices(matrices, exact=True)
    all_finite = bool(finite_in.all())
    safe = matrices if all_finite else torch.where(finite_in[..., None, None], matrices, eye)
    try:
        values, vectors = torch.linalg.eigh(safe)
        # Eigenvector entries are at most 1 in magnitude: this sum overflows only with the
        # eigenvalues, and a false alarm only sends the matrix down the (exact) ladder.
        bad = ~torch.isfinite(values.sum(-1) + vectors.sum((-2, -1)))
        if not all_finite:
            bad &= finite_in
    except RuntimeError:
        values = torch.ones(*batch, d, dtype=matrices.dtype, device=matrices.device)
        vectors = eye.expand(*batch, d, d).clone()
        bad = finite_in.clone()
    failed = ~finite_in
    if bool(bad.any()):
        values, vectors, failed = values.clone(), vectors.clone(), failed.clone()
        flat_values, flat_vectors = values.view(-1, d), vectors.view(-1, d, d)
        flat_failed, flat_safe = failed.view(-1), safe.reshape(-1, d, d)
        for i in bad.view(-1).nonzero().flatten().tolist():
            rescued = _ladder(flat_safe[i], retry_float64, jitters)
            if rescued is None:
                flat_values[i], flat_vectors[i], flat_failed[i] = 1.0, eye, True
                all_finite = False
            else:
                flat_values[i], flat_vectors[i] = rescued
    if all_finite:  # no placeholder to write
        return EighResult(values, vectors, failed)
    placeholder = failed[..., None]
    values = torch.where(placeholder, torch.ones_like(values), values)
    vectors = torch.where(placeholder[..., None], eye, vectors)
    return EighResult(values, vectors, failed)
