"""Refresh orchestration for one bucket: which blocks refresh, running the kernel on just those
rows, and recording the outcome (refresh step, failures, spectrum) in the bucket's ``opt`` state.

Refreshes are amortized and may synchronise with the device (to select rows, and inside eigh).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .preconditioners import Context
from .preconditioners.base import commit_

if TYPE_CHECKING:
    from .optim import BucketPlan

__all__ = ["due_blocks", "refresh_bucket"]


def due_blocks(plan: BucketPlan, state: dict, ctx: Context, tolerance: float | None) -> Tensor:
    """Blocks to refresh on a scheduled refresh: all, or with ``refresh_tolerance`` set only
    those whose factors drifted beyond it since their last refresh (and never-refreshed ones)."""
    opt = state["opt"]
    if tolerance is None:
        return torch.ones_like(opt["refresh_request"])
    drift = plan.kernel.drift(state["precond"], ctx)
    if drift is None:
        return torch.ones_like(opt["refresh_request"])
    opt["drift"] = drift.float()
    return (drift > tolerance) | (opt["refresh_step"] < 0)


def refresh_bucket(plan: BucketPlan, state: dict, ctx: Context, commit: Tensor) -> float:
    """Refresh the committed rows only — a partial refresh runs the kernel on the selected rows
    (gathered, then written back), so skipped blocks cost nothing. Returns the seconds spent."""
    opt, precond = state["opt"], state["precond"]
    began = time.perf_counter()
    rows = commit.nonzero().flatten()
    n, count = commit.numel(), rows.numel()
    zeros = torch.zeros_like(opt["failures"])
    opt["refreshes"] = opt.get("refreshes", zeros) + commit.to(torch.int32)
    opt["refreshes_skipped"] = opt.get("refreshes_skipped", zeros) + (~commit).to(torch.int32)
    if count == 0:
        return time.perf_counter() - began
    warm = bool((opt["refresh_step"][rows] >= 0).all())
    if count == n:
        result = plan.kernel.refresh(precond, replace(ctx, warm=warm), commit)
        failed, stats_list = result.failed, result.stats
    else:
        subset = {k: v[rows] for k, v in precond.items()}
        scale = None if ctx.epsilon_scale is None else ctx.epsilon_scale[rows]
        sub_ctx = replace(ctx, live=ctx.live[rows], epsilon_scale=scale, warm=warm)
        result = plan.kernel.refresh(subset, sub_ctx, torch.ones_like(rows, dtype=torch.bool))
        for key, value in subset.items():
            if key not in precond:  # created by this refresh
                precond[key] = torch.zeros((n, *value.shape[1:]), dtype=value.dtype, device=value.device)
            precond[key][rows] = value
        for key in [k for k in precond if k not in subset]:  # dropped by this refresh
            del precond[key]
        failed = torch.zeros_like(commit)
        failed[rows] = result.failed
        stats_list = tuple(
            None if s is None else type(s)(*(_expand(t, rows, n) for t in s)) for s in result.stats
        )
    elapsed = time.perf_counter() - began
    ok = commit & ~failed
    opt["refresh_step"].copy_(torch.where(ok, ctx.step, opt["refresh_step"]))
    opt["failures"] += failed.to(torch.int32)
    opt["refresh_request"] &= ~commit
    for i, stats in zip(plan.kernel.factor_dims, stats_list):
        if stats is None:
            continue
        commit_(opt[f"condition_number.{i}"], stats.condition_number.float(), ok)
        commit_(opt[f"min_eigenvalue.{i}"], stats.min_eigenvalue.float(), ok)
        commit_(opt[f"max_eigenvalue.{i}"], stats.max_eigenvalue.float(), ok)
    return elapsed


def _expand(values: Tensor, rows: Tensor, n: int) -> Tensor:
    """Scatter per-row values of a partial refresh back to all ``n`` rows (nan elsewhere)."""
    out = torch.full((n, *values.shape[1:]), math.nan, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out
