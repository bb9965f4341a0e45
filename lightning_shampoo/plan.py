"""The block plan: every block of every parameter, its bucket, its kernels and its owner rank.

One value object, built once from the parameter layouts, the param-group options and the
world size, and consumed by everything that needs to know where a block lives: the optimizer
(which buckets this rank steps, with which kernels), the distributor (where each rank's updates sit
in the all-gather buffer) and the checkpoints (which bucket row holds block ``b`` of parameter
``p``). Every rank builds the same plan from the shapes alone, so no communication is needed to
agree on it; a rank's own work is ``plan.local(rank)``.

Ownership: every block gets one owner rank, by longest-processing-time-first balancing of a cost
model (``refresh_weighted_cost``). Blocks that already have an owner keep it when the plan is
rebuilt (a param group added mid-run), so their state never has to move between ranks.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .blocking import ParamLayout, Region
from .factoring import unfactored_dims, with_unfactored_dims
from .preconditioners import Preconditioner, make_preconditioner

__all__ = [
    "BlockPlan",
    "Bucket",
    "BucketMember",
    "CostModel",
    "GroupBlocks",
    "OwnershipPlan",
    "block_cost",
    "build_plan",
    "lpt_assign",
    "refresh_flops",
    "refresh_weighted_cost",
]

#: ``cost(block_shape, factor_dims, precondition_frequency) -> float``
CostModel = Callable[[tuple[int, ...], tuple[int, ...], int], float]
BlockKey = tuple[int, int]  # (param index, block index)

_EIGH_FLOPS = 10.0  # a symmetric eigendecomposition costs roughly 10·d³ flops


def refresh_flops(shape: tuple[int, ...], factor_dims: tuple[int, ...]) -> float:
    """Work of one refresh of one block, in flops (``≈ 10·dᵢ³`` per factor: eigh and root)."""
    return sum(_EIGH_FLOPS * shape[i] ** 3 for i in factor_dims)


def block_cost(
    shape: tuple[int, ...], factor_dims: tuple[int, ...], precondition_frequency: int = 1
) -> float:
    """Work of one block per step, in flops: a refresh (``≈ 10·dᵢ³`` per factor: eigh and root)
    amortized over ``precondition_frequency`` steps, plus the per-step factor updates and mode
    products (``≈ 4·numel·dᵢ`` per factor) and elementwise work (``≈ 8·numel``, which is also
    what the state's memory scales with for diagonal preconditioners)."""
    numel = math.prod(shape)
    dims = [shape[i] for i in factor_dims]
    refresh = refresh_flops(shape, factor_dims)
    return refresh / max(1, precondition_frequency) + numel * (8.0 + 4.0 * sum(dims))


def refresh_weighted_cost(
    shape: tuple[int, ...], factor_dims: tuple[int, ...], precondition_frequency: int = 1
) -> float:
    """The planner's default: ``block_cost`` with the refresh counted in full, whatever the
    frequency. Every rank refreshes at the same step, so a rank with more refresh work holds up
    all the others at every refresh, however rare; weighting the refresh fully balances that
    spike — and with it the state's memory (∝ Σdᵢ²) and, nearly, the per-step products. (With
    the refresh amortized, LLaMA-7B's refresh flops at 64 ranks are 1.09x the mean on the
    slowest rank; counted in full, 1.002x.)"""
    return block_cost(shape, factor_dims, 1)


def lpt_assign(costs: Sequence[float], world_size: int, loads: Sequence[float] | None = None) -> list[int]:
    """Longest-processing-time-first greedy: items by decreasing cost (ties: lower index first)
    each go to the least-loaded rank (ties: lower rank), starting from ``loads`` (default zero).
    Deterministic; makespan ≤ (4/3 − 1/3m)·OPT and ≤ mean load + largest item."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    start = list(loads) if loads is not None else [0.0] * world_size
    heap = [(float(start[r]), r) for r in range(world_size)]
    heapq.heapify(heap)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + float(costs[i]), rank))
    return owners


@dataclass(frozen=True)
class OwnershipPlan:
    """Owner rank of every block ``(param_index, block_index)`` and each rank's modelled load."""

    owners: Mapping[BlockKey, int]
    costs: Mapping[BlockKey, float]
    world_size: int

    @property
    def loads(self) -> list[float]:
        loads = [0.0] * self.world_size
        for key, rank in self.owners.items():
            loads[rank] += self.costs[key]
        return loads

    @property
    def imbalance(self) -> float:
        """max / mean load (1.0 is perfect balance)."""
        loads = self.loads
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class GroupBlocks:
    """What decides one param group's blocks and kernels: its parameters' layouts (empty
    parameters have none), dtypes and devices, and the group's kernel options."""

    index: int
    layouts: tuple[ParamLayout, ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[str, ...]
    preconditioner_config: Any
    grafting_config: Any
    skip_preconditioning_rank_lt: int = 0
    precondition_frequency: int = 1
    max_factor_dim: float = math.inf
    max_factor_ratio: float = math.inf

    @property
    def factor_rule(self) -> tuple[float, float]:
        """``(max_factor_dim, max_factor_ratio)``: which block dims get no factor (``factoring``)."""
        return (self.max_factor_dim, self.max_factor_ratio)

    def skips(self, layout: ParamLayout) -> bool:
        """``skip_preconditioning_rank_lt`` leaves this parameter to its grafting config alone."""
        return layout.rank < self.skip_preconditioning_rank_lt

    def configs(self, layout: ParamLayout) -> tuple[Any, Any]:
        """``(preconditioner config, grafting config or None)`` of one parameter's blocks."""
        if self.skips(layout):
            return self.grafting_config, None
        return self.preconditioner_config, self.grafting_config


@dataclass(frozen=True)
class BucketMember:
    """Rows ``offset : offset + region.count`` of a bucket hold ``region`` of ``param``."""

    param: ParamLayout
    region: Region
    offset: int


@dataclass(frozen=True)
class Bucket:
    """Same-shape blocks of one param group and one owner, stacked into ``[size, *block_shape]``
    tensors, with the kernels that serve them (stateless: the state lives in the optimizer)."""

    key: str
    group: int
    owner: int
    block_shape: tuple[int, ...]
    dtype: torch.dtype
    members: tuple[BucketMember, ...]
    config: Any
    graft_config: Any
    kernel: Preconditioner = field(compare=False, repr=False)
    graft: Preconditioner | None = field(compare=False, repr=False)

    @property
    def size(self) -> int:
        return sum(m.region.count for m in self.members)

    @property
    def numel(self) -> int:
        return self.size * math.prod(self.block_shape)

    def rows(self) -> list[BlockKey]:
        """``(param index, block index)`` of every row, in row order."""
        return [(m.param.index, b) for m in self.members for b in m.region.block_ids]


@dataclass(frozen=True)
class BlockPlan:
    """Every bucket of every rank (rank-major, each rank's in the order it stages them)."""

    groups: tuple[GroupBlocks, ...]
    buckets: tuple[Bucket, ...]
    ownership: OwnershipPlan

    @property
    def world_size(self) -> int:
        return self.ownership.world_size

    def local(self, rank: int = 0) -> tuple[Bucket, ...]:
        """The buckets rank ``rank`` holds state for and steps."""
        return tuple(b for b in self.buckets if b.owner == rank)

    def segments(self, rank: int) -> list[tuple[Bucket, int]]:
        """Rank ``rank``'s buckets with their offsets in its segment of the update buffer."""
        out, offset = [], 0
        for bucket in self.local(rank):
            out.append((bucket, offset))
            offset += bucket.numel
        return out

    @property
    def chunk(self) -> int:
        """Elements per rank in the update all-gather (the largest rank's total, at least 1)."""
        totals = [sum(b.numel for b in self.local(r)) for r in range(self.world_size)]
        return max(1, *totals)

    def block_keys(self) -> list[BlockKey]:
        """Every block of every parameter in a fixed order, the same on every rank."""
        return [
            (layout.index, block)
            for group in self.groups
            for layout in group.layouts
            for block in range(layout.num_blocks)
        ]

    def fingerprint(self) -> str:
        """A digest of the plan that is equal on every rank (and process) exactly when the plans
        are: buckets, owners, shapes, dtypes, kernels and rows."""
        parts = [
            (
                b.key,
                b.group,
                b.owner,
                b.block_shape,
                str(b.dtype),
                b.kernel.kind,
                b.kernel.factor_dims,
                b.graft is not None,
                b.rows(),
            )
            for b in self.buckets
        ]
        return hashlib.sha256(repr((self.world_size, parts)).encode()).hexdigest()

    def owner(self, key: BlockKey) -> int:
        return self.ownership.owners[key]

    def layout(self, param_index: int) -> ParamLayout | None:
        for group in self.groups:
            for layout in group.layouts:
                if layout.index == param_index:
                    return layout
        return None


def _kernel(
    cache: dict[Any, Preconditioner],
    config: Any,
    shape: tuple[int, ...],
    where: str,
    rule: tuple[float, float] = (math.inf, math.inf),
) -> Preconditioner:
    """The kernel of ``config`` over ``shape`` blocks, with no factor along the dims ``rule``
    (``max_factor_dim``, ``max_factor_ratio``) leaves out (``factoring.py``)."""
    key = (id(config), shape, rule)
    if key not in cache:
        config = with_unfactored_dims(config, shape, unfactored_dims(shape, *rule))
        cache[key] = make_preconditioner(config, shape, where)
    return cache[key]


def _costs(groups: Sequence[GroupBlocks], model: CostModel, kernels: dict[Any, Preconditioner]) -> dict:
    costs: dict[BlockKey, float] = {}
    for group in groups:
        for layout in group.layouts:
            config, _ = group.configs(layout)
            for block, shape in sorted(layout.block_shapes().items()):
                kernel = _kernel(kernels, config, shape, layout.name, group.factor_rule)
                dims = tuple(kernel.factor_dims)
                costs[(layout.index, block)] = float(model(shape, dims, group.precondition_frequency))
    return costs


def _owners(
    costs: Mapping[BlockKey, float], world_size: int, keep: Mapping[BlockKey, int] | None
) -> dict[BlockKey, int]:
    keep = {k: r for k, r in (keep or {}).items() if k in costs and r < world_size}
    loads = [0.0] * world_size
    for key, rank in keep.items():
        loads[rank] += costs[key]
    new = [k for k in costs if k not in keep]
    assigned = lpt_assign([costs[k] for k in new], world_size, loads)
    return {**keep, **dict(zip(new, assigned))}


def build_plan(
    groups: Sequence[GroupBlocks],
    *,
    world_size: int = 1,
    bucketing: bool = True,
    max_bucket_numel: int | None = None,
    cost_model: CostModel | None = None,
    owners: Mapping[BlockKey, int] | None = None,
) -> BlockPlan:
    """Blocks → owners → buckets.

    ``bucketing=False`` gives one bucket per block (the reference one-block-at-a-time path).
    ``max_bucket_numel`` caps a bucket's largest per-step tensor (``n·max(block numel, dᵢ²)``
    elements): beyond a few blocks batching gains nothing, while very large temporaries cost
    memory. Blocks that skip preconditioning never share a bucket with those that do (they get
    other kernels). With ``world_size > 1`` blocks are assigned to owners (``owners`` keeps
    earlier assignments) and each rank's buckets hold single-block regions it owns.
    """
    kernels: dict[Any, Preconditioner] = {}
    costs = _costs(groups, cost_model or refresh_weighted_cost, kernels)
    owner_map = _owners(costs, world_size, owners) if world_size > 1 else dict.fromkeys(costs, 0)
    split = world_size > 1 or not bucketing
    buckets: list[Bucket] = []
    for rank in range(world_size):
        prefix = f"r{rank}." if world_size > 1 else ""
        for group in groups:
            buckets += _group_buckets(
                group, rank, prefix, owner_map, split, bucketing, max_bucket_numel, kernels
            )
    return BlockPlan(tuple(groups), tuple(buckets), OwnershipPlan(owner_map, costs, world_size))


def _group_buckets(
    group: GroupBlocks,
    rank: int,
    prefix: str,
    owners: Mapping[BlockKey, int],
    split: bool,
    bucketing: bool,
    max_numel: int | None,
    kernels: dict[Any, Preconditioner],
) -> list[Bucket]:
    grouped: dict[tuple[Any, ...], list[tuple[ParamLayout, Region]]] = {}
    for layout, dtype, device in zip(group.layouts, group.dtypes, group.devices):
        for region in layout.regions:
            for part in region.split() if split else [region]:
                if owners[(layout.index, part.block_ids[0])] != rank:
                    continue
                shape = part.block_shape[1:] if layout.stacked else part.block_shape
                key: tuple[Any, ...] = (shape, dtype, device, group.skips(layout))
                if not bucketing:
                    key = (*key, layout.index, part.block_ids[0])
                grouped.setdefault(key, []).append((layout, part))
    out: list[Bucket] = []
    for (shape, dtype, *_), items in grouped.items():
        name = "x".join(map(str, shape)) or "scalar"
        # A dim the factor rule leaves unfactored has no d x d temporaries (``factoring.py``).
        unfactored = unfactored_dims(shape, *group.factor_rule)
        per_block = max([math.prod(shape), *(d * d for i, d in enumerate(shape) if i not in unfactored)])
        cap = max(1, max_numel // per_block) if max_numel else None
        config, graft = group.configs(items[0][0])
        for chunk in _chunks(items, cap):
            members, offset = [], 0
            for layout, region in chunk:
                members.append(BucketMember(layout, region, offset))
                offset += region.count
            where = "parameter(s) " + ", ".join(dict.fromkeys(m.param.name for m in members))
            kernel = _kernel(kernels, config, shape, where, group.factor_rule)
            out.append(
                Bucket(
                    key=f"{prefix}g{group.index}.b{len(out)}.{name}",
                    group=group.index,
                    owner=rank,
                    block_shape=shape,
                    dtype=dtype,
                    members=tuple(members),
                    config=kernel.config,
                    graft_config=graft,
                    kernel=kernel,
                    graft=None if graft is None else _kernel(kernels, graft, shape, where),
                )
            )
    return out


def _chunks(
    items: list[tuple[ParamLayout, Region]], cap: int | None
) -> list[list[tuple[ParamLayout, Region]]]:
    """Split a bucket's regions into runs of at most ``cap`` blocks (splitting large regions)."""
    if cap is None:
        return [items]
    chunks: list[list[tuple[ParamLayout, Region]]] = [[]]
    count = 0
    for layout, region in items:
        for part in region.split() if region.count > cap else [region]:
            if count + part.count > cap and chunks[-1]:
                chunks.append([])
                count = 0
            chunks[-1].append((layout, part))
            count += part.count
    return chunks


def iter_rows(buckets: Iterable[Bucket]) -> Iterable[tuple[Bucket, int, BlockKey]]:
    """``(bucket, row, (param index, block index))`` of every row of ``buckets``."""
    for bucket in buckets:
        for row, key in enumerate(bucket.rows()):
            yield bucket, row, key
