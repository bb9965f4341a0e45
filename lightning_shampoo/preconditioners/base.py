"""The contract every preconditioner family implements over a bucket, and shared tensor helpers.

A preconditioner object is a *stateless kernel* for one bucket: it holds its frozen config and
the bucket's block shape, and every method works on the bucket's state dict of ``[n, ...]``
tensors (one row per block). All tensors live in the optimizer's state, so they are moved,
saved and loaded with it; the kernel never caches them.

The step calls, per bucket: ``update`` (statistics), ``refresh`` (amortized work, only when due),
``update_after_refresh`` (statistics that live in the refreshed basis) and ``precondition``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..linalg import SpectrumStats

__all__ = [
    "Context",
    "Preconditioner",
    "PreconditionerConfig",
    "RefreshResult",
    "apply_along_dims",
    "commit_",
    "ema_",
    "per_block",
]


@dataclass(frozen=True)
class PreconditionerConfig:
    """Base class of every preconditioner config (also of the grafting configs)."""


@dataclass(frozen=True)
class Context:
    """What a kernel needs to know about the current step for one bucket.

    ``live`` is ``1.0`` for blocks that take part in this step and ``0.0`` for blocks whose
    gradient is missing or non-finite; their statistics must stay exactly unchanged.
    """

    step: int
    beta2: float
    epsilon: float
    use_bias_correction: bool
    live: Tensor
    epsilon_scale: Tensor | None = None
    warm: bool = False  # on refresh: every block of the bucket was refreshed before

    @property
    def bias_correction2(self) -> float:
        """``1 - β₂ᵗ`` for EMA statistics, ``1`` for sums (β₂ = 1) or without bias correction."""
        if self.use_bias_correction and self.beta2 < 1.0:
            return 1.0 - self.beta2**self.step
        return 1.0

    def block_epsilon(self) -> Tensor | float:
        """Per-block damping for refreshes: ``epsilon`` times the block's retry scale."""
        if self.epsilon_scale is None:
            return self.epsilon
        return self.epsilon * self.epsilon_scale


class RefreshResult(NamedTuple):
    """Per-block failure mask ``[n]`` and one spectrum record per factor (``None`` if unknown)."""

    failed: Tensor
    stats: tuple[SpectrumStats | None, ...]


def per_block(values: Tensor, ndim: int) -> Tensor:
    """Reshape per-block values ``[n]`` to broadcast against ``[n, *block]`` of total ``ndim``."""
    return values.view(values.shape[0], *([1] * (ndim - 1)))


def ema_(state: Tensor, new: Tensor, beta: float, live: Tensor) -> None:
    """``state ← β·state + (1-β)·new`` on live blocks, unchanged elsewhere; ``β = 1`` sums.

    Blocks whose ``new`` is not finite (overflow of a finite gradient) are left unchanged too,
    so no statistic ever holds a non-finite value.
    """
    new = new.to(state.dtype)
    finite = torch.isfinite(new).flatten(1).all(1) if new.ndim > 1 else torch.isfinite(new)
    w = per_block(live.to(state.dtype) * finite, state.ndim)
    new = torch.where(w > 0, new, 0.0)
    if beta == 1.0:
        state.add_(new * w)
    else:
        state.lerp_(new, w * (1.0 - beta))


def commit_(target: Tensor, new: Tensor, ok: Tensor) -> None:
    """Write ``new`` into ``target`` (in place) only for blocks where ``ok``."""
    target.copy_(torch.where(per_block(ok, target.ndim), new.to(target.dtype), target))


def apply_along_dims(x: Tensor, matrices: Mapping[int, Tensor], *, transpose: bool = False) -> Tensor:
    """Mode products ``x ×ᵢ Mᵢ`` (or ``Mᵢᵀ``) for a bucket ``x: [n, *block]``, ``Mᵢ: [n, dᵢ, dᵢ]``.

    ``out[.., a, ..] = Σ_b M[a, b] x[.., b, ..]`` along each block dim ``i`` present in
    ``matrices``. Two-dimensional blocks take the copy-free ``L @ X @ Rᵀ`` path.
    """
    order = x.ndim - 1
    if not matrices:
        return x
    if order == 2:
        left, right = matrices.get(0), matrices.get(1)
        if left is not None:
            x = (left.mT if transpose else left) @ x.to(left.dtype)
        if right is not None:
            x = x.to(right.dtype) @ (right if transpose else right.mT)
        return x
    n = x.shape[0]
    for i in range(order):
        m = matrices.get(i)
        if m is None:
            continue
        moved = x.movedim(i + 1, -1)
        shape = moved.shape
        y = moved.reshape(n, -1, shape[-1]).to(m.dtype) @ (m if transpose else m.mT)
        x = y.reshape(shape).movedim(-1, i + 1)
    return x


def outer_products(x: Tensor, dim: int) -> Tensor:
    """``X₍ᵢ₎ X₍ᵢ₎ᵀ`` for every block: contract all block dims but ``dim`` → ``[n, d, d]``."""
    if x.ndim == 3:
        return x @ x.mT if dim == 0 else x.mT @ x
    moved = x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)
    return moved @ moved.mT


def resolve_exponent(override: Mapping[int, Any], order: int, dim: int, default: float) -> float:
    """Exponent for ``dim`` of an ``order``-D block from an ``{order: float | {dim: float}}`` map."""
    value = override.get(order)
    if isinstance(value, Mapping):
        return float(value.get(dim, default))
    return float(value) if value is not None else default


def check_dtype(name: str, dtype: torch.dtype, allowed: Sequence[torch.dtype]) -> None:
    if dtype not in allowed:
        raise ValueError(f"{name} must be one of {[str(d) for d in allowed]}, got {dtype}")


def identity(n: int, d: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()


class Preconditioner:
    """Kernel for one family over one bucket; subclasses override what they need."""

    kind: str = "identity"
    amortized: ClassVar[bool] = False

    def __init__(self, config: PreconditionerConfig, block_shape: tuple[int, ...], where: str) -> None:
        self.config = config
        self.block_shape = block_shape
        self.where = where  # names the parameter(s) in error messages

    @property
    def order(self) -> int:
        return len(self.block_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def factor_dims(self) -> tuple[int, ...]:
        """Block dims that carry a Kronecker factor (reported in health records)."""
        return ()

    def init_state(self, n: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        return {}

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        """Accumulate statistics from this step's gradient (dead blocks are zero and ``live=0``)."""

    def refresh(self, state: dict[str, Tensor], ctx: Context, commit: Tensor) -> RefreshResult:
        """Amortized recomputation; commits new values only where ``commit`` and not failed."""
        return RefreshResult(torch.zeros_like(commit), ())

    def update_after_refresh(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        """Statistics kept in the refreshed basis (SOAP's second moment)."""

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        return grad
