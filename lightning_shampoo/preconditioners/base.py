"""The contract every preconditioner family implements over a bucket, and shared tensor helpers.

A preconditioner object is a *stateless kernel* for one bucket: it holds its frozen config and
the bucket's block shape, declares the state it needs (``state_schema``: names, shapes, dtypes,
initial values — allocated once by the optimizer, never created lazily), and every method works
on the bucket's state dict of ``[n, ...]`` tensors (one row per block). All tensors live in the
optimizer's state, so they are moved, saved and loaded with it; the kernel never caches them.

The step calls, per bucket: ``update`` (statistics), ``refresh`` (amortized work, only when due),
``update_after_refresh`` (statistics that live in the refreshed basis) and ``precondition_into``.
Families whose work is elementwise override the ``*_many`` class methods to serve all their
buckets with one ``torch._foreach_*`` call per operation instead of one call per bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from ..linalg import SpectrumStats
from ..linalg.packing import pack, symmetric_index, unpack_into, upper_index
from ._context import Context, Ema, StateSpec, outer_operands, per_block

__all__ = [
    "Context",
    "Ema",
    "Preconditioner",
    "PreconditionerConfig",
    "RefreshResult",
    "StateSpec",
    "apply_along_dims",
    "commit_",
    "ema_",
    "per_block",
]


@dataclass(frozen=True)
class PreconditionerConfig:
    """Base class of every preconditioner config (also of the grafting configs).

    Family facts live on the config class, so code that must tell families apart asks the
    config instead of testing its type: ``family`` (the ``configure_shampoo`` preset it belongs
    to, ``None`` if none), ``kronecker`` (keeps Kronecker factors whose EMA ``betas[1]`` sets),
    ``diagonal`` (elementwise: usable as ``grafting_config``), ``min_block_order`` (dims never
    merged below this: 2 for families that need matrices).
    """

    family: ClassVar[str | None] = None
    kronecker: ClassVar[bool] = False
    diagonal: ClassVar[bool] = False
    min_block_order: ClassVar[int] = 1


class RefreshResult(NamedTuple):
    """Per-block failure mask ``[n]`` and one spectrum record per factor (``None`` if unknown)."""

    failed: Tensor
    stats: tuple[SpectrumStats | None, ...]


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without dispatching anything when it already is (hot paths count ops)."""
    return x if x.dtype == dtype else x.to(dtype)


def ema_(state: Tensor, new: Tensor, ema: Ema) -> None:
    """``state ← β·state + (1-β)·new`` on live blocks, unchanged elsewhere; ``β = 1`` sums.

    Contract: ``new`` is zero on dead blocks (the pipeline zeroes their gradient), so sums need
    no mask; the EMA masks its weight. In place, no temporaries of the state's size.
    """
    new = as_dtype(new, state.dtype)
    if ema.beta == 1.0:
        state.add_(new)
    else:
        state.lerp_(new, per_block(as_dtype(ema.weight, state.dtype), state.ndim))


def add_outer_(factor: Tensor, x: Tensor, dim: int, alpha: float, ctx: Context | None = None) -> None:
    """``factor += alpha · X₍dim₎X₍dim₎ᵀ`` in place (one fused ``baddbmm``)."""
    x = as_dtype(x, factor.dtype)
    left, right = outer_operands(x, dim) if ctx is None else ctx.operands(x, dim)
    if left.shape[-1] == 1:  # rank one (1-D blocks): CPU baddbmm with alpha rounds differently
        factor.add_(left * right, alpha=alpha)  # for a batch of one; bucketed == per-block
    else:
        factor.baddbmm_(left, right, alpha=alpha)


def accumulate_outer_(factor: Tensor, x: Tensor, dim: int, ema: Ema, ctx: Context | None = None) -> None:
    """``factor ← β·factor + (1-β)·X₍dim₎X₍dim₎ᵀ`` in place, dead blocks (zero ``x``) unchanged;
    ``factor`` full ``[n, d, d]`` or packed ``[n, d(d+1)/2]``."""
    alpha = 1.0 if ema.beta == 1.0 else 1.0 - ema.beta
    if ema.beta != 1.0:
        factor.mul_(per_block(as_dtype(ema.keep, factor.dtype), factor.ndim))
    if factor.ndim == 3:
        add_outer_(factor, x, dim, alpha, ctx)
    else:
        _add_outer_packed_(factor, as_dtype(x, factor.dtype), dim, alpha, ctx)


def _add_outer_packed_(factor: Tensor, x: Tensor, dim: int, alpha: float, ctx: Context | None) -> None:
    """``factor += alpha · upper(X₍dim₎X₍dim₎ᵀ)`` for a packed factor: the product into the lane's
    shared full buffer, its upper triangle gathered into a shared packed one (through flat views
    cached per bucket, so the plain step makes none), then one ``add_``."""
    left, right = outer_operands(x, dim) if ctx is None else ctx.operands(x, dim)
    n, d = left.shape[0], left.shape[1]
    if ctx is None:
        full = left.new_empty(n, d, d)
        flat = full.view(n, d * d)
        delta = factor.new_empty(factor.shape)
    else:
        full = ctx.buffer("outer", (n, d, d), factor.dtype, factor.device)
        flat = ctx.view(("outer_flat", dim), lambda: full.view(n, d * d))
        delta = ctx.buffer("outer_packed", tuple(factor.shape), factor.dtype, factor.device)
    if left.shape[-1] == 1:  # rank one: elementwise, so a block rounds alike in any batch
        torch.mul(left, right, out=full)
    else:
        torch.bmm(left, right, out=full)
    torch.index_select(flat, -1, upper_index(d, factor.device), out=delta)
    factor.add_(delta, alpha=alpha)


def decay_(pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """``tensor ← tensor · keep`` for many ``(tensor, per-block keep view)`` pairs: one
    ``_foreach_mul_`` however many buckets (and so one kernel launch on a GPU)."""
    if pairs:
        torch._foreach_mul_([t for t, _ in pairs], [k for _, k in pairs])


def accumulate_factors_many(jobs: Sequence[tuple[Sequence[int], dict[str, Tensor], Tensor, Context]]) -> None:
    """``accumulate_outer_`` of ``factor.{i}`` for every dim ``i`` of many buckets: one
    ``_foreach_mul_`` decays every factor, then one ``baddbmm`` per factor adds ``(1-β₂)·GGᵀ``.
    A factor stored packed (``[n, d(d+1)/2]``) takes the product through a shared full buffer,
    then its upper triangle. ``jobs``: per bucket, its factored dims, its state, its gradient and
    its context."""
    decay_(
        [
            (state[f"factor.{i}"], ctx.ema2.shaped("keep", state[f"factor.{i}"].ndim))
            for dims, state, _, ctx in jobs
            if ctx.ema2.beta != 1.0
            for i in dims
        ]
    )
    for dims, state, grad, ctx in jobs:
        alpha = 1.0 if ctx.ema2.beta == 1.0 else 1.0 - ctx.ema2.beta
        for i in dims:
            factor = state[f"factor.{i}"]
            if factor.ndim == 3:
                add_outer_(factor, grad, i, alpha, ctx)
            else:
                _add_outer_packed_(factor, as_dtype(grad, factor.dtype), i, alpha, ctx)


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
            x = (left.mT if transpose else left) @ as_dtype(x, left.dtype)
        if right is not None:
            x = as_dtype(x, right.dtype) @ (right if transpose else right.mT)
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


def full_matrix(stored: Tensor, d: int, ctx: Context | None, key: Any) -> Tensor:
    """A symmetric matrix state as ``[n, d, d]``: as it is when stored full; when stored packed
    (``[n, d(d+1)/2]``) unpacked — into the lane's shared buffer ``key`` when a context is given
    (the plain step: one ``index_select`` into a flat view cached per bucket, nothing allocated),
    else into a new tensor."""
    if stored.ndim == 3:
        return stored
    shape = (stored.shape[0], d, d)
    if ctx is None:
        return unpack_into(stored, stored.new_empty(shape))
    full = ctx.buffer(key, shape, stored.dtype, stored.device)
    flat = ctx.view(("flat", key), lambda: full.view(shape[0], d * d))
    torch.index_select(stored, -1, symmetric_index(d, stored.device), out=flat)
    return full


def store_symmetric_(target: Tensor, full: Tensor, ok: Tensor) -> None:
    """``commit_`` a full symmetric ``[n, d, d]`` into ``target``, packed or full as it is stored."""
    commit_(target, full if target.ndim == 3 else pack(full), ok)


def precondition_kronecker_into(x: Tensor, roots: Mapping[int, Tensor], out: Tensor, scratch: Tensor) -> None:
    """``out ← x ×ᵢ Rᵢ`` along every dim that has a (symmetric) root ``Rᵢ``: for 2-D blocks
    ``L·X·R`` as two ``matmul(out=)`` calls through ``scratch``, with no temporaries."""
    same = all(r.dtype == x.dtype for r in roots.values()) and out.dtype == x.dtype
    if x.ndim == 3 and same:
        left, right = roots.get(0), roots.get(1)
        if left is not None and right is not None:
            torch.matmul(left, x, out=scratch)
            torch.matmul(scratch, right, out=out)
        elif left is not None:
            torch.matmul(left, x, out=out)
        elif right is not None:
            torch.matmul(x, right, out=out)
        else:
            out.copy_(x)
        return
    out.copy_(apply_along_dims(x, roots))


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


class Preconditioner:
    """Kernel for one family over one bucket; subclasses override what they need.

    ``linear``: ``precondition(c·m) = c·precondition(m)`` for per-block scalars ``c`` — the
    optimizer then hands it the raw filtered-gradient buffer and applies the bias correction
    ``1/(1 − β₁ᵗ)`` to the result (one multiply shared with the grafting scale) instead of
    materialising ``m / (1 − β₁ᵗ)``. ``keeps_first_moment``: the kernel keeps the β₁-filtered
    gradient itself (in its own basis), so the optimizer keeps none for its buckets.
    ``compilable``: the plain-step methods depend on tensors only, never on the host step count
    (``ctx.step``), so ``torch.compile`` traces them once (``ShampooPT2CompileConfig``).
    """

    kind: str = "identity"
    amortized: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    keeps_first_moment: ClassVar[bool] = False
    compilable: ClassVar[bool] = True

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

    def state_schema(self, dtype: torch.dtype, options: Mapping[str, Any]) -> dict[str, StateSpec]:
        """Every state tensor this kernel keeps per block. ``dtype``: the gradient's compute
        dtype; ``options``: the param group (e.g. ``refresh_tolerance``, ``betas``)."""
        return {}

    def init_state(
        self, n: int, device: torch.device, dtype: torch.dtype, options: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """The declared state of ``n`` blocks at its initial values (for using a kernel on its own)."""
        options = {"betas": (0.0, 1.0), "momentum": 0.0, **(options or {})}
        return {name: spec.allocate(n, device) for name, spec in self.state_schema(dtype, options).items()}

    def update(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> None:
        """Accumulate statistics from this step's gradient (dead blocks are zero and ``live=0``)."""

    @classmethod
    def update_many(cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context]]) -> None:
        """``update`` for many buckets of this family (override to fuse across buckets)."""
        for kernel, state, grad, ctx in jobs:
            kernel.update(state, grad, ctx)

    def refresh(self, state: dict[str, Tensor], ctx: Context, commit: Tensor) -> RefreshResult:
        """Amortized recomputation; commits new values only where ``commit`` and not failed."""
        return RefreshResult(torch.zeros_like(commit), ())

    def update_after_refresh(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, scratch: Tensor | None = None
    ) -> None:
        """Statistics kept in the refreshed basis (SOAP's second moment); ``scratch`` (the shape of
        ``grad``, free to clobber) spares a temporary."""

    @classmethod
    def update_after_refresh_many(
        cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context, Tensor]]
    ) -> None:
        """``update_after_refresh`` for many buckets of this family (override to fuse)."""
        for kernel, state, grad, ctx, scratch in jobs:
            kernel.update_after_refresh(state, grad, ctx, scratch)

    def precondition(self, state: dict[str, Tensor], grad: Tensor, ctx: Context) -> Tensor:
        """The search direction for ``grad`` (may return ``grad`` itself)."""
        return grad

    def precondition_into(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, out: Tensor, scratch: Tensor
    ) -> None:
        """Write ``precondition(grad)`` into ``out``; ``scratch`` (same shape, free to clobber)
        spares a temporary. ``grad`` must not alias either."""
        out.copy_(self.precondition(state, grad, ctx))

    @classmethod
    def precondition_many(
        cls, jobs: Sequence[tuple[Preconditioner, dict[str, Tensor], Tensor, Context, Tensor, Tensor]]
    ) -> None:
        """``precondition_into(state, grad, ctx, out, scratch)`` for many buckets of this family."""
        for kernel, state, grad, ctx, out, scratch in jobs:
            kernel.precondition_into(state, grad, ctx, out, scratch)

    def first_moment_into(
        self, state: dict[str, Tensor], grad: Tensor, ctx: Context, out: Tensor, scratch: Tensor
    ) -> None:
        """With ``keeps_first_moment``: this step's unnormalised filtered gradient in the
        parameter's basis (``grad``: the gradient buffer after ``update_after_refresh``)."""
        raise NotImplementedError

    def adopt_legacy(self, entries: dict[str, Tensor]) -> None:
        """Fill, in a checkpoint's ``{"section.name": tensor}`` entries of one block, what an
        earlier version of this kernel did not save but can be derived (default: nothing)."""

    def drift(self, state: dict[str, Tensor], ctx: Context) -> Tensor | None:
        """Per-block relative drift ``[n]`` of the statistics since the last refresh, used to skip
        refreshes that would change little; ``None``: unknown (always refresh)."""
        return None

    def health_stats(self, state: dict[str, Tensor]) -> tuple[SpectrumStats | None, ...] | None:
        """Per-factor spectrum figures the kernel tracks itself (read lazily by ``health()``);
        ``None`` means the optimizer's refresh-time records apply."""
        return None
