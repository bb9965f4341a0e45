"""Diagonal Kronecker factors: Shampoo's factor along a dim, kept as its diagonal only.

A dim that does not deserve a full ``d × d`` factor (a vocabulary side; ``factoring.py``) can
still be scaled per coordinate: ``Dᵢ ← β₂Dᵢ + (1-β₂)·diag(G₍ᵢ₎G₍ᵢ₎ᵀ)`` (the squared gradient
summed over the block's other dims: the diagonal of the full factor), preconditioned by
``(Dᵢ/(1-β₂ᵗ) + ε)^(-αᵢ)``, refreshed with the full factors. ``d`` numbers per block instead of
``d²`` (packed: ``d(d+1)/2`` twice), and per plain step one multiply along the dim. It is what
SOAP does along its ``ignored_basis_change_dims`` (Adam's per-coordinate second moment) and
PSGD-Kron along its diagonal dims.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..linalg import scaled_epsilon, stable_pow
from .base import Context, StateSpec, commit_, ema_, per_block

__all__ = ["accumulate_diagonals_", "apply_diagonals_", "diagonal_schema", "refresh_diagonals"]


def diagonal_schema(
    block_shape: tuple[int, ...], dims: Mapping[int, float], fdtype: torch.dtype, rdtype: torch.dtype
) -> dict[str, StateSpec]:
    """``diagonal.{i}`` (the statistics) and ``diagonal_root.{i}`` (the cached ``(D+ε)^(-α)``,
    ones until the first refresh, as Shampoo's roots start at the identity) per diagonal dim."""
    schema: dict[str, StateSpec] = {}
    for i in dims:
        schema[f"diagonal.{i}"] = StateSpec((block_shape[i],), fdtype)
        schema[f"diagonal_root.{i}"] = StateSpec((block_shape[i],), rdtype, 1.0)
    return schema


def _along(values: Tensor, dim: int, ndim: int) -> Tensor:
    """``[n, d]`` per-coordinate values broadcast along block dim ``dim`` of ``[n, *block]``."""
    shape = [values.shape[0]] + [1] * (ndim - 1)
    shape[dim + 1] = values.shape[1]
    return values.view(shape)


def accumulate_diagonals_(
    state: dict[str, Tensor], grad: Tensor, dims: Mapping[int, float], ctx: Context
) -> None:
    """``Dᵢ ← β₂Dᵢ + (1-β₂)·Σ_{other dims} G²`` (dead blocks: zero gradient, unchanged weight)."""
    for i in dims:
        target = state[f"diagonal.{i}"]
        others = [d + 1 for d in range(grad.ndim - 1) if d != i]
        if not others:  # a 1-D block's diagonal is its squared gradient
            ema_(target, grad.square(), ctx.ema2)
            continue
        energy = ctx.buffer(("diagonal", i), tuple(target.shape), target.dtype, target.device)
        x = grad if grad.dtype == target.dtype else grad.to(target.dtype)  # an explicit factor dtype
        torch.linalg.vector_norm(x, dim=others, out=energy)
        ema_(target, energy.square_(), ctx.ema2)


def refresh_diagonals(
    state: dict[str, Tensor],
    dims: Mapping[int, float],
    ctx: Context,
    epsilon: float | Tensor,
    epsilon_rtol: float,
    commit: Tensor,
) -> None:
    """``diagonal_root.{i} ← (Dᵢ/(1-β₂ᵗ) + ε')^(-αᵢ)`` where ``commit`` (``ε' = s·(ε + ε_rtol·max D)``,
    the full factors' damping rule)."""
    bc2 = per_block(ctx.bias_correction2, 2)
    for i, alpha in dims.items():
        values = (state[f"diagonal.{i}"] / bc2.to(state[f"diagonal.{i}"].dtype)).clamp_min_(0.0)
        damping = scaled_epsilon(values.amax(-1), epsilon, epsilon_rtol)
        if ctx.epsilon_scale is not None:
            damping = damping * ctx.epsilon_scale.to(values.dtype)
        damping = per_block(damping, 2) if isinstance(damping, Tensor) else damping
        root = stable_pow(values + damping, -alpha)
        ok = commit & torch.isfinite(root).all(-1)
        commit_(state[f"diagonal_root.{i}"], root, ok)


def apply_diagonals_(out: Tensor, state: dict[str, Tensor], dims: Mapping[int, float]) -> None:
    """``out ← out ×ᵢ diag(rootᵢ)`` in place along every diagonal dim."""
    for i in dims:
        root = state[f"diagonal_root.{i}"]
        out.mul_(_along(root if root.dtype == out.dtype else root.to(out.dtype), i, out.ndim))
