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
    #: How ``precondition``'s input derives from the gradients: ``m = buffer / bias_correction1``
    #: with ``buffer ← lerp(buffer, g, (1-β₁)·live)``; ``beta1 = None`` when it does not (β₃ ≠ β₁).
    #: Lets a kernel keep that buffer in its own basis instead of rotating ``m`` every step.
    beta1: float | None = 0.0
    bias_correction1: float = 1.0

    @property
    def bias_correction2(self) -> float:
        """``1 - β₂ᵗ`` for EMA statistics, ``1`` for sums (β₂ = 1) or without bias correction."""
        if self.use_bias_correction and self.beta2 < 1.0:
            return 1.0 - self.beta2**self.step
        return 1.0

    def block_epsilon(self, dtype: torch.dtype | None = None) -> Tensor | float:
        """Per-block damping for refreshes: ``epsilon`` times the block's retry scale, formed in
        ``dtype`` (the statistics' precision: a float32 product would round a float64 epsilon)."""
        if self.epsilon_scale is None:
            return self.epsilon
        scale = self.epsilon_scale if dtype is None else self.epsilon_scale.to(dtype)
        return self.epsilon * scale


class RefreshResult(NamedTuple):
    """Per-block failure mask ``[n]`` and one spectrum record per factor (``None`` if unknown)."""

    failed: Tensor
    stats: tuple[SpectrumStats | None, ...]


def per_block(values: Tensor, ndim: int) -> Tensor:
    """Reshape per-block values ``[n]`` to broadcast against ``[n, *block]`` of total ``ndim``."""
    return values.view(values.shape[0], *([1] * (ndim - 1)))


def ema_(state: Tensor, new: Tensor, beta: float, live: Tensor) -> None:
    """``state ← β·state + (1-β)·new`` on live blocks, unchanged elsewhere; ``β = 1`` sums.

    Contract: ``new`` is zero on dead blocks (the pipeline zeroes their gradient), so sums need
    no mask; the EMA masks its weight. In place, no temporaries of the state's size.
    """
    new = new.to(state.dtype)
    if beta == 1.0:
        state.add_(new)
    else:
        state.lerp_(new, per_block(live.to(state.dtype), state.ndim) * (1.0 - beta))


def accumulate_outer_(factor: Tensor, x: Tensor, dim: int, beta: float, live: Tensor) -> None:
    """``factor ← β·factor + (1-β)·X₍dim₎X₍dim₎ᵀ`` in place (one fused ``baddbmm``), dead blocks
    (zero ``x``, ``live = 0``) unchanged."""
    x = x.to(factor.dtype)
    if x.ndim == 3:
        left, right = (x, x.mT) if dim == 0 else (x.mT, x)
    else:
        moved = x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)
        left, right = moved, moved.mT
    if beta == 1.0:
        factor.baddbmm_(left, right)
    else:
        keep = 1.0 - (1.0 - beta) * live.to(factor.dtype)  # β on live blocks, 1 on dead ones
        factor.mul_(per_block(keep, factor.ndim))
        if left.shape[-1] == 1:  # rank one (1-D blocks): CPU baddbmm with alpha rounds differently
            factor.add_(left * right, alpha=1.0 - beta)  # for a batch of one; bucketed == per-block
        else:
            factor.baddbmm_(left, right, alpha=1.0 - beta)


def row_norms(x: Tensor) -> Tensor:
    """Per-block Frobenius norm ``[n]``. Non-finite (NaN, inf, or ``‖x‖² ≥ 3.4e38`` overflow in
    fp32) exactly when some outer product or square of ``x`` could be — one fused reduction,
    far cheaper than an elementwise ``isfinite``."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


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


def eigenbasis_drift(factor: Tensor, basis: Tensor) -> Tensor:
    """Off-diagonal mass ``‖offdiag(QᵀLQ)‖_F / ‖QᵀLQ‖_F`` per block: 0 while ``Q`` still
    diagonalises ``L``, growing as ``L`` drifts from the factor ``Q`` was computed from."""
    rotated = basis.mT @ factor.to(basis.dtype) @ basis
    total = torch.linalg.matrix_norm(rotated)
    diagonal = torch.linalg.vector_norm(rotated.diagonal(dim1=-2, dim2=-1), dim=-1)
    off = (total.square() - diagonal.square()).clamp_min(0.0).sqrt()
    return off / total.clamp_min(torch.finfo(total.dtype).tiny)


def relative_change(current: Tensor, reference: Tensor) -> Tensor:
    """``‖current - reference‖_F / ‖reference‖_F`` per block (``inf`` for a zero reference)."""
    difference = torch.linalg.matrix_norm((current - reference).to(torch.float32))
    base = torch.linalg.matrix_norm(reference.to(torch.float32))
    return torch.where(base > 0, difference / base.clamp_min(torch.finfo(base.dtype).tiny), torch.inf)


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

    def drift(self, state: dict[str, Tensor], ctx: Context) -> Tensor | None:
        """Per-block relative drift ``[n]`` of the statistics since the last refresh, used to skip
        refreshes that would change little; ``None``: unknown (always refresh)."""
        return None

    def health_stats(self, state: dict[str, Tensor]) -> tuple[SpectrumStats | None, ...] | None:
        """Per-factor spectrum figures the kernel tracks itself (read lazily by ``health()``);
        ``None`` means the optimizer's refresh-time records apply."""
        return None
