"""Every block's health on every rank, from one summed collective.

Callbacks that act on health (the monitor, the fallback) must see the same numbers on every
rank, or their ranks log different keys or take different decisions, and a DDP job hangs. So
health travels as one float64 table ``[num_blocks + world_size, NUM_FIELDS]`` in the order of
``optimizer.block_keys()`` (identical on every rank): each block's row is written by exactly one
rank — the rank that holds it when the optimizer is sharded, rank 0 otherwise, since then every
rank holds the same state — and left zero elsewhere, so one ``all_reduce(SUM)`` assembles the
whole table everywhere. The last ``world_size`` rows carry one per-rank figure each (refresh
time). Blocks are counted once; a ``present`` column proves it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..health import FALLBACK_CODES, FALLBACK_NAMES, BlockHealth
from ..optim import Shampoo

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "MAX_FACTORS",
    "HealthSnapshot",
    "gather_health",
    "gather_trainer_health",
    "local_block_keys",
    "shampoo_optimizers",
]

#: Factor slots per block in the table; blocks of higher order (never seen after dim merging)
#: keep their first ``MAX_FACTORS`` factors (with a warning).
MAX_FACTORS = 8


# Column layout of the table.
(_PRESENT, _GROUP, _STEP, _LAST_REFRESH, _FAILURES, _NONFINITE, _FALLBACK, _EPS_SCALE, _REFRESHES) = range(9)
_SKIPPED, _ORDER, _NUM_FACTORS = 9, 10, 11
_SHAPE = 12
_COND = _SHAPE + MAX_FACTORS
_MIN_EIG = _COND + MAX_FACTORS
_MAX_EIG = _MIN_EIG + MAX_FACTORS
NUM_FIELDS = _MAX_EIG + MAX_FACTORS

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class HealthSnapshot:
    """Health of every block that has state (``block_keys()`` order), identical on every rank,
    plus each rank's wall time of its last refresh (seconds, summed over param groups)."""

    records: list[BlockHealth]
    refresh_seconds: list[float]

    @property
    def step(self) -> int:
        return max((r.step for r in self.records), default=0)


def shampoo_optimizers(optimizers: Sequence[object]) -> list[tuple[int, Shampoo]]:
    """``(index, optimizer)`` of the ``Shampoo`` optimizers among a trainer's optimizers."""
    return [(i, opt) for i, opt in enumerate(optimizers) if isinstance(opt, Shampoo)]


def local_block_keys(optimizer: Shampoo) -> set[tuple[int, int]]:
    """Blocks this rank holds state for (all of them unless sharded); no device sync."""
    return {key for bucket in optimizer.buckets for key in bucket.rows()}


def _kinds(optimizer: Shampoo) -> dict[tuple[int, int], str]:
    return {key: bucket.kernel.kind for bucket in optimizer.buckets for key in bucket.rows()}


def _group_kind(optimizer: Shampoo, group: int) -> str:
    """Display name for a block held by another rank: its group's preconditioner config class."""
    name = type(optimizer.param_groups[group]["preconditioner_config"]).__name__
    return name.removesuffix("PreconditionerConfig") or name


def _encode(h: BlockHealth) -> list[float]:
    """One block's table row (plain floats: a table is built with one tensor call, not per cell)."""
    k = len(h.condition_numbers)
    if k > MAX_FACTORS or len(h.shape) > MAX_FACTORS:
        warnings.warn(
            f"block {h.key} of {h.param_name} has {k} factors; health reports the first {MAX_FACTORS}",
            stacklevel=3,
        )
    k, order = min(k, MAX_FACTORS), min(len(h.shape), MAX_FACTORS)
    pad = [0.0] * MAX_FACTORS
    row = [0.0] * _SHAPE
    row[_PRESENT] = 1.0
    row[_GROUP] = h.group
    row[_STEP] = h.step
    row[_LAST_REFRESH] = h.last_refresh_step
    row[_FAILURES] = h.failure_count
    row[_NONFINITE] = h.nonfinite_count
    row[_FALLBACK] = FALLBACK_CODES[h.fallback]
    row[_EPS_SCALE] = h.epsilon_scale
    row[_REFRESHES] = h.refreshes
    row[_SKIPPED] = h.skipped_refreshes
    row[_ORDER] = order
    row[_NUM_FACTORS] = k
    for values, n in (
        (h.shape, order),
        (h.condition_numbers, k),
        (h.min_eigenvalues, k),
        (h.max_eigenvalues, k),
    ):
        row += [float(v) for v in values[:n]] + pad[n:]
    return row


def _decode(
    optimizer: Shampoo, key: tuple[int, int], row: list[float], kinds: dict[tuple[int, int], str]
) -> BlockHealth:
    k, order, group = int(row[_NUM_FACTORS]), int(row[_ORDER]), int(row[_GROUP])
    pidx, bidx = key
    return BlockHealth(
        param_index=pidx,
        param_name=optimizer.param_name(pidx),
        block_index=bidx,
        shape=tuple(int(d) for d in row[_SHAPE : _SHAPE + order]),
        group=group,
        preconditioner=kinds.get(key) or _group_kind(optimizer, group),
        step=int(row[_STEP]),
        last_refresh_step=int(row[_LAST_REFRESH]),
        condition_numbers=tuple(row[_COND : _COND + k]),
        min_eigenvalues=tuple(row[_MIN_EIG : _MIN_EIG + k]),
        max_eigenvalues=tuple(row[_MAX_EIG : _MAX_EIG + k]),
        failure_count=int(row[_FAILURES]),
        nonfinite_count=int(row[_NONFINITE]),
        fallback=FALLBACK_NAMES[int(row[_FALLBACK])],
        epsilon_scale=row[_EPS_SCALE],
        refreshes=int(row[_REFRESHES]),
        skipped_refreshes=int(row[_SKIPPED]),
    )


def gather_health(
    optimizer: Shampoo,
    *,
    rank: int = 0,
    world_size: int = 1,
    reduce: Reduce | None = None,
    device: torch.device | str = "cpu",
) -> HealthSnapshot:
    """Health of every block, the same on every rank: one ``reduce`` (a summing all-reduce) call.

    Every rank must call this at the same point (it is a collective when ``world_size > 1``).
    ``optimizer.health()`` (which synchronises with the device) runs only where it fills rows:
    on every rank when sharded, on rank 0 otherwise.
    """
    keys = optimizer.block_keys()
    index = {key: i for i, key in enumerate(keys)}
    table = torch.zeros(len(keys) + world_size, NUM_FIELDS, dtype=torch.float64)
    if optimizer.sharded or rank == 0:
        health = optimizer.health()
        if health:
            where = torch.tensor([index[h.key] for h in health])
            table[where] = torch.tensor([_encode(h) for h in health], dtype=torch.float64)
    table[len(keys) + rank, 0] = sum(optimizer.refresh_seconds.values())
    if world_size > 1:
        if reduce is None:
            raise ValueError("gather_health needs a summing `reduce` when world_size > 1")
        table = reduce(table.to(device)).to("cpu", torch.float64)
    rows = table.tolist()
    kinds = _kinds(optimizer)
    records, doubled = [], []
    for key, row in zip(keys, rows):
        present = round(row[_PRESENT])
        if present == 1:
            records.append(_decode(optimizer, key, row, kinds))
        elif present > 1:
            doubled.append(key)
    if doubled:
        warnings.warn(
            f"the health rows of {len(doubled)} blocks (e.g. {doubled[:3]}) came from more than one "
            "rank and are left out: is `optimizer.sharded` set correctly?",
            stacklevel=2,
        )
    refresh = [row[0] for row in rows[len(keys) :]]
    return HealthSnapshot(records, refresh)


def gather_trainer_health(trainer: pl.Trainer, optimizer: Shampoo) -> HealthSnapshot:
    """``gather_health`` over a Lightning trainer's strategy (its summing all-reduce and device)."""
    strategy = trainer.strategy

    def reduce(t: Tensor) -> Tensor:
        return strategy.reduce(t, reduce_op="sum")

    return gather_health(
        optimizer,
        rank=trainer.global_rank,
        world_size=trainer.world_size,
        reduce=reduce,
        device=strategy.root_device,
    )
