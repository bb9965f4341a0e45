"""Refresh orchestration for one bucket: which blocks refresh, running the kernel on just those
rows, and recording the outcome (refresh step, failures, spectrum) in the bucket's ``status``.

Refreshes are amortized and may synchronise with the device (to select rows, and inside eigh).

Staggered refreshes (group option ``refresh_stagger``): instead of every block refreshing on the
same step every ``precondition_frequency`` steps, each block gets a *phase* ``φ ∈ [0, f)`` and
refreshes on the steps ``≡ φ (mod f)`` — the same number of refreshes, spread so that no step
pays for all of them. Phases are balanced by refresh cost (``plan.refresh_flops``, longest first
onto the least-loaded phase) over all blocks of the group, and derived from the plan alone (never
stored): equal on every rank and for any bucketing, so checkpoints and sharded runs agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._workspace import Lane
from .plan import BlockKey, BlockPlan, Bucket, lpt_assign, refresh_flops
from .preconditioners import Context, Preconditioner
from .preconditioners.base import commit_

__all__ = [
    "RefreshSchedule",
    "block_phases",
    "due_blocks",
    "is_refresh_step",
    "refresh_bucket",
    "refresh_lane",
    "refresh_pending",
]

_SCRAMBLE = 2654435761  # Knuth's multiplicative hash: decorrelates phases from rank ownership


def is_refresh_step(step: int, frequency: int, start: float, phase: int = 0) -> bool:
    """The one schedule rule: refresh on the steps ``≡ phase (mod frequency)`` once past
    ``start``, and at ``start`` itself (Distributed Shampoo's ``start_preconditioning_step``:
    every block's first refresh, whatever its phase). ``phase=0`` is Distributed Shampoo's rule."""
    return ((step - phase) % frequency == 0 and step > start) or step == start


def block_phases(plan: BlockPlan, group: int, frequency: int) -> dict[BlockKey, int]:
    """Phase in ``[0, frequency)`` of every amortized block of param group ``group``: longest
    refresh first onto the phase with the least refresh work (``lpt_assign``), so the per-step
    refresh work is within one block's refresh of the mean. Built from every rank's buckets,
    keyed by block: the same on every rank and whatever the bucketing. Equal-cost ties are
    broken by a hash of the block's position rather than by its order, so that a rank (which LPT
    ownership also fills in that order) does not get all its blocks in one phase."""
    costs: dict[BlockKey, float] = {}
    for bucket in plan.buckets:
        if bucket.group == group and bucket.kernel.amortized:
            flops = refresh_flops(bucket.block_shape, tuple(bucket.kernel.factor_dims))
            costs.update(dict.fromkeys(bucket.rows(), flops))
    keys = sorted(costs)
    keys = [keys[i] for i in sorted(range(len(keys)), key=lambda i: (i * _SCRAMBLE) % 2**32)]
    # More phases than blocks (a huge frequency): one block per bin, bins spread evenly over
    # the interval; the bins are the phases otherwise.
    bins = max(1, min(frequency, len(keys)))
    assigned = lpt_assign([costs[k] for k in keys], bins)
    return {k: b * frequency // bins for k, b in zip(keys, assigned)}


class RefreshSchedule:
    """Which rows of a bucket a scheduled refresh covers at a step (host-side, no device read).

    Per ``(group, frequency)`` the phases, and per ``(bucket, frequency)`` one row mask per phase,
    are built on first use (at a refresh) and cached: a frequency schedule that changes the
    frequency gets phases for the new one. Unstaggered groups never build any."""

    def __init__(self, plan: BlockPlan | None) -> None:
        self.plan = plan
        self._phases: dict[tuple[int, int], dict[BlockKey, int]] = {}
        self._masks: dict[tuple[str, int], dict[int, Tensor | bool]] = {}

    def rows(
        self, bucket: Bucket, group: Mapping[str, Any], step: int, device: torch.device
    ) -> Tensor | bool:
        """``True`` (every row), ``False`` (none) or a row mask ``[n]`` due by schedule."""
        frequency, start = group["precondition_frequency"], group["start_preconditioning_step"]
        if not group.get("refresh_stagger", False) or frequency == 1 or self.plan is None:
            return is_refresh_step(step, frequency, start)
        phase = step % frequency
        if step == start or not is_refresh_step(step, frequency, start, phase):
            return step == start
        return self._bucket_masks(bucket, frequency, device).get(phase, False)

    def phases(self, group: int, frequency: int) -> dict[BlockKey, int]:
        """``block_phases`` of ``group`` at ``frequency`` (cached)."""
        key = (group, frequency)
        if key not in self._phases:
            assert self.plan is not None
            self._phases[key] = block_phases(self.plan, group, frequency)
        return self._phases[key]

    def _bucket_masks(self, bucket: Bucket, frequency: int, device: torch.device) -> dict[int, Tensor | bool]:
        key = (bucket.key, frequency)
        if key not in self._masks:
            phases = self.phases(bucket.group, frequency)
            row_phases = [phases[k] for k in bucket.rows()]
            masks: dict[int, Tensor | bool] = {}
            for phase in set(row_phases):
                hits = [p == phase for p in row_phases]
                masks[phase] = True if all(hits) else torch.tensor(hits, device=device)
            self._masks[key] = masks
        return self._masks[key]


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


def refresh_bucket(
    kernel: Preconditioner, state: dict, ctx: Context, commit: Tensor, scheduled: Tensor | bool = True
) -> float:
    """Refresh the committed rows only — a partial refresh runs the kernel on the selected rows
    (gathered, then written back), so skipped blocks cost nothing. ``scheduled``: the rows due by
    schedule; those not committed count as skipped (by ``refresh_tolerance``). Returns the
    seconds spent."""
    status, precond = state["status"], state["precond"]
    began = time.perf_counter()
    rows = commit.nonzero().flatten()
    n, count = commit.numel(), rows.numel()
    status["refreshes"] += commit.to(torch.int32)
    if scheduled is not False:
        status["refreshes_skipped"] += ((~commit) & scheduled).to(torch.int32)
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
    schedule: RefreshSchedule,
) -> None:
    """Amortized refreshes of the lane's buckets that are due — by ``schedule``, by request
    (``requests``), or missed while a gradient was absent (``missed``); blocks without a gradient
    now catch up at their next step. ``requests``/``missed`` are the optimizer's host mirrors of
    the per-block flags (bucket keys), kept current here so no step has to read the device."""
    for slot in lane.slots:
        if not slot.kernel.amortized:
            continue
        key, g = slot.bucket.key, slot.bucket.group
        group = groups[g]
        scheduled = schedule.rows(slot.bucket, group, steps[g].step, lane.device)
        due = scheduled is not False
        if not (due or key in requests or key in missed):
            continue
        status = slot.state["status"]
        commit = status["refresh_request"] | status["refresh_missed"]
        if due:
            chosen = due_blocks(slot.kernel, slot.state, slot.ctx, group.get("refresh_tolerance"))
            commit |= chosen if scheduled is True else chosen & scheduled
        here = slot.rows(present)
        if not all_present:
            if due:
                status["refresh_missed"] |= ~here if scheduled is True else scheduled & ~here
            commit &= here
        seconds[g] += refresh_bucket(slot.kernel, slot.state, slot.ctx, commit, scheduled)
        if all_present or bool(here.all()):
            requests.discard(key)
            missed.discard(key)
        elif due:
            missed.add(key)


def refresh_pending(
    lane: Lane,
    groups: Sequence[Mapping[str, Any]],
    steps: Sequence[Any],
    requests: set[str],
    missed: set[str],
    schedule: RefreshSchedule,
) -> bool:
    """Whether ``refresh_lane`` would refresh any bucket of ``lane`` this step (host values only):
    a step that does is not a plain step."""
    for slot in lane.slots:
        key, g = slot.bucket.key, slot.bucket.group
        if slot.kernel.amortized and (
            key in requests
            or key in missed
            or schedule.rows(slot.bucket, groups[g], steps[g].step, lane.device) is not False
        ):
            return True
    return False


def _expand(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """Scatter per-row values of a partial refresh back to all ``n`` rows (nan elsewhere)."""
    out = torch.full((n, *values.shape[1:]), math.nan, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out
