"""Refresh orchestration for one bucket: which blocks refresh, running the kernel on just those
rows, and recording the outcome (refresh step, failures, spectrum) in the bucket's ``status``.

Refreshes are amortized and may synchronise with the device (to select rows, and inside eigh).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._workspace import Lane
from .preconditioners import Context, Preconditioner
from .preconditioners.base import commit_

__all__ = ["due_blocks", "is_refresh_step", "refresh_bucket", "refresh_lane", "refresh_pending"]


def is_refresh_step(step: int, frequency: int, start: float) -> bool:
    """The one schedule rule: refresh every ``frequency`` steps once past ``start``, and at
    ``start`` itself (Distributed Shampoo's ``start_preconditioning_step``)."""
    return (step % frequency == 0 and step > start) or step == start


def due_blocks(kernel: Preconditioner, state: dict, ctx: Context, tolerance: float | None) -> Tensor:
    """Blocks to refresh on a scheduled refresh: all, or with ``refresh_tolerance`` set only
    those whose factors drifted beyond it since their last refresh (and never-refreshed ones)."""
    status = state["status"]
    everything = torch.ones_like(status["refresh_request"])
    if tolerance is None:
        return everything
    drift = kernel.drift(state["precond"], ctx)
    if drift is None:
        return everything
    status["drift"].copy_(drift.float())
    return (drift > tolerance) | (status["refresh_step"] < 0)


def refresh_bucket(kernel: Preconditioner, state: dict, ctx: Context, commit: Tensor) -> float:
    """Refresh the committed rows only — a partial refresh runs the kernel on the selected rows
    (gathered, then written back), so skipped blocks cost nothing. Returns the seconds spent."""
    status, precond = state["status"], state["precond"]
    began = time.perf_counter()
    rows = commit.nonzero().flatten()
    n, count = commit.numel(), rows.numel()
    status["refreshes"] += commit.to(torch.int32)
    status["refreshes_skipped"] += (~commit).to(torch.int32)
    if count == 0:
        return time.perf_counter() - began
    ctx.warm = bool((status["refresh_step"][rows] >= 0).all())
    if count == n:
        result = kernel.refresh(precond, ctx, commit)
        failed, stats_list = result.failed, result.stats
    else:
        subset = {k: v[rows] for k, v in precond.items()}
        result = kernel.refresh(subset, ctx.rows(rows), torch.ones_like(rows, dtype=torch.bool))
        for key, value in subset.items():
            precond[key][rows] = value
        failed = torch.zeros_like(commit)
        failed[rows] = result.failed
        stats_list = tuple(
            None if s is None else type(s)(*(_expand(t, rows, n) for t in s)) for s in result.stats
        )
    elapsed = time.perf_counter() - began
    ok = commit & ~failed
    status["refresh_step"].copy_(torch.where(ok, ctx.step, status["refresh_step"]))
    status["failures"] += failed.to(torch.int32)
    status["refresh_request"] &= ~commit
    status["refresh_missed"] &= ~commit
    for i, stats in zip(kernel.factor_dims, stats_list):
        if stats is None:
            continue
        commit_(status[f"condition_number.{i}"], stats.condition_number.float(), ok)
        commit_(status[f"min_eigenvalue.{i}"], stats.min_eigenvalue.float(), ok)
        commit_(status[f"max_eigenvalue.{i}"], stats.max_eigenvalue.float(), ok)
    return elapsed


def refresh_lane(
    lane: Lane,
    groups: Sequence[Mapping[str, Any]],
    steps: Sequence[Any],
    present: Tensor,
    all_present: bool,
    requests: set[str],
    missed: set[str],
    seconds: dict[int, float],
) -> None:
    """Amortized refreshes of the lane's buckets that are due — by schedule, by request
    (``requests``), or missed while a gradient was absent (``missed``); blocks without a gradient
    now catch up at their next step. ``requests``/``missed`` are the optimizer's host mirrors of
    the per-block flags (bucket keys), kept current here so no step has to read the device."""
    for slot in lane.slots:
        if not slot.kernel.amortized:
            continue
        key, g = slot.bucket.key, slot.bucket.group
        due = _scheduled(slot, groups, steps)
        if not (due or key in requests or key in missed):
            continue
        group = groups[g]
        status = slot.state["status"]
        commit = status["refresh_request"] | status["refresh_missed"]
        if due:
            commit |= due_blocks(slot.kernel, slot.state, slot.ctx, group.get("refresh_tolerance"))
        here = slot.rows(present)
        if not all_present:
            if due:
                status["refresh_missed"] |= ~here
            commit &= here
        seconds[g] += refresh_bucket(slot.kernel, slot.state, slot.ctx, commit)
        if all_present or bool(here.all()):
            requests.discard(key)
            missed.discard(key)
        elif due:
            missed.add(key)


def _scheduled(slot: Any, groups: Sequence[Mapping[str, Any]], steps: Sequence[Any]) -> bool:
    group = groups[slot.bucket.group]
    return is_refresh_step(
        steps[slot.bucket.group].step, group["precondition_frequency"], group["start_preconditioning_step"]
    )


def refresh_pending(
    lane: Lane,
    groups: Sequence[Mapping[str, Any]],
    steps: Sequence[Any],
    requests: set[str],
    missed: set[str],
) -> bool:
    """Whether ``refresh_lane`` would refresh any bucket of ``lane`` this step (host values only):
    a step that does is not a plain step."""
    return any(
        slot.kernel.amortized
        and (slot.bucket.key in requests or slot.bucket.key in missed or _scheduled(slot, groups, steps))
        for slot in lane.slots
    )


def _expand(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """Scatter per-row values of a partial refresh back to all ``n`` rows (nan elsewhere)."""
    out = torch.full((n, *values.shape[1:]), math.nan, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out
