"""Per-block health records: what the last refresh computed, read lazily (no recomputation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BlockHealth", "summarize"]


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
