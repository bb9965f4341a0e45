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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor

from ..linalg import SpectrumStats

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


@dataclass(frozen=True)
class StateSpec:
    """One state tensor per block: its per-block ``shape``, ``dtype`` and initial value (a
    number, or ``"identity"`` for square matrices)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | Literal["identity"] = 0.0
    scale: float = 1.0  # of the identity

    def allocate(self, n: int, device: torch.device | str) -> Tensor:
        if self.fill == "identity":
            eye = identity(n, self.shape[-1], dtype=self.dtype, device=torch.device(device))
            return eye if self.scale == 1.0 else eye.mul_(self.scale)
        return torch.full((n, *self.shape), self.fill, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class Ema:
    """Per-block views (``[n]``) that drive one exponential moving average with factor ``beta``:
    ``keep`` (β on live blocks, 1 on dead ones), ``weight`` (1 − β on live blocks, 0 on dead
    ones) and ``correction`` (``1 − βᵗ`` with ``t`` the block's own step count, or 1 where there
    is no bias correction). Their values are recomputed every step; the views stay, and so do
    their broadcastable shapes (``shaped``), so a plain step creates no views."""

    beta: float
    keep: Tensor
    weight: Tensor
    correction: Tensor
    root: Tensor | None = None  # sqrt(correction), where a kernel asks for it (Adam's denominator)
    _shaped: dict[tuple[str, int], Tensor] = field(default_factory=dict, compare=False, repr=False)

    def shaped(self, name: Literal["keep", "weight", "correction", "root"], ndim: int) -> Tensor:
        """``keep``/``weight``/``correction`` as ``[n, 1, …]`` broadcasting against ``ndim`` dims."""
        view = self._shaped.get((name, ndim))
        if view is None:
            view = self._shaped[(name, ndim)] = per_block(getattr(self, name), ndim)
        return view


@dataclass
class Context:
    """What a kernel needs to know about the current step for one bucket.

    Built once per bucket by the optimizer's workspace (the tensors are views of per-block
    vectors it refreshes every step); ``step`` and ``warm`` are set each step. ``live`` is
    ``1.0`` for blocks that take part in this step and ``0.0`` for blocks whose gradient is
    missing or non-finite: their statistics must stay exactly unchanged.
    """

    step: int
    beta2: float
    epsilon: float
    use_bias_correction: bool
    live: Tensor
    block_step: Tensor  # [n] int64: steps each block took part in (its bias corrections' t)
    ema2: Ema  # the group's betas[1] (Kronecker factors, SOAP's second moment)
    ema1: Ema  # betas[0] (the filtered gradient); correction = 1 − β₃·β₁ᵗ⁻¹
    diagonal: Ema  # the diagonal kernel's β₂ (as main preconditioner or grafting)
    epsilon_scale: Tensor | None = None
    warm: bool = False  # on refresh: every block of the bucket was refreshed before
    #: How the filtered gradient follows the gradients: ``m ← lerp(m, g, (1-β₁)·live)``;
    #: ``beta1 = None`` when the current step uses β₃ ≠ β₁ instead.
    beta1: float | None = 0.0
    beta3: float = 0.0
    #: The optimizer's gradient buffer of this bucket and its outer-product operands per dim
    #: (views made once, so factor updates create no views per step).
    grad_buffer: Tensor | None = None
    grad_operands: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)
    #: Views of this bucket's state a kernel makes once (e.g. transposed bases); see ``view``.
    views: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def view(self, key: Any, make: Callable[[], Tensor]) -> Tensor:
        """A cached view of persistent state (valid while the workspace that built this context
        is: state tensors are updated in place, never replaced, while it lives)."""
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = make()
        return view

    def operands(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """``outer_operands(x, dim)``, from the cache when ``x`` is the gradient buffer."""
        if x is self.grad_buffer and dim in self.grad_operands:
            return self.grad_operands[dim]
        return outer_operands(x, dim)

    @property
    def bias_correction2(self) -> Tensor:
        """``1 - β₂ᵗ`` per block for EMA statistics; 1 for sums (β₂ = 1) or without correction."""
        return self.ema2.correction

    def previous_bias_correction2(self) -> Tensor | float:
        """``bias_correction2`` one step earlier (at least step 1): what statistics computed
        before this step's update were normalised with."""
        if not (self.use_bias_correction and self.beta2 < 1.0):
            return 1.0
        t = (self.block_step - 1).clamp_min(1).to(self.live.dtype)
        return 1.0 - torch.pow(self.beta2, t)

    def block_epsilon(self, dtype: torch.dtype | None = None) -> Tensor | float:
        """Per-block damping for refreshes: ``epsilon`` times the block's retry scale, formed in
        ``dtype`` (the statistics' precision: a float32 product would round a float64 epsilon)."""
        if self.epsilon_scale is None:
            return self.epsilon
        scale = self.epsilon_scale if dtype is None else self.epsilon_scale.to(dtype)
        return self.epsilon * scale

    @classmethod
    def uniform(
        cls,
        step: int,
        beta2: float,
        epsilon: float,
        use_bias_correction: bool,
        live: Tensor,
        *,
        beta1: float = 0.0,
        epsilon_scale: Tensor | None = None,
        warm: bool = False,
    ) -> Context:
        """A context for ``n = len(live)`` blocks that all took every step so far (for using a
        kernel on its own, e.g. in tests; the optimizer builds its contexts from its workspace)."""
        n = live.shape[0]

        def ema(beta: float, corrected: bool) -> Ema:
            keep = torch.where(live > 0, beta, 1.0).to(live.dtype)
            correction = torch.full((n,), 1.0 - beta**step if corrected else 1.0, dtype=live.dtype)
            return Ema(beta, keep, (1.0 - keep), correction, correction.sqrt())

        return cls(
            step=step,
            beta2=beta2,
            epsilon=epsilon,
            use_bias_correction=use_bias_correction,
            live=live,
            block_step=torch.full((n,), step, dtype=torch.int64),
            ema2=ema(beta2, use_bias_correction and beta2 < 1.0),
            ema1=ema(beta1, use_bias_correction and 0.0 < beta1 < 1.0),
            diagonal=ema(1.0, False),
            epsilon_scale=epsilon_scale,
            warm=warm,
            beta1=beta1,
            beta3=beta1,
        )

    def rows(self, rows: Tensor) -> Context:
        """The context of a subset of the bucket's blocks (a partial refresh)."""

        def pick(ema: Ema) -> Ema:
            root = None if ema.root is None else ema.root[rows]
            return Ema(ema.beta, ema.keep[rows], ema.weight[rows], ema.correction[rows], root)

        scale = None if self.epsilon_scale is None else self.epsilon_scale[rows]
        return replace(
            self,
            grad_buffer=None,
            grad_operands={},
            views={},
            live=self.live[rows],
            block_step=self.block_step[rows],
            ema2=pick(self.ema2),
            ema1=pick(self.ema1),
            diagonal=pick(self.diagonal),
            epsilon_scale=scale,
        )


class RefreshResult(NamedTuple):
    """Per-block failure mask ``[n]`` and one spectrum record per factor (``None`` if unknown)."""

    failed: Tensor
    stats: tuple[SpectrumStats | None, ...]


def per_block(values: Tensor, ndim: int) -> Tensor:
    """Reshape per-block values ``[n]`` to broadcast against ``[n, *block]`` of total ``ndim``."""
    return values.view(values.shape[0], *([1] * (ndim - 1)))


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


def outer_operands(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(X₍dim₎, X₍dim₎ᵀ)`` of every block of ``x: [n, *block]`` as batched matrices (views for
    2-D blocks)."""
    if x.ndim == 3:
        return (x, x.mT) if dim == 0 else (x.mT, x)
    moved = x.movedim(dim + 1, 1).reshape(x.shape[0], x.shape[dim + 1], -1)
    return moved, moved.mT


def add_outer_(factor: Tensor, x: Tensor, dim: int, alpha: float, ctx: Context | None = None) -> None:
    """``factor += alpha · X₍dim₎X₍dim₎ᵀ`` in place (one fused ``baddbmm``)."""
    x = as_dtype(x, factor.dtype)
    left, right = outer_operands(x, dim) if ctx is None else ctx.operands(x, dim)
    if left.shape[-1] == 1:  # rank one (1-D blocks): CPU baddbmm with alpha rounds differently
        factor.add_(left * right, alpha=alpha)  # for a batch of one; bucketed == per-block
    else:
        factor.baddbmm_(left, right, alpha=alpha)


def accumulate_outer_(factor: Tensor, x: Tensor, dim: int, ema: Ema) -> None:
    """``factor ← β·factor + (1-β)·X₍dim₎X₍dim₎ᵀ`` in place, dead blocks (zero ``x``) unchanged."""
    if ema.beta == 1.0:
        add_outer_(factor, x, dim, 1.0)
        return
    factor.mul_(per_block(as_dtype(ema.keep, factor.dtype), factor.ndim))
    add_outer_(factor, x, dim, 1.0 - ema.beta)


def decay_(pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
    """``tensor ← tensor · keep`` for many ``(tensor, per-block keep view)`` pairs: one
    ``_foreach_mul_`` however many buckets (and so one kernel launch on a GPU)."""
    if pairs:
        torch._foreach_mul_([t for t, _ in pairs], [k for _, k in pairs])


def accumulate_factors_many(jobs: Sequence[tuple[Sequence[int], dict[str, Tensor], Tensor, Context]]) -> None:
    """``accumulate_outer_`` of ``factor.{i}`` for every dim ``i`` of many buckets: one
    ``_foreach_mul_`` decays every factor, then one ``baddbmm`` per factor adds ``(1-β₂)·GGᵀ``.
    ``jobs``: per bucket, its factored dims, its state, its gradient and its context."""
    decay_(
        [
            (state[f"factor.{i}"], ctx.ema2.shaped("keep", 3))
            for dims, state, _, ctx in jobs
            if ctx.ema2.beta != 1.0
            for i in dims
        ]
    )
    for dims, state, grad, ctx in jobs:
        alpha = 1.0 if ctx.ema2.beta == 1.0 else 1.0 - ctx.ema2.beta
        for i in dims:
            add_outer_(state[f"factor.{i}"], grad, i, alpha, ctx)


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


def identity(n: int, d: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.eye(d, dtype=dtype, device=device).expand(n, d, d).clone()


class Preconditioner:
    """Kernel for one family over one bucket; subclasses override what they need.

    ``linear``: ``precondition(c·m) = c·precondition(m)`` for per-block scalars ``c`` — the
    optimizer then hands it the raw filtered-gradient buffer and applies the bias correction
    ``1/(1 − β₁ᵗ)`` to the result (one multiply shared with the grafting scale) instead of
    materialising ``m / (1 − β₁ᵗ)``. ``keeps_first_moment``: the kernel keeps the β₁-filtered
    gradient itself (in its own basis), so the optimizer keeps none for its buckets.
    """

    kind: str = "identity"
    amortized: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    keeps_first_moment: ClassVar[bool] = False

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
