"""The plain step as named stages over a lane (see ``_workspace``), in the design contract's order::

    gather → guard → ema_table → statistics → [refresh] → after_refresh → filter
           → direction (precondition, graft, fallback) → weight decay → momentum → learning rate
           → averaging (GPA / Schedule-Free, ``_averaging_stage``)

Each stage takes the lane, per-group host facts (``GroupStep``) and tensors, and works on every
bucket of the lane at once: elementwise work is one ``torch._foreach_*`` call (or one op on a
lane vector) however many buckets there are; only the batched matmuls of the Kronecker kernels
are per bucket. Nothing here synchronises with the device or allocates (beyond what the
foreach norms return); the host decides every branch from the step count and the group options.
The refresh stage lives in ``_refresh`` (it may synchronise: it is amortized).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._averaging_stage import averaging
from ._workspace import Lane, Slot, shaped
from .health import FALLBACK_CODES
from .preconditioners import Preconditioner
from .preconditioners.diagonal import DiagonalPreconditioner

__all__ = [
    "GroupStep",
    "after_refresh",
    "apply_updates",
    "averaging",
    "direction",
    "ema_table",
    "filter_moments",
    "gather",
    "guard",
    "learning_rate",
    "momentum",
    "statistics",
    "weight_decay",
]

_TINY = 1e-16  # grafting ratio: ‖graft‖ / (‖P‖ + tiny)


@dataclass(frozen=True)
class GroupStep:
    """What the host knows of one param group at this step."""

    step: int
    lr: float | Tensor
    grafting_only: bool  # before start_preconditioning_step: the grafting direction alone
    weight_decay: float
    decoupled: bool
    momentum: float
    dampening: float
    nesterov: bool
    torch_momentum: bool = False  # torch.optim.SGD's first step (undamped) instead of DS's
    averaging: Any = None  # GeneralizedPrimalAveragingConfig / ScheduleFreeConfig, or None


def _cached(lane: Lane, key: Any, build: Callable[[], Any]) -> Any:
    value = lane.cache.get(key)
    if value is None:
        value = lane.cache[key] = build()
    return value


# ------------------------------------------------------------------------------------ gather


def _source(link: Any, grad: Tensor, processed: dict[int, Tensor]) -> Tensor:
    layout, region = link.layout, link.region
    if len(layout.regions) == 1 and layout.regions[0] is region and grad.is_contiguous():
        return grad.view(region.split_shape)
    base = processed.get(layout.index)
    if base is None:
        base = processed[layout.index] = layout.processed(grad)
    return region.split_view(base)


def gather(lane: Lane, grads: Sequence[Tensor | None]) -> tuple[Tensor, bool]:
    """Copy every gradient region into the lane's gradient buffer (one ``_foreach_copy_``);
    rows of missing gradients are zeroed. Returns the ``present`` mask ``[N]`` and whether
    every gradient was present."""
    dsts, srcs, missing = [], [], []
    processed: dict[int, Tensor] = {}
    for slot in lane.slots:
        for i, link in enumerate(slot.links):
            grad = grads[link.layout.index]
            if grad is None:
                missing.append((slot, i))
            elif link.grad_like_param is not None:
                dsts.append(link.grad_like_param)
                srcs.append(grad)
            else:
                dsts.append(link.grad_rows)
                srcs.append(_source(link, grad, processed))
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    key = ("present", tuple((slot.start, i) for slot, i in missing))

    def present() -> Tensor:
        mask = torch.ones(lane.size, dtype=torch.bool, device=lane.device)
        for slot, i in missing:
            link = slot.links[i]
            mask[link.row : link.row + link.region.count] = False
        return mask

    if missing:
        torch._foreach_zero_([slot.links[i].grad_rows for slot, i in missing])
    return _cached(lane, key, present), not missing


def l2_decay(lane: Lane, steps: Sequence[GroupStep], param_views: Callable[[Any], Tensor]) -> None:
    """``g += wd·p`` for groups with L2 (coupled) weight decay (one foreach call per value)."""
    by_value: dict[float, list[Any]] = {}
    for slot in lane.slots:
        s = steps[slot.bucket.group]
        if s.weight_decay != 0.0 and not s.decoupled:
            by_value.setdefault(s.weight_decay, []).extend(slot.links)
    for wd, links in by_value.items():
        torch._foreach_add_(
            [link.grad_rows for link in links], [param_views(link) for link in links], alpha=wd
        )


# ------------------------------------------------------------------------------------- guard


def guard(lane: Lane, present: Tensor, all_present: bool) -> None:
    """Per-block finite mask of the gradient: a block with a NaN/inf entry (or an overflowing
    norm) is dead this step — zeroed, its statistics and step count left exactly unchanged, and
    counted in ``nonfinite``. Missing gradients are dead too (not counted)."""
    v = lane.vectors
    torch.stack(torch._foreach_norm(lane.grad_blocks), out=v["gnorm"])
    torch.lt(v["gnorm"], math.inf, out=v["alive"])
    if not all_present:
        v["alive"].logical_and_(present)
    torch.logical_xor(present, v["alive"], out=v["flag"])
    lane.status["nonfinite"].add_(v["flag"])
    v["alive_f"].copy_(v["alive"])
    torch.nan_to_num_(lane.grad, nan=0.0, posinf=0.0, neginf=0.0)
    grads = _cached(lane, "grads", lambda: [s.grad for s in lane.slots])
    alive = _cached(lane, "alive_views", lambda: [shaped(v["alive_f"], s, s.grad.ndim) for s in lane.slots])
    torch._foreach_mul_(grads, alive)
    lane.status["step"].add_(v["alive"])


def ema_table(lane: Lane) -> None:
    """Per block and EMA row: ``keep`` (β live, 1 dead), ``weight`` (1−β live, 0 dead) and the
    bias correction ``1 − c·βᵗ⁻ˢ`` from the block's own step count ``t`` (computed as
    ``exp(t·log β + log c − s·log β)`` in float64: ``pow`` on CPU would round an element
    differently depending on where it sits, and sharded == single device must hold bitwise)."""
    t = lane.table
    t["t"].copy_(lane.status["step"])
    torch.addcmul(t["offset"], t["log_beta"], t["t"], out=t["power"])
    torch.expm1(t["power"], out=t["correction"]).neg_()  # float64 → the lane's dtype, then exact
    alive = lane.vectors["alive"]
    torch.where(alive, t["live_keep_weight"], t["dead_keep_weight"], out=t["keep_weight"])
    torch.sqrt(t["correction"], out=t["root"])
    torch.reciprocal(t["correction1"], out=t["inverse1"])


# -------------------------------------------------------------------------------- statistics


def statistics(lane: Lane) -> None:
    """Every kernel's statistics from this step's gradient, one ``update_many`` per family."""

    def jobs() -> list[tuple[type, list[Any]]]:
        by_family: dict[type, list[Any]] = {}
        for slot in lane.slots:
            kernel = slot.kernel
            by_family.setdefault(type(kernel), []).append(
                (kernel, slot.state["precond"], slot.grad, slot.ctx)
            )
            if slot.bucket.graft is not None:
                graft = (slot.bucket.graft, slot.state["graft"], slot.grad, slot.graft_ctx)
                by_family.setdefault(type(slot.bucket.graft), []).append(graft)
        return list(by_family.items())

    for family, family_jobs in _cached(lane, "statistics", jobs):
        family.update_many(family_jobs)


def after_refresh(lane: Lane) -> None:
    """Statistics kept in the refreshed basis (SOAP); they may consume the gradient buffer."""

    def jobs() -> list[tuple[type, list[Any]]]:
        by_family: dict[type, list[Any]] = {}
        for slot in lane.slots:
            kernel = slot.kernel
            if type(kernel).update_after_refresh is not Preconditioner.update_after_refresh:
                job = (kernel, slot.state["precond"], slot.grad, slot.ctx, slot.scratch)
                by_family.setdefault(type(kernel), []).append(job)
        return list(by_family.items())

    for family, family_jobs in _cached(lane, "after", jobs):
        family.update_after_refresh_many(family_jobs)


def filter_moments(lane: Lane) -> None:
    """``m ← lerp(m, g, (1−β₁)·live)`` for every bucket with a filtered gradient (one foreach).
    With β₃ ≠ β₁ the step uses ``lerp(m_old, g, 1−β₃)``, left in the gradient buffer."""

    def lists() -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Slot]]:
        plain = [s for s in lane.slots if "filtered_grad" in s.state["moments"] and s.ctx.beta1 is not None]
        other = [s for s in lane.slots if "filtered_grad" in s.state["moments"] and s.ctx.beta1 is None]
        return (
            [s.state["moments"]["filtered_grad"] for s in plain],
            [s.grad for s in plain],
            [s.ctx.ema1.shaped("weight", s.grad.ndim) for s in plain],
            other,
        )

    moments, grads, weights, other = _cached(lane, "filter", lists)
    if moments:
        torch._foreach_lerp_(moments, grads, weights)
    for slot in other:
        m = slot.state["moments"]["filtered_grad"]
        current = torch.lerp(
            m, slot.grad, shaped(lane.vectors["alive_f"], slot, m.ndim) * (1.0 - slot.ctx.beta3)
        )
        m.lerp_(slot.grad, slot.ctx.ema1.shaped("weight", m.ndim))
        slot.grad.copy_(current)


def moment_of(slot: Slot) -> Tensor:
    """The buffer holding this step's unnormalised filtered gradient."""
    if slot.ctx.beta1 is None or slot.kernel.keeps_first_moment:
        return slot.grad
    return slot.moment


# --------------------------------------------------------------------------------- direction


def direction(lane: Lane, steps: Sequence[GroupStep], fallback: frozenset[str]) -> None:
    """The search direction of every block into the lane's ``out`` buffer, scaled (grafting,
    β₁'s bias correction) and with failed blocks zeroed; counts failures.

    Linear kernels precondition the raw filtered gradient ``m`` and the result is multiplied by
    ``1/(1 − β₁ᵗ)`` afterwards (together with the grafting ratio ``‖A(m)‖ / ‖P(m)‖``, which is
    the same for ``m`` and its normalised value); non-linear ones get ``m / (1 − β₁ᵗ)``.
    """
    flags = tuple(steps[g].grafting_only for g in range(len(steps)))
    plan = _cached(lane, ("direction", flags, fallback), lambda: _direction_plan(lane, flags, fallback))
    v, t = lane.vectors, lane.table
    for slot, buffer in plan.unrotate:
        slot.kernel.first_moment_into(slot.state["precond"], slot.grad, slot.ctx, buffer, slot.scratch)
    for family, jobs in plan.kronecker_jobs:
        family.precondition_many(jobs)
    for slot in plan.nonlinear:
        f = torch.mul(moment_of(slot), shaped(t["inverse1"], slot, slot.grad.ndim), out=slot.scratch)
        slot.out.copy_(slot.kernel.precondition(slot.state["precond"], f, slot.ctx))
    DiagonalPreconditioner.denominators_into(plan.denominators)
    if plan.divide_outs:
        torch._foreach_copy_(plan.divide_outs, plan.divide_moments)
        torch._foreach_div_(plan.divide_outs, plan.divide_denominators)
    if plan.copy_outs:
        torch._foreach_copy_(plan.copy_outs, plan.copy_moments)
    DiagonalPreconditioner.denominators_into(plan.late_denominators)
    if plan.graft_scratch:
        torch._foreach_reciprocal_(plan.graft_scratch)
        torch._foreach_mul_(plan.graft_scratch, plan.graft_moments)
    for slot in plan.fallback:
        _fallback(lane, slot, plan.moments.get(slot.bucket.key, moment_of(slot)))
    torch.stack(torch._foreach_norm(lane.out_blocks), out=v["dnorm"])
    ratio = v["ratio"]
    if plan.any_graft:
        torch.stack(torch._foreach_norm(plan.graft_blocks), out=v["anorm"])
        torch.add(v["dnorm"], _TINY, out=v["aux"])
        torch.div(v["anorm"], v["aux"], out=ratio)
        torch.where(plan.graft_mask, ratio, lane.one, out=ratio)
    else:
        ratio.fill_(1.0)
    if plan.fallback:
        torch.where(lane.status["fallback"] > 0, lane.one, ratio, out=ratio)
    torch.lt(v["dnorm"], math.inf, out=v["ok"])
    v["ok"].logical_and_(v["alive"])
    torch.logical_xor(v["alive"], v["ok"], out=v["flag"])
    lane.status["failures"].add_(v["flag"])
    torch.where(plan.linear_mask, t["inverse1"], lane.one, out=v["bcscale"])
    ratio.mul_(v["bcscale"])
    torch.where(v["ok"], ratio, lane.zero, out=v["scale"])
    torch.nan_to_num_(lane.out, nan=0.0, posinf=0.0, neginf=0.0)
    torch._foreach_mul_(plan.outs, plan.scale_views)


@dataclass
class _DirectionPlan:
    """What ``direction`` does for a given set of host flags (cached per flags)."""

    unrotate: list[tuple[Slot, Tensor]] = field(
        default_factory=list
    )  # kernels keeping the moment in their own basis
    moments: dict[str, Tensor] = field(default_factory=dict)  # those moments in the parameter's basis
    kronecker: list[Slot] = field(default_factory=list)
    kronecker_jobs: list[tuple[type, list[Any]]] = field(default_factory=list)
    nonlinear: list[Slot] = field(default_factory=list)
    denominators: list[Any] = field(default_factory=list)
    late_denominators: list[Any] = field(
        default_factory=list
    )  # grafts of diagonal main kernels (scratch busy before)
    divide_outs: list[Tensor] = field(default_factory=list)
    divide_moments: list[Tensor] = field(default_factory=list)
    divide_denominators: list[Tensor] = field(default_factory=list)
    copy_outs: list[Tensor] = field(default_factory=list)
    copy_moments: list[Tensor] = field(default_factory=list)
    graft_scratch: list[Tensor] = field(default_factory=list)
    graft_moments: list[Tensor] = field(default_factory=list)
    graft_blocks: list[Tensor] = field(default_factory=list)
    fallback: list[Slot] = field(default_factory=list)
    outs: list[Tensor] = field(default_factory=list)
    scale_views: list[Tensor] = field(default_factory=list)
    graft_mask: Tensor | None = None
    linear_mask: Tensor | None = None
    any_graft: bool = False


def _direction_plan(lane: Lane, grafting_only: tuple[bool, ...], fallback: frozenset[str]) -> _DirectionPlan:
    p = _DirectionPlan()
    graft_mask = torch.zeros(lane.size, dtype=torch.bool, device=lane.device)
    linear_mask = torch.zeros(lane.size, dtype=torch.bool, device=lane.device)
    for slot in lane.slots:
        kernel, graft = slot.kernel, slot.bucket.graft
        only = grafting_only[slot.bucket.group] and graft is not None
        main = graft if only else kernel
        assert main is not None
        m = moment_of(slot)
        if kernel.keeps_first_moment and (graft is not None or slot.bucket.key in fallback):
            m = p.moments[slot.bucket.key] = _cached(lane, ("moment", slot.bucket.key), _like(slot.grad))
            p.unrotate.append((slot, m))
        rows = slice(slot.start, slot.start + slot.n)
        if isinstance(main, DiagonalPreconditioner):
            linear_mask[rows] = True
            state = slot.state["graft" if only else "precond"]
            ctx = slot.graft_ctx if only else slot.ctx
            if main.kind == "sgd":
                p.copy_outs.append(slot.out)
                p.copy_moments.append(m)
            else:
                p.denominators.append((main, state, ctx, slot.scratch))
                p.divide_outs.append(slot.out)
                p.divide_moments.append(m)
                p.divide_denominators.append(slot.scratch)
        else:
            (p.kronecker if kernel.linear else p.nonlinear).append(slot)
            linear_mask[rows] = kernel.linear
        if isinstance(graft, DiagonalPreconditioner) and not only:
            graft_mask[rows] = True
            if graft.kind == "sgd":
                p.graft_blocks += list(m.unbind(0))
            else:
                late = isinstance(kernel, DiagonalPreconditioner) and kernel.kind != "sgd"
                (p.late_denominators if late else p.denominators).append(
                    (graft, slot.state["graft"], slot.graft_ctx, slot.scratch)
                )
                p.graft_scratch.append(slot.scratch)
                p.graft_moments.append(m)
                p.graft_blocks += list(slot.scratch.unbind(0))
        else:
            p.graft_blocks += list(slot.out.unbind(0))
        if slot.bucket.key in fallback:
            p.fallback.append(slot)
        p.outs.append(slot.out)
        p.scale_views.append(shaped(lane.vectors["scale"], slot, slot.out.ndim))
    p.graft_mask, p.linear_mask = graft_mask, linear_mask
    by_family: dict[type, list[Any]] = {}
    for slot in p.kronecker:
        job = (slot.kernel, slot.state["precond"], moment_of(slot), slot.ctx, slot.out, slot.scratch)
        by_family.setdefault(type(slot.kernel), []).append(job)
    p.kronecker_jobs = list(by_family.items())
    p.any_graft = bool(graft_mask.any())
    return p


def _like(x: Tensor) -> Callable[[], Tensor]:
    return lambda: torch.empty_like(x)


def _fallback(lane: Lane, slot: Slot, m: Tensor) -> None:
    """Blocks in fallback take the filtered gradient (``"sgd"``) or the grafting direction."""
    mode = shaped(lane.status["fallback"], slot, slot.out.ndim)
    graft = slot.bucket.graft
    alternative = m
    if graft is not None:
        alternative = torch.where(
            mode == FALLBACK_CODES["grafting"], graft.precondition(slot.state["graft"], m, slot.graft_ctx), m
        )
    if not slot.kernel.linear:
        alternative = alternative * shaped(lane.table["inverse1"], slot, m.ndim)
    torch.where(mode > 0, alternative, slot.out, out=slot.out)


# ------------------------------------------------------------------ weight decay, momentum, lr


def weight_decay(lane: Lane, steps: Sequence[GroupStep], param_views: Callable[[Any], Tensor]) -> None:
    """Decoupled weight decay ``d += wd·p`` on blocks that are stepped (``ok``), before momentum
    (Distributed Shampoo's order), through each region's strided views: one foreach call. Groups
    with iterate averaging shrink ``z`` instead (the ``averaging`` stage), as Distributed Shampoo."""
    links = [
        (link, steps[slot.bucket.group].weight_decay)
        for slot in lane.slots
        for link in slot.links
        if steps[slot.bucket.group].decoupled
        and steps[slot.bucket.group].weight_decay != 0.0
        and steps[slot.bucket.group].averaging is None
    ]
    if not links:
        return
    decay = lane.vectors["decay"]
    key = ("decay", tuple(wd for _, wd in links))
    constant = _cached(
        lane, key, lambda: _per_row(lane, steps, lambda s: s.weight_decay if s.decoupled else 0.0)
    )
    torch.mul(constant, lane.vectors["ok"], out=decay)
    views = _cached(
        lane, ("decay_views", key), lambda: [link.region.per_block_view(decay, link.row) for link, _ in links]
    )
    torch._foreach_addcmul_(
        [link.out_rows for link, _ in links], [param_views(link) for link, _ in links], views
    )


def _per_row(lane: Lane, steps: Sequence[GroupStep], value: Callable[[GroupStep], float]) -> Tensor:
    out = torch.zeros(lane.size, dtype=lane.dtype, device=lane.device)
    for slot in lane.slots:
        out[slot.start : slot.start + slot.n] = value(steps[slot.bucket.group])
    return out


def momentum(lane: Lane, steps: Sequence[GroupStep]) -> None:
    """Heavy-ball / Nesterov momentum on blocks that are stepped (``ok``; the others keep their
    buffer): ``M ← μM + (1−d)P`` from a zero buffer, the direction ``M`` or with Nesterov
    ``(1−d)P + μM`` (Distributed Shampoo's); with ``torch_momentum`` as ``torch.optim.SGD``,
    whose first step starts the buffer undamped and whose Nesterov adds ``μM`` to ``P``."""
    slots = [s for s in lane.slots if steps[s.bucket.group].momentum > 0.0]
    if not slots:
        return
    v, status = lane.vectors, lane.status
    key = tuple((steps[s.bucket.group].momentum, steps[s.bucket.group].dampening) for s in slots)
    mu = _cached(lane, ("mu", key), lambda: _per_row(lane, steps, lambda s: s.momentum))
    damp = _cached(lane, ("damp", key), lambda: _per_row(lane, steps, lambda s: 1.0 - s.dampening))
    buffers = [s.state["moments"]["momentum_buffer"] for s in slots]
    outs = [s.out for s in slots]
    torch.where(v["ok"], mu, lane.one, out=v["aux"])
    torch._foreach_mul_(buffers, [shaped(v["aux"], s, s.out.ndim) for s in slots])
    if any(steps[s.bucket.group].torch_momentum for s in slots):
        started = status["momentum_started"]
        torch_rows = _cached(lane, ("torch_momentum", key), lambda: _rows_where(lane, steps, slots))
        torch.where(started | ~torch_rows, damp, lane.one, out=v["aux"])  # undamped first step
        started.logical_or_(v["ok"])
    else:
        v["aux"].copy_(damp)
    v["aux"].mul_(v["ok"])
    torch._foreach_addcmul_(buffers, outs, [shaped(v["aux"], s, s.out.ndim) for s in slots])
    nesterov = [s for s in slots if steps[s.bucket.group].nesterov]
    heavy = [s for s in slots if not steps[s.bucket.group].nesterov]
    if nesterov:
        scaled = [s for s in nesterov if not steps[s.bucket.group].torch_momentum]
        if scaled:  # Distributed Shampoo's Nesterov damps the current direction too
            torch._foreach_mul_(
                [s.out for s in scaled], [1.0 - steps[s.bucket.group].dampening for s in scaled]
            )
        torch.mul(mu, v["ok"], out=v["aux"])
        torch._foreach_addcmul_(
            [s.out for s in nesterov],
            [s.state["moments"]["momentum_buffer"] for s in nesterov],
            [shaped(v["aux"], s, s.out.ndim) for s in nesterov],
        )
    if heavy:
        torch._foreach_copy_([s.out for s in heavy], [s.state["moments"]["momentum_buffer"] for s in heavy])
        v["ok_f"].copy_(v["ok"])
        torch._foreach_mul_([s.out for s in heavy], [shaped(v["ok_f"], s, s.out.ndim) for s in heavy])


def _rows_where(lane: Lane, steps: Sequence[GroupStep], slots: Sequence[Slot]) -> Tensor:
    """``[N]`` mask of the rows of ``slots`` whose group uses torch's momentum."""
    mask = torch.zeros(lane.size, dtype=torch.bool, device=lane.device)
    for slot in slots:
        if steps[slot.bucket.group].torch_momentum:
            mask[slot.start : slot.start + slot.n] = True
    return mask


def learning_rate(lane: Lane, steps: Sequence[GroupStep]) -> None:
    """``U = -lr · d`` (float learning rates: one foreach call with a scalar per bucket)."""
    outs = [s.out for s in lane.slots]
    rates = [steps[s.bucket.group].lr for s in lane.slots]
    if not any(isinstance(r, Tensor) for r in rates):
        torch._foreach_mul_(outs, [-float(r) for r in rates])
        return
    for slot, rate in zip(lane.slots, rates):
        if isinstance(rate, Tensor):  # a non-finite or negative tensor lr skips the update (no sync)
            rate = torch.where(torch.isfinite(rate) & (rate >= 0), rate, 0.0)
        slot.out.mul_(rate).neg_()


def apply_updates(lane: Lane, param_views: Callable[[Any], Tensor]) -> None:
    """``p += U`` for every region of every parameter (one foreach call)."""
    links = _cached(lane, "links", lambda: [link for s in lane.slots for link in s.links])
    torch._foreach_add_([param_views(link) for link in links], [link.out_rows for link in links])
