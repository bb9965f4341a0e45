"""Preconditioner blocks sharded across ranks: the update all-gather, FSDP2, consolidated state.

The plan (``plan.py``) gives every block one owner rank; every rank computes the same plan from
the shapes alone. Per step each rank runs the optimizer's stages for the blocks it owns, hands
the distributor their updates ``U = -lr·P`` (its lanes' direction buffers), and one all-gather
brings everyone's updates to every rank, which adds them to the parameters. The single-device
path forms the same ``U`` and adds it the same way, and the batched kernels give a block the same
result whatever bucket it sits in, so with fp32 communication the parameters match a
single-device run bitwise.

A distributor sees the parameters and the plan, never the optimizer: gradients in
(``gradients``), parameters for weight decay (``parameters``), staged updates out (``finish``).
With FSDP2 (parameters and gradients are ``DTensor`` shards) it gathers the full gradients of the
parameters whose blocks its rank owns (and, for weight decay, their values) before the step, and
after the update all-gather each rank adds the rows of its own shards — lossless, like DDP.
Parameters that ``fully_shard`` left replicated get no gradient averaging from FSDP2; the
distributor averages their gradients across ranks as DDP would (one all-reduce), so every rank
steps them with the same, averaged gradient.

Optimizer state exists only on a block's owner; ``consolidate_state_dict`` gathers it on one
rank in the single-device format, keyed by (parameter, block), so a checkpoint saved on N ranks
loads on M ranks (loading keeps just the blocks the loading rank owns).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from ._workspace import Lane
from .plan import (
    BlockPlan,
    CostModel,
    OwnershipPlan,
    block_cost,
    lpt_assign,
    refresh_weighted_cost,
)

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from .health import BlockHealth

__all__ = [
    "CostModel",
    "Distributor",
    "FSDPDistributor",
    "OwnershipPlan",
    "block_cost",
    "check_same_plan",
    "consolidate_state_dict",
    "gather_health",
    "local_state_dict",
    "lpt_assign",
    "make_distributor",
    "plan_ownership",
    "refresh_weighted_cost",
    "resolve_group",
    "shard_optimizer",
]

log = logging.getLogger(__name__)
COMMUNICATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ------------------------------------------------------------------------------- process groups


def resolve_group(process_group: Any) -> Any:
    """A ``ProcessGroup``, ``None`` (the default group), a ``DeviceMesh`` (1-D) or a Lightning
    strategy (its data-parallel group: the mesh's for model-parallel strategies, else the world)."""
    if process_group is None or isinstance(process_group, dist.ProcessGroup):
        return process_group
    if hasattr(process_group, "get_group") and hasattr(process_group, "mesh_dim_names"):
        return process_group.get_group()
    mesh = getattr(process_group, "device_mesh", None)
    if mesh is not None and getattr(mesh, "mesh_dim_names", None):
        return mesh["data_parallel"].get_group()
    if hasattr(process_group, "root_device"):  # a Lightning strategy: DDP runs on the world group
        return None
    raise TypeError(f"process_group must be a ProcessGroup, a DeviceMesh or None, got {type(process_group)}")


def _all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def is_dtensor(x: Any) -> TypeGuard[DTensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(x, DTensor)


def check_same_plan(plan: BlockPlan, group: Any) -> None:
    """Collective: every rank must have built the same plan; if not, every rank raises the same
    error (rather than one raising and the others hanging in the next collective)."""
    mine = (plan.world_size, plan.chunk, len(plan.buckets), plan.fingerprint())
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != mine for other in everyone):
        raise RuntimeError(
            "the ranks built different block plans (were the models, param groups or options different "
            f"across ranks?): per rank (world, chunk, buckets, digest) = {everyone}"
        )


# ----------------------------------------------------------------------------------- distributors


class Distributor:
    """DDP: replicated parameters and gradients."""

    def __init__(
        self, params: Sequence[Tensor], plan: BlockPlan, group: Any, communication_dtype: torch.dtype
    ) -> None:
        if communication_dtype not in COMMUNICATION_DTYPES:
            raise ValueError(f"communication_dtype must be a floating dtype, got {communication_dtype}")
        self.params = list(params)
        self.plan = plan
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.communication_dtype = communication_dtype
        self.chunk = plan.chunk
        self._send: Tensor | None = None
        self._recv: Tensor | None = None
        self._targets: list[tuple[Tensor, Tensor]] | None = None  # (param region view, recv rows)

    def replan(self, params: Sequence[Tensor], plan: BlockPlan, decayed: set[int]) -> None:
        """A param group was added: the parameters and the plan grew (existing blocks kept their
        owners); buffers and cached views are rebuilt at the next step."""
        self.params = list(params)
        self.plan = plan
        self.chunk = plan.chunk
        self._send = self._recv = None
        self._targets = None

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank receives from the update all-gather per step."""
        return self.world_size * self.chunk * torch.finfo(self.communication_dtype).bits // 8

    def gradients(self) -> list[Tensor | None]:
        """The gradients the optimizer's stages should see, by parameter index."""
        return [p.grad for p in self.params]

    def parameters(self) -> list[Tensor]:
        """The parameters' values where a stage needs them (weight decay), by index."""
        return self.params

    def _buffers(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self._send is None or self._send.device != device:
            self._send = torch.zeros(self.chunk, dtype=self.communication_dtype, device=device)
            self._recv = torch.zeros(
                self.world_size * self.chunk, dtype=self.communication_dtype, device=device
            )
            self._targets = None
        assert self._recv is not None
        return self._send, self._recv

    def finish(self, lanes: Sequence[Lane], device: torch.device, assign: bool = False) -> None:
        """All-gather every rank's staged updates (this rank's lanes' direction buffers; rows
        of buckets without any gradient this step hold zeros) and add them to the parameters
        (``assign``: write them, the values of the iterate-averaging train ↔ eval swap)."""
        send, recv = self._buffers(device)
        offsets = {b.key: o for b, o in self.plan.segments(self.rank)}
        dsts, srcs = [], []
        for lane in lanes:
            for slot in lane.slots:
                offset = offsets[slot.bucket.key]
                dsts.append(send[offset : offset + slot.bucket.numel])
                srcs.append(slot.out.view(-1))
        if dsts:
            torch._foreach_copy_(dsts, srcs)
        _all_gather(recv, send, self.group)
        self._apply(recv, assign)

    def _received(self, recv: Tensor) -> list[tuple[Any, Tensor]]:
        """``(member link, its rows of the received updates)`` for every bucket of every rank."""
        out = []
        for rank in range(self.world_size):
            base = rank * self.chunk
            for bucket, offset in self.plan.segments(rank):
                numel = 1
                for d in bucket.block_shape:
                    numel *= d
                for m in bucket.members:
                    start = base + offset + m.offset * numel
                    out.append((m, m.region.rows_view(recv[start:], 0)))
        return out

    def _apply(self, recv: Tensor, assign: bool = False) -> None:
        if self._targets is None:
            self._targets = [
                (m.region.split_view(m.param.processed(self.params[m.param.index])), rows)
                for m, rows in self._received(recv)
            ]
        if self._targets:
            write = torch._foreach_copy_ if assign else torch._foreach_add_
            write([p for p, _ in self._targets], [u for _, u in self._targets])


class FSDPDistributor(Distributor):
    """FSDP2: parameters and gradients are ``DTensor`` shards (possibly uneven or empty). See the
    module docstring."""

    def __init__(
        self,
        params: Sequence[Tensor],
        plan: BlockPlan,
        group: Any,
        communication_dtype: torch.dtype,
        decayed: set[int],
    ) -> None:
        super().__init__(params, plan, group, communication_dtype)
        self._needed = {m.param.index for b in plan.local(self.rank) for m in b.members}
        self._decayed = decayed
        self.replicated = [i for i, p in enumerate(self.params) if not is_dtensor(p)]
        if self.replicated and self.rank == 0:
            log.info(
                "shampoo_fsdp: %d parameter(s) are not sharded by fully_shard (e.g. %s); their gradients "
                "are averaged across ranks as DDP would",
                len(self.replicated),
                self.replicated[:3],
            )
        self._full_params: dict[int, Tensor] = {}

    def replan(self, params: Sequence[Tensor], plan: BlockPlan, decayed: set[int]) -> None:
        super().replan(params, plan, decayed)
        self._needed = {m.param.index for b in plan.local(self.rank) for m in b.members}
        self._decayed = decayed
        self.replicated = [i for i, p in enumerate(self.params) if not is_dtensor(p)]

    def gradients(self) -> list[Tensor | None]:
        """Collectives, in the same order on every rank: each DTensor gradient's full tensor, and
        one averaging all-reduce over the replicated parameters' gradients."""
        grads: list[Tensor | None] = [None] * len(self.params)
        replicated = [
            p.grad for i, p in enumerate(self.params) if i in set(self.replicated) and p.grad is not None
        ]
        if replicated and self.world_size > 1:
            flat = torch.cat([g.reshape(-1) for g in replicated])
            dist.all_reduce(flat, group=self.group)
            flat /= self.world_size
            torch._foreach_copy_(replicated, list(flat.split([g.numel() for g in replicated])))
        self._full_params = {}
        for index, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            full = grad.full_tensor() if is_dtensor(grad) else grad
            if index in self._needed:
                grads[index] = full
            if index in self._decayed and is_dtensor(p):
                value = p.full_tensor()
                if index in self._needed:
                    self._full_params[index] = value
        return grads

    def parameters(self) -> list[Tensor]:
        """Full values where weight decay needs them; the local shard (dtype and device only)
        elsewhere."""
        return [
            self._full_params.get(i, p.to_local() if is_dtensor(p) else p) for i, p in enumerate(self.params)
        ]

    def _apply(self, recv: Tensor, assign: bool = False) -> None:
        if assign:
            raise NotImplementedError("iterate averaging's train/eval swap is not available under FSDP")
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        full: dict[int, Tensor] = {}
        pairs = []
        for m, rows in self._received(recv):
            index = m.param.index
            if index not in full:
                full[index] = torch.zeros(self.params[index].shape, dtype=recv.dtype, device=recv.device)
            pairs.append((m.region.split_view(m.param.processed(full[index])), rows))
        if pairs:
            torch._foreach_add_([p for p, _ in pairs], [u for _, u in pairs])  # 0 + u: exact
        for index, update in full.items():
            p = self.params[index]
            if not is_dtensor(p):
                p.add_(update)
                continue
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel():
                local.add_(update[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
        self._full_params = {}


def make_distributor(
    params: Sequence[Tensor],
    plan: BlockPlan,
    group: Any,
    communication_dtype: torch.dtype,
    decayed: set[int],
) -> Distributor:
    """The distributor for these parameters: FSDP2's when any of them is a ``DTensor``."""
    if any(is_dtensor(p) for p in params):
        return FSDPDistributor(params, plan, group, communication_dtype, decayed)
    return Distributor(params, plan, group, communication_dtype)


# ------------------------------------------------------------------------------- consolidation


def local_state_dict(optimizer: Any) -> dict[str, Any]:
    """This rank's ``state_dict`` with every tensor copied to the CPU (compact, not views of the
    bucket tensors): what a rank contributes to a consolidated or distributed checkpoint."""
    state = optimizer.state_dict()
    copied = {
        pidx: {key: value.detach().to("cpu", copy=True) for key, value in entries.items()}
        for pidx, entries in state["state"].items()
    }
    return {**state, "state": copied}


def consolidate_state_dict(optimizer: Any, dst: int = 0) -> dict[str, Any]:
    """Collective: rank ``dst`` (of the optimizer's group) gets every block's state, keyed by
    (parameter, block) exactly like a single-device ``state_dict()``; the other ranks get their
    own part. Without sharding this is ``optimizer.state_dict()`` on every rank."""
    distributor = getattr(optimizer, "distributor", None)
    if distributor is None or not optimizer.sharded:
        return optimizer.state_dict()
    group = distributor.group
    local = local_state_dict(optimizer)
    parts: list[Any] | None = [None] * distributor.world_size if distributor.rank == dst else None
    dist.gather_object(
        local["state"], parts, dst=dst if group is None else dist.get_global_rank(group, dst), group=group
    )
    if parts is None:
        return local
    state: dict[int, dict[str, Tensor]] = {}
    for part in parts:
        for pidx, entries in part.items():
            target = state.setdefault(pidx, {})
            if target.keys() & entries.keys():
                raise RuntimeError(f"parameter {pidx}: two ranks hold the same block state")
            target.update(entries)
    return {**local, "state": state}


def gather_health(optimizer: Any) -> list[BlockHealth]:
    """Collective: every block's ``BlockHealth`` once, on every rank, ordered by (param, block).
    (Lightning callbacks use ``callbacks._health_table.gather_health``, one all-reduce.)"""
    records = optimizer.health()
    distributor = getattr(optimizer, "distributor", None)
    if distributor is not None and optimizer.sharded:
        parts: list[Any] = [None] * distributor.world_size
        dist.all_gather_object(parts, records, group=distributor.group)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: (r.param_index, r.block_index))


def plan_ownership(optimizer: Any, world_size: int, cost_model: CostModel | None = None) -> OwnershipPlan:
    """Assign every block of ``optimizer`` to a rank: LPT over ``cost_model`` (default
    ``refresh_weighted_cost``), called with each group's ``precondition_frequency``."""
    return optimizer.build_plan(world_size=world_size, cost_model=cost_model).ownership


def shard_optimizer(
    optimizer: Any,
    process_group: Any = None,
    communication_dtype: torch.dtype = torch.float32,
    *,
    cost_model: CostModel | None = None,
) -> Distributor | None:
    """``optimizer.shard(process_group, communication_dtype, cost_model=cost_model)``."""
    return optimizer.shard(process_group, communication_dtype, cost_model=cost_model)
