"""Per-block health records: what the last refresh computed, read lazily (no recomputation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .optim import Shampoo

__all__ = ["BlockHealth", "collect_health", "summarize"]

#: Per-block fallback modes as stored in the optimizer state (0: none).
FALLBACK_NAMES = {0: None, 1: "sgd", 2: "grafting"}


@dataclass(frozen=True)
class BlockHealth:
    """Health of one preconditioner block.

    Eigenvalue figures are those of the bias-corrected factor at its last successful refresh
    (``nan`` where the refresh method does not produce eigenvalues, e.g. coupled Newton, or
    before the first refresh). Condition numbers are of the damped factor ``L + εI`` that the
    preconditioner inverts.
    """

    param_index: int
    param_name: str
    block_index: int
    shape: tuple[int, ...]
    group: int
    preconditioner: str
    step: int
    last_refresh_step: int
    condition_numbers: tuple[float, ...]
    min_eigenvalues: tuple[float, ...]
    max_eigenvalues: tuple[float, ...]
    failure_count: int
    nonfinite_count: int
    fallback: str | None
    epsilon_scale: float = 1.0
    refreshes: int = 0
    skipped_refreshes: int = 0

    @property
    def key(self) -> tuple[int, int]:
        """``(param_index, block_index)``: how the optimizer's block APIs address this block."""
        return (self.param_index, self.block_index)

    @property
    def steps_since_refresh(self) -> int | None:
        return None if self.last_refresh_step < 0 else self.step - self.last_refresh_step

    @property
    def max_condition_number(self) -> float:
        finite = [c for c in self.condition_numbers if not math.isnan(c)]
        return max(finite) if finite else math.nan


def summarize(records: Sequence[BlockHealth]) -> dict[str, float]:
    """Overall figures across blocks (nan-aware): max/median condition number, eigenvalue range,
    failures, non-finite events and blocks in fallback."""
    conds = sorted(c for r in records for c in r.condition_numbers if not math.isnan(c))
    mins = [v for r in records for v in r.min_eigenvalues if not math.isnan(v)]
    maxs = [v for r in records for v in r.max_eigenvalues if not math.isnan(v)]
    return {
        "blocks": float(len(records)),
        "condition_number_max": conds[-1] if conds else math.nan,
        "condition_number_median": conds[len(conds) // 2] if conds else math.nan,
        "min_eigenvalue": min(mins) if mins else math.nan,
        "max_eigenvalue": max(maxs) if maxs else math.nan,
        "failures": float(sum(r.failure_count for r in records)),
        "nonfinite_grads": float(sum(r.nonfinite_count for r in records)),
        "blocks_in_fallback": float(sum(r.fallback is not None for r in records)),
    }


def collect_health(optimizer: Shampoo) -> list[BlockHealth]:
    """Records for every block this process holds state for (one device read per bucket)."""
    records = []
    for plan in optimizer.plans:
        if plan.bucket.key not in optimizer.state:
            continue
        bucket_state = optimizer.state[plan.bucket.key]  # type: ignore[index]
        opt = {k: v.detach().cpu() for k, v in bucket_state["opt"].items()}
        step = int(optimizer.param_groups[plan.bucket.group].get("step", 0))
        dims = plan.kernel.factor_dims
        tracked = plan.kernel.health_stats(bucket_state["precond"])
        if tracked is not None:
            for i, stats in zip(dims, tracked):
                if stats is not None:
                    opt[f"condition_number.{i}"] = stats.condition_number.detach().float().cpu()
                    opt[f"min_eigenvalue.{i}"] = stats.min_eigenvalue.detach().float().cpu()
                    opt[f"max_eigenvalue.{i}"] = stats.max_eigenvalue.detach().float().cpu()
        for row, (pidx, bidx) in enumerate(plan.bucket.rows()):
            fallback = FALLBACK_NAMES[int(opt["fallback"][row])]
            records.append(
                BlockHealth(
                    param_index=pidx,
                    param_name=optimizer._names[pidx],
                    block_index=bidx,
                    shape=plan.bucket.block_shape,
                    group=plan.bucket.group,
                    preconditioner=plan.kernel.kind,
                    step=step,
                    last_refresh_step=int(opt["refresh_step"][row]),
                    condition_numbers=tuple(float(opt[f"condition_number.{i}"][row]) for i in dims),
                    min_eigenvalues=tuple(float(opt[f"min_eigenvalue.{i}"][row]) for i in dims),
                    max_eigenvalues=tuple(float(opt[f"max_eigenvalue.{i}"][row]) for i in dims),
                    failure_count=int(opt["failures"][row]),
                    nonfinite_count=int(opt["nonfinite"][row]),
                    fallback=fallback,
                    epsilon_scale=float(opt["epsilon_scale"][row]),
                    refreshes=int(opt["refreshes"][row]) if "refreshes" in opt else 0,
                    skipped_refreshes=int(opt["refreshes_skipped"][row]) if "refreshes_skipped" in opt else 0,
                )
            )
    return records
