"""Health figures of a factor from what a refresh already computed (no extra decomposition)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SpectrumStats", "spectrum_stats"]


class SpectrumStats(NamedTuple):
    """Per-matrix minimum and maximum eigenvalue and condition number, each ``[...]``."""

    min_eigenvalue: Tensor
    max_eigenvalue: Tensor
    condition_number: Tensor


def spectrum_stats(eigenvalues: Tensor, epsilon: float | Tensor = 0.0) -> SpectrumStats:
    """Range and condition number of the damped matrix ``A + εI`` from eigenvalues ``[..., d]``.

    The condition number is that of what the preconditioner actually inverts, so it stays finite
    for rank-deficient factors whenever ``ε > 0`` (and is ``inf`` for a singular undamped factor).
    """
    lam = eigenvalues.clamp_min(0.0)
    lo, hi = lam.amin(-1), lam.amax(-1)
    eps = torch.as_tensor(epsilon, dtype=lam.dtype, device=lam.device)
    cond = (hi + eps) / (lo + eps)
    cond = torch.where(hi + eps == 0, torch.ones_like(cond), cond)
    return SpectrumStats(eigenvalues.amin(-1), eigenvalues.amax(-1), cond)
