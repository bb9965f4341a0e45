"""Per-block health records: what the last refresh computed, read lazily (no recomputation).

Pure functions of the buckets and their state (the optimizer passes them in), so that the
optimizer, the callbacks and the distributed layer share one reading of the ``status`` section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .linalg.packing import unpack
from .plan import Bucket

__all__ = ["FALLBACK_CODES", "FALLBACK_NAMES", "BlockHealth", "collect_health", "factor_spectra", "summarize"]

#: Per-block fallback modes as stored in the optimizer state (0: none).
FALLBACK_NAMES: dict[int, str | None] = {0: None, 1: "sgd", 2: "grafting"}
FALLBACK_CODES: dict[str | None, int] = {name: code for code, name in FALLBACK_NAMES.items()}


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


def collect_health(
    buckets: Sequence[Bucket], state: Mapping[str, Any], names: Sequence[str], steps: Sequence[int]
) -> list[BlockHealth]:
    """Records for every block of ``buckets`` that has state (one device read per bucket).
    ``steps``: each param group's step count."""
    records = []
    for bucket in buckets:
        sections = state.get(bucket.key)
        if sections is None:
            continue
        status = {k: v.detach().cpu() for k, v in sections["status"].items()}
        dims = bucket.kernel.factor_dims
        tracked = bucket.kernel.health_stats(sections["precond"])
        if tracked is not None:
            for i, stats in zip(dims, tracked):
                if stats is not None:
                    status[f"condition_number.{i}"] = stats.condition_number.detach().float().cpu()
                    status[f"min_eigenvalue.{i}"] = stats.min_eigenvalue.detach().float().cpu()
                    status[f"max_eigenvalue.{i}"] = stats.max_eigenvalue.detach().float().cpu()
        for row, (pidx, bidx) in enumerate(bucket.rows()):
            records.append(
                BlockHealth(
                    param_index=pidx,
                    param_name=names[pidx],
                    block_index=bidx,
                    shape=bucket.block_shape,
                    group=bucket.group,
                    preconditioner=bucket.kernel.kind,
                    step=steps[bucket.group],
                    last_refresh_step=int(status["refresh_step"][row]),
                    condition_numbers=tuple(float(status[f"condition_number.{i}"][row]) for i in dims),
                    min_eigenvalues=tuple(float(status[f"min_eigenvalue.{i}"][row]) for i in dims),
                    max_eigenvalues=tuple(float(status[f"max_eigenvalue.{i}"][row]) for i in dims),
                    failure_count=int(status["failures"][row]),
                    nonfinite_count=int(status["nonfinite"][row]),
                    fallback=FALLBACK_NAMES[int(status["fallback"][row])],
                    epsilon_scale=float(status["epsilon_scale"][row]),
                    refreshes=int(status["refreshes"][row]),
                    skipped_refreshes=int(status["refreshes_skipped"][row]),
                )
            )
    return records


@torch.no_grad()
def factor_spectra(
    buckets: Sequence[Bucket],
    state: Mapping[str, Any],
    names: Sequence[str],
    groups: Sequence[Mapping[str, Any]],
) -> dict[tuple[str, int], Tensor]:
    """Eigenvalues of each layer's bias-corrected factors (these buckets' blocks), keyed by
    ``(parameter name, factor dim)``: stored eigenvalues where the preconditioner keeps them,
    otherwise ``eigvalsh`` of the factor (off the hot path: logging steps only)."""
    spectra: dict[tuple[str, int], list[Tensor]] = {}
    for bucket in buckets:
        sections = state.get(bucket.key)
        if sections is None:
            continue
        group = groups[bucket.group]
        beta2 = group["betas"][1]
        precond, rows = sections["precond"], bucket.rows()
        steps = sections["status"]["step"].detach().double().cpu()
        corrected = group["use_bias_correction"] and beta2 < 1.0
        bc2 = (1.0 - beta2**steps).clamp_min(1e-300) if corrected else torch.ones_like(steps)
        for i in bucket.kernel.factor_dims:
            if f"eigenvalues.{i}" in precond:
                values = precond[f"eigenvalues.{i}"].detach().double().cpu() / bc2[:, None]
            elif f"factor.{i}" in precond:
                stored = precond[f"factor.{i}"].detach().double().cpu()
                factor = (stored if stored.ndim == 3 else unpack(stored)) / bc2[:, None, None]
                if not bool(torch.isfinite(factor).all()):
                    continue
                values = torch.linalg.eigvalsh(factor)
            else:
                continue
            for row, (pidx, _) in enumerate(rows):
                spectra.setdefault((names[pidx], i), []).append(values[row])
    return {key: torch.cat(parts) for key, parts in spectra.items()}
