"""Iterate averaging (GPA, Schedule-Free) as a stage of the step, and the train ↔ eval swap.

The stage runs after ``learning_rate``, when the lane's direction buffer holds the base
optimizer's update ``U = −lr·P``. For the rows of groups with an ``iterate_averaging_config`` it
shrinks ``z ← (1 − lr·wd)·z`` for decoupled weight decay (Distributed Shampoo's place for it
under averaging: ``P`` carries no decay term), advances the base iterates ``z ← z + U`` and
turns ``U`` into the change of the train point (Distributed Shampoo's form,
``averaging.averaging_step_``)::

    y⁺ − y = (1 − μ_x)(z − y) + (1 − μ_x μ_y)·U

so applying it (``apply_updates``, or the distributor's all-gather) is unchanged. ``1 − μ_x`` is
a per-row vector: the GPA constant, or Schedule-Free's ``lrᵖ / Σ lrᵖ`` (``status`` keeps the sum
per block), times the ``ok`` mask — a block that is not stepped keeps ``y``, ``z`` and its sum.
Elementwise work is one ``torch._foreach_*`` call per operation over every bucket of the lane;
the gradient buffer, free once the direction is computed, holds ``z − y``.

``to_eval`` / ``to_train`` write values (not increments) into the direction buffer's rows and
then into the parameters, so ``train()`` after ``eval()`` restores ``y`` bitwise (saved in
``moments.averaging_y``), on one device as through a distributor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ._workspace import Lane, Slot, averaging_rows, param_view, shaped
from .averaging import GeneralizedPrimalAveragingConfig, ScheduleFreeConfig

__all__ = ["averaging", "swap", "to_eval", "to_train"]


class GroupStep(Protocol):
    """What this stage reads of ``_stages.GroupStep`` (no import of ``_stages``: it imports us)."""

    @property
    def lr(self) -> float | Tensor: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def decoupled(self) -> bool: ...
    @property
    def averaging(self) -> Any: ...


_TINY = 1e-30  # Σ lrᵖ of a block never stepped: 0/tiny = 0


def _cached(lane: Lane, key: Any, build: Callable[[], Any]) -> Any:
    value = lane.cache.get(key)
    if value is None:
        value = lane.cache[key] = build()
    return value


def _per_row(lane: Lane, slots: Sequence[Slot], value: Callable[[Slot], float]) -> Tensor:
    out = torch.zeros(lane.size, dtype=lane.dtype, device=lane.device)
    for slot in slots:
        out[slot.start : slot.start + slot.n] = value(slot)
    return out


class _Plan:
    """Cached lists and constants of one lane's averaging rows (per set of group configs)."""

    def __init__(self, lane: Lane, by_group: Sequence[Any], decays: Sequence[float]) -> None:
        self.slots = [s for s in lane.slots if by_group[s.bucket.group] is not None]
        configs = {s.bucket.key: by_group[s.bucket.group] for s in self.slots}
        self.free = [s for s in self.slots if isinstance(configs[s.bucket.key], ScheduleFreeConfig)]
        gpa = [s for s in self.slots if isinstance(configs[s.bucket.key], GeneralizedPrimalAveragingConfig)]
        self.power = {configs[s.bucket.key].eval_coeff_lr_power for s in self.free}
        self.mu_y = _per_row(lane, self.slots, lambda s: configs[s.bucket.key].train_interp_coeff)
        self.one_minus_mu_y = 1.0 - self.mu_y
        self.gpa_cx = _per_row(lane, gpa, lambda s: 1.0 - configs[s.bucket.key].eval_interp_coeff)
        self.free_mask = _per_row(lane, self.free, lambda s: 1.0).bool() if gpa else None
        self.lr_views = [s.rows(lane.vectors["avg_lr"]) for s in self.slots]
        decayed = [s for s in self.slots if decays[s.bucket.group] != 0.0]
        self.neg_decay = _per_row(lane, decayed, lambda s: -decays[s.bucket.group]) if decayed else None
        self.filled: tuple[float, ...] | None = None  # the float rates in ``avg_lr``
        self.decay_views = [shaped(lane.vectors["decay"], s, s.out.ndim) for s in decayed]
        self.decayed_z = [s.state["moments"]["averaging_z"] for s in decayed]
        self.links = [link for s in self.slots for link in s.links]
        self.z_rows = [rows for s in self.slots for rows in averaging_rows(s, "averaging_z")]
        self.y_rows = [rows for s in self.slots for rows in averaging_rows(s, "averaging_y")]
        self.z = [s.state["moments"]["averaging_z"] for s in self.slots]
        self.grads = [s.grad for s in self.slots]
        self.outs = [s.out for s in self.slots]
        self.cx = [shaped(lane.vectors["avg_cx"], s, s.out.ndim) for s in self.slots]
        self.cu = [shaped(lane.vectors["avg_cu"], s, s.out.ndim) for s in self.slots]
        self.others = [link for s in lane.slots if s not in self.slots for link in s.links]


def _plan(lane: Lane, by_group: Sequence[Any], decays: Sequence[float] = ()) -> _Plan:
    """``by_group``: each param group's averaging config, or ``None``; ``decays``: each group's
    decoupled weight decay (0 for none or L2)."""
    decays = tuple(decays) or (0.0,) * len(by_group)
    key = ("averaging", tuple(by_group), decays)
    plan: _Plan = _cached(lane, key, lambda: _Plan(lane, by_group, decays))
    return plan


def _learning_rates(lane: Lane, plan: _Plan, steps: Sequence[GroupStep]) -> None:
    """Each averaging row's learning rate into ``avg_lr`` (no sync for tensor rates). Float
    rates are written only when they change (a constant lr, Schedule-Free's, costs nothing)."""
    rates = [steps[s.bucket.group].lr for s in plan.slots]
    if any(isinstance(r, Tensor) for r in rates):
        plan.filled = None
        for view, rate in zip(plan.lr_views, rates):
            if isinstance(rate, Tensor):  # a non-finite or negative lr steps nothing (no sync)
                view.copy_(torch.where(torch.isfinite(rate) & (rate >= 0), rate, 0.0))
            else:
                view.fill_(rate)
        return
    floats = tuple(float(r) for r in rates)
    if floats != plan.filled:
        torch._foreach_zero_(plan.lr_views)
        torch._foreach_add_(plan.lr_views, list(floats))
        plan.filled = floats


def _coefficients(lane: Lane, plan: _Plan, steps: Sequence[GroupStep]) -> None:
    """``decay = 1 − lr·wd·ok`` (decoupled decay), ``avg_cx = (1 − μ_x)·ok`` and
    ``avg_cu = 1 − μ_x μ_y = (1 − μ_y) + μ_y·avg_cx``."""
    v = lane.vectors
    v["ok_f"].copy_(v["ok"])
    w = v["avg_w"]
    if plan.free or plan.neg_decay is not None:
        _learning_rates(lane, plan, steps)
        torch.mul(v["avg_lr"], v["ok_f"], out=w)
    if plan.neg_decay is not None:
        torch.addcmul(lane.one, w, plan.neg_decay, out=v["decay"])
    cx = v["avg_cx"]
    if plan.free:
        if len(plan.power) == 1:
            w.pow_(next(iter(plan.power)))  # (lr·ok)ᵖ = lrᵖ·ok for p ≥ 1
        else:  # groups with different powers: one op per bucket (rare)
            for s in plan.free:
                s.rows(w).pow_(steps[s.bucket.group].averaging.eval_coeff_lr_power)
        if 0 in plan.power:
            w.mul_(v["ok_f"])
        lr_sum = lane.status["averaging_lr_sum"]
        lr_sum.add_(w)  # rows of GPA groups add to a sum nobody reads
        torch.clamp(lr_sum, min=_TINY, out=v["aux"])
        torch.div(w, v["aux"], out=cx)
        if plan.free_mask is not None:
            torch.where(plan.free_mask, cx, plan.gpa_cx, out=cx)
            cx.mul_(v["ok_f"])
    else:
        torch.mul(plan.gpa_cx, v["ok_f"], out=cx)
    torch.addcmul(plan.one_minus_mu_y, plan.mu_y, cx, out=v["avg_cu"])


def averaging(lane: Lane, steps: Sequence[GroupStep], param_views: Callable[[Any], Tensor]) -> None:
    """The averaging stage (module docstring): ``z ← (1 − lr·wd)z``, then ``z += U`` and
    ``U ← (1−μ_xμ_y)U + (1−μ_x)(z − y)`` with the ``z`` before ``U``."""
    if all(s.averaging is None for s in steps):
        return
    decays = [s.weight_decay if s.decoupled and s.averaging is not None else 0.0 for s in steps]
    plan = _plan(lane, [s.averaging for s in steps], decays)
    if not plan.slots:
        return
    _coefficients(lane, plan, steps)
    if plan.decayed_z:
        torch._foreach_mul_(plan.decayed_z, plan.decay_views)
    grad_rows = [link.grad_rows for link in plan.links]
    torch._foreach_copy_(grad_rows, plan.z_rows)
    torch._foreach_sub_(grad_rows, [param_views(link) for link in plan.links])
    torch._foreach_add_(plan.z, plan.outs)
    torch._foreach_mul_(plan.outs, plan.cu)
    torch._foreach_addcmul_(plan.outs, plan.grads, plan.cx)


def _others_unchanged(plan: _Plan, param_views: Callable[[Any], Tensor]) -> None:
    """Rows of groups without averaging carry their parameters' own values (a no-op copy)."""
    if plan.others:
        torch._foreach_copy_(
            [link.out_rows for link in plan.others], [param_views(link) for link in plan.others]
        )


def to_eval(lane: Lane, by_group: Sequence[Any], param_views: Callable[[Any], Tensor]) -> bool:
    """Save ``y`` and write ``x = y + (1 − 1/μ_y)(z − y)`` into the direction rows (other rows:
    the parameters' values). Returns whether the lane has averaging rows."""
    plan = _plan(lane, by_group)
    _others_unchanged(plan, param_views)
    if not plan.slots:
        return False
    ys = [param_views(link) for link in plan.links]
    outs = [link.out_rows for link in plan.links]
    torch._foreach_copy_(plan.y_rows, ys)
    torch._foreach_copy_(outs, plan.z_rows)
    torch._foreach_sub_(outs, ys)
    torch._foreach_mul_(
        plan.outs, [1.0 - 1.0 / by_group[s.bucket.group].train_interp_coeff for s in plan.slots]
    )
    torch._foreach_add_(outs, ys)
    return True


def to_train(lane: Lane, by_group: Sequence[Any], param_views: Callable[[Any], Tensor]) -> bool:
    """Write the saved ``y`` into the direction rows (other rows: the parameters' values)."""
    plan = _plan(lane, by_group)
    _others_unchanged(plan, param_views)
    if not plan.slots:
        return False
    torch._foreach_copy_([link.out_rows for link in plan.links], plan.y_rows)
    return True


def swap(
    lanes: Sequence[Lane],
    groups: Sequence[dict[str, Any]],
    params: Sequence[Tensor],
    persistent: bool,
    distributor: Any,
    to_eval_mode: bool,
) -> None:
    """``Shampoo.eval()`` / ``train()``: move the averaging groups not yet in the asked mode
    (``group["train_mode"]``) and write the values into the parameters (through the
    distributor's all-gather when sharded: every rank calls it)."""
    chosen = [
        g.get("iterate_averaging_config") is not None and g.get("train_mode", True) == to_eval_mode
        for g in groups
    ]
    if not any(chosen):
        return
    by_group = [g["iterate_averaging_config"] if pick else None for g, pick in zip(groups, chosen)]
    move = to_eval if to_eval_mode else to_train
    for lane in lanes:

        def views(link: Any, lane: Lane = lane) -> Tensor:
            return param_view(lane, link, params, persistent)

        if move(lane, by_group, views) and distributor is None:
            links = [link for s in lane.slots for link in s.links]
            torch._foreach_copy_([views(link) for link in links], [link.out_rows for link in links])
    if distributor is not None:
        device = lanes[0].device if lanes else torch.device("cpu")
        distributor.finish(lanes, device, assign=True)
    for g, pick in zip(groups, chosen):
        if pick:
            g["train_mode"] = not to_eval_mode
