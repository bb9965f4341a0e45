"""Preconditioner blocks sharded across ranks: ownership planning, the update all-gather, FSDP2.

Every block gets one owner rank, chosen by longest-processing-time-first greedy balancing of a
cost model (``refresh_weighted_cost``). The plan is a pure function of the parameter shapes and the
param-group settings, so every rank computes the same map without communicating, and every
rank can rebuild every other rank's bucket layout (``build_buckets`` with that rank's
ownership predicate). Per step, each rank runs the optimizer pipeline for the blocks it owns
only, writes their updates ``U = -lr·P`` into a persistent flat buffer in the communication
dtype, and one all-gather brings everyone's updates to every rank, which adds them to the
parameters. The single-device path forms the same ``U`` and adds it the same way, and the batched
kernels give a block the same result whatever bucket it sits in, so with fp32 communication
the parameters match a single-device run bitwise.

With FSDP2 (parameters and gradients are ``DTensor`` shards) the owner still works on whole
blocks: ``begin_step`` all-gathers the gradients (and, for weight decay, the parameters), and
after the update all-gather each rank adds the rows of its own shards — lossless, like DDP.

Optimizer state exists only on a block's owner; ``consolidate_state_dict`` gathers it on one
rank in the single-device format, keyed by (parameter, block), so a checkpoint saved on N ranks
loads on M ranks (loading keeps just the blocks the loading rank owns).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from .blocking import Bucket, block_configs, build_buckets, scatter_add_, skips_preconditioning
from .preconditioners import make_preconditioner

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from .health import BlockHealth
    from .optim import BucketPlan, Shampoo

__all__ = [
    "CostModel",
    "Distributor",
    "FSDPDistributor",
    "OwnershipPlan",
    "block_cost",
    "consolidate_checkpoint",
    "consolidate_state_dict",
    "gather_health",
    "local_state_dict",
    "lpt_assign",
    "plan_ownership",
    "refresh_weighted_cost",
    "shard_optimizer",
]

#: ``cost(block_shape, factor_dims, precondition_frequency) -> float``
CostModel = Callable[[tuple[int, ...], tuple[int, ...], int], float]

_EIGH_FLOPS = 10.0  # a symmetric eigendecomposition costs roughly 10·d³ flops


def block_cost(
    shape: tuple[int, ...], factor_dims: tuple[int, ...], precondition_frequency: int = 1
) -> float:
    """Work of one block per step, in flops: a refresh (``≈ 10·dᵢ³`` per factor: eigh and root)
    amortized over ``precondition_frequency`` steps, plus the per-step factor updates and mode
    products (``≈ 4·numel·dᵢ`` per factor) and elementwise work (``≈ 8·numel``, which is also
    what the state's memory scales with for diagonal preconditioners)."""
    numel = math.prod(shape)
    dims = [shape[i] for i in factor_dims]
    refresh = sum(_EIGH_FLOPS * d**3 for d in dims)
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


def lpt_assign(costs: Sequence[float], world_size: int) -> list[int]:
    """Longest-processing-time-first greedy: items by decreasing cost (ties: lower index first)
    each go to the least-loaded rank (ties: lower rank). Deterministic; makespan ≤ (4/3 − 1/3m)·OPT
    and ≤ mean load + largest item."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    owners = [0] * len(costs)
    heap = [(0.0, r) for r in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        owners[i] = rank
        heapq.heappush(heap, (load + float(costs[i]), rank))
    return owners


@dataclass(frozen=True)
class OwnershipPlan:
    """Owner rank of every block ``(param_index, block_index)`` and each rank's modelled load."""

    owners: dict[tuple[int, int], int]
    costs: dict[tuple[int, int], float]
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

    def predicate(self, rank: int) -> Callable[[int, int], bool]:
        owners = self.owners

        def owns(param_index: int, block_index: int) -> bool:
            owner = owners.get((param_index, block_index))
            if owner is None:
                raise RuntimeError(
                    f"block ({param_index}, {block_index}) is not in the sharding plan: "
                    "add every param group before sharding the optimizer"
                )
            return owner == rank

        return owns


def plan_ownership(optimizer: Shampoo, world_size: int, cost_model: CostModel | None = None) -> OwnershipPlan:
    """Assign every block of ``optimizer`` to a rank: LPT over ``cost_model`` (default
    ``refresh_weighted_cost``), which is called with each group's ``precondition_frequency``."""
    model = cost_model or refresh_weighted_cost
    factor_dims: dict[tuple[int, tuple[int, ...], bool], tuple[int, ...]] = {}
    keys: list[tuple[int, int]] = []
    costs: list[float] = []
    for g, (group, layouts) in enumerate(zip(optimizer.param_groups, optimizer._layouts)):
        frequency = int(group["precondition_frequency"])
        for layout, _, _ in layouts:
            config, _ = block_configs(group, layout)
            skipped = skips_preconditioning(group, layout)
            for block, shape in sorted(layout.block_shapes().items()):
                if (g, shape, skipped) not in factor_dims:
                    kernel = make_preconditioner(config, shape, layout.name)
                    factor_dims[(g, shape, skipped)] = tuple(kernel.factor_dims)
                keys.append((layout.index, block))
                costs.append(float(model(shape, factor_dims[(g, shape, skipped)], frequency)))
    owners = lpt_assign(costs, world_size)
    return OwnershipPlan(dict(zip(keys, owners)), dict(zip(keys, costs)), world_size)


# ------------------------------------------------------------------------------- process groups


def _resolve_group(process_group: Any) -> Any:
    """A ``ProcessGroup``, ``None`` (the default group), a ``DeviceMesh`` (1-D) or a Lightning
    strategy (its data-parallel group: the mesh's for model-parallel strategies, else the world)."""
    if process_group is None or isinstance(process_group, dist.ProcessGroup):
        return process_group
    if hasattr(process_group, "get_group") and hasattr(process_group, "mesh_dim_names"):
        return process_group.get_group()
    mesh = getattr(process_group, "_device_mesh", None)
    if mesh is not None:
        return mesh["data_parallel"].get_group()
    if hasattr(process_group, "root_device"):  # a Lightning strategy: DDP runs on the world group
        return None
    raise TypeError(f"process_group must be a ProcessGroup, a DeviceMesh or None, got {type(process_group)}")


def _all_gather(output: Tensor, input: Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def _is_dtensor(x: Any) -> TypeGuard[DTensor]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(x, DTensor)


# ----------------------------------------------------------------------------------- distributors


class Distributor:
    """DDP: replicated parameters and gradients. Installed as ``optimizer._distributor``."""

    def __init__(
        self, optimizer: Shampoo, group: Any, plan: OwnershipPlan, communication_dtype: torch.dtype
    ) -> None:
        self.optimizer = optimizer
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.plan = plan
        self.communication_dtype = communication_dtype
        # Every rank's buckets in the order that rank stages them, with their buffer offsets.
        self.layouts: list[list[tuple[Bucket, int, int]]] = []
        for rank in range(self.world_size):
            owns = plan.predicate(rank)
            entries, offset = [], 0
            for g, layouts in enumerate(optimizer._layouts):
                for bucket in build_buckets(
                    g,
                    layouts,
                    bucketing=optimizer._use_bucketing,
                    owns=owns,
                    max_numel=optimizer._max_bucket_numel,
                ):
                    numel = bucket.size * math.prod(bucket.block_shape)
                    entries.append((bucket, offset, numel))
                    offset += numel
            self.layouts.append(entries)
        self.chunk = max(1, max(sum(n for _, _, n in entries) for entries in self.layouts))
        self.offsets = {bucket.key: (offset, numel) for bucket, offset, numel in self.layouts[self.rank]}
        self._send: Tensor | None = None
        self._recv: Tensor | None = None
        self._staged: set[str] = set()

    @property
    def bytes_per_step(self) -> int:
        """Bytes each rank receives from the update all-gather per step."""
        return self.world_size * self.chunk * torch.finfo(self.communication_dtype).bits // 8

    def check_plans(self) -> None:
        """The optimizer's own buckets must be the ones this rank's layout expects."""
        expected = [bucket for bucket, _, _ in self.layouts[self.rank]]
        actual = [plan.bucket for plan in self.optimizer.plans]
        if expected != actual:
            raise RuntimeError("sharded bucket layout mismatch: the optimizer's plans were changed")

    def _device(self) -> torch.device:
        for entries in self.layouts:
            for bucket, _, _ in entries:
                return self.param(bucket.members[0].param.index).device
        return torch.device("cpu")

    def begin_step(self) -> None:
        device = self._device()
        if self._send is None or self._send.device != device:
            self._send = torch.zeros(self.chunk, dtype=self.communication_dtype, device=device)
            self._recv = torch.zeros(
                self.world_size * self.chunk, dtype=self.communication_dtype, device=device
            )
        self._staged.clear()

    def grad(self, index: int) -> Tensor | None:
        return self.optimizer._params[index].grad

    def param(self, index: int) -> Tensor:
        return self.optimizer._params[index]

    def stage(self, plan: BucketPlan, update: Tensor) -> None:
        """Write a bucket's ``-lr·P`` rows into this rank's segment of the send buffer."""
        assert self._send is not None, "stage() before begin_step()"
        offset, numel = self.offsets[plan.bucket.key]
        self._send[offset : offset + numel].view(update.shape).copy_(update)
        self._staged.add(plan.bucket.key)

    def finish_step(self) -> None:
        """All-gather every rank's updates and add all of them to the parameters."""
        assert self._send is not None and self._recv is not None
        for key, (offset, numel) in self.offsets.items():
            if key not in self._staged:  # no gradient at all: no update (as on a single device)
                self._send[offset : offset + numel].zero_()
        _all_gather(self._recv, self._send, self.group)
        self._apply(self._recv)
        self._staged.clear()

    def _updates(self, recv: Tensor) -> list[tuple[Bucket, Tensor]]:
        out = []
        for rank, entries in enumerate(self.layouts):
            base = rank * self.chunk
            for bucket, offset, numel in entries:
                rows = recv[base + offset : base + offset + numel]
                out.append((bucket, rows.view(bucket.size, *bucket.block_shape)))
        return out

    def _apply(self, recv: Tensor) -> None:
        params = self.optimizer._params
        for bucket, rows in self._updates(recv):
            scatter_add_(bucket, {m.param.index: params[m.param.index] for m in bucket.members}, rows, 1.0)


class FSDPDistributor(Distributor):
    """FSDP2: parameters and gradients are ``DTensor`` shards (possibly uneven or empty).

    ``begin_step`` materialises full gradients (and full parameters where weight decay needs
    them) of the parameters this rank owns blocks of; the pipeline then sees whole blocks, as
    with DDP. After the update all-gather each rank adds the rows of its local shards.
    """

    def __init__(
        self, optimizer: Shampoo, group: Any, plan: OwnershipPlan, communication_dtype: torch.dtype
    ) -> None:
        super().__init__(optimizer, group, plan, communication_dtype)
        self._needed = {m.param.index for bucket, _, _ in self.layouts[self.rank] for m in bucket.members}
        self._full_grads: dict[int, Tensor | None] = {}
        self._full_params: dict[int, Tensor] = {}

    def begin_step(self) -> None:
        super().begin_step()
        self._full_grads, self._full_params = {}, {}
        decayed: set[int] = set()
        for group in self.optimizer.param_groups:
            if group["weight_decay"] != 0.0:
                decayed.update(id(p) for p in group["params"])
        # Collectives: every rank walks the same parameters in the same order.
        for index, p in enumerate(self.optimizer._params):
            grad = p.grad
            if grad is None:
                continue
            full = grad.full_tensor() if _is_dtensor(grad) else grad
            if index in self._needed:
                self._full_grads[index] = full
            if id(p) in decayed and _is_dtensor(p):
                full_param = p.full_tensor()
                if index in self._needed:
                    self._full_params[index] = full_param

    def grad(self, index: int) -> Tensor | None:
        p = self.optimizer._params[index]
        if _is_dtensor(p):
            return self._full_grads.get(index)
        return p.grad

    def param(self, index: int) -> Tensor:
        """The full parameter when the step needs its values (weight decay); otherwise the
        local shard, which only tells the pipeline the dtype and device."""
        p = self.optimizer._params[index]
        if index in self._full_params:
            return self._full_params[index]
        return p.to_local() if _is_dtensor(p) else p

    def finish_step(self) -> None:
        super().finish_step()
        self._full_grads, self._full_params = {}, {}

    def _apply(self, recv: Tensor) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        params = self.optimizer._params
        full: dict[int, Tensor] = {}
        for bucket, rows in self._updates(recv):
            for m in bucket.members:
                if m.param.index not in full:
                    p = params[m.param.index]
                    full[m.param.index] = torch.zeros(p.shape, dtype=recv.dtype, device=recv.device)
            scatter_add_(bucket, full, rows, 1.0)  # 0 + u: exact, so the shard gets p + u as in DDP
        for index, update in full.items():
            p = params[index]
            if not _is_dtensor(p):
                p.add_(update)
                continue
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = p.to_local()
            if local.numel():
                local.add_(update[tuple(slice(o, o + s) for o, s in zip(offset, shape))])


# ------------------------------------------------------------------------------------- entry points


def shard_optimizer(
    optimizer: Shampoo,
    process_group: Any = None,
    communication_dtype: torch.dtype = torch.float32,
    *,
    cost_model: CostModel | None = None,
) -> Distributor | None:
    """Split ``optimizer``'s preconditioner blocks across the ranks of ``process_group``.

    ``process_group``: a ``ProcessGroup`` (``None``: the default group), a 1-D ``DeviceMesh`` or
    a Lightning strategy. ``communication_dtype`` (fp32, bf16, fp16) is the dtype of the update
    all-gather: fp32 keeps sharded == single-device bitwise, bf16 halves the traffic.
    Existing state is re-distributed (each rank keeps its blocks). With one rank and no
    ``DTensor`` parameters there is nothing to do and ``None`` is returned. Collective-free:
    every rank computes the same plan from the shapes alone, but every rank must call it.
    """
    if communication_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"communication_dtype must be a floating dtype, got {communication_dtype}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_optimizer needs an initialised torch.distributed process group")
    group = _resolve_group(process_group)
    fsdp = any(_is_dtensor(p) for p in optimizer._params)
    if optimizer._distributor is not None:
        if optimizer._distributor.group is group:
            return optimizer._distributor
        raise RuntimeError("the optimizer is already sharded over another process group")
    world_size = dist.get_world_size(group)
    if world_size == 1 and not fsdp:
        return None
    plan = plan_ownership(optimizer, world_size, cost_model)
    saved = optimizer.state_dict() if len(optimizer.state) else None
    rank = dist.get_rank(group)
    optimizer._owns = plan.predicate(rank)
    optimizer._replan()
    optimizer.state.clear()
    cls = FSDPDistributor if fsdp else Distributor
    distributor = cls(optimizer, group, plan, communication_dtype)
    distributor.check_plans()
    optimizer._distributor = distributor
    optimizer.sharded = world_size > 1
    if saved is not None:
        optimizer.load_state_dict(saved)
    else:
        optimizer._sync_fallback_flags()
    return distributor


def local_state_dict(optimizer: Shampoo) -> dict[str, Any]:
    """This rank's ``state_dict`` with every tensor copied to the CPU (compact, not views of the
    bucket tensors): what a rank contributes to a consolidated or distributed checkpoint."""
    state = optimizer.state_dict()
    copied = {
        pidx: {key: value.detach().to("cpu", copy=True) for key, value in entries.items()}
        for pidx, entries in state["state"].items()
    }
    return {"state": copied, "param_groups": state["param_groups"]}


def consolidate_state_dict(optimizer: Shampoo, dst: int = 0) -> dict[str, Any]:
    """Collective: rank ``dst`` (of the optimizer's group) gets every block's state, keyed by
    (parameter, block) exactly like a single-device ``state_dict()``; the other ranks get their
    own part. Without sharding this is ``optimizer.state_dict()`` on every rank."""
    distributor = optimizer._distributor
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
    return {"state": state, "param_groups": local["param_groups"]}


def gather_health(optimizer: Shampoo) -> list[BlockHealth]:
    """Collective: every block's ``BlockHealth`` once, on every rank, ordered by (param, block).
    (Lightning callbacks use ``callbacks._health_table.gather_health``, one all-reduce.)"""
    records = optimizer.health()
    distributor = optimizer._distributor
    if distributor is not None and optimizer.sharded:
        parts: list[Any] = [None] * distributor.world_size
        dist.all_gather_object(parts, records, group=distributor.group)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: (r.param_index, r.block_index))


def consolidate_checkpoint(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """For a Lightning checkpoint being saved under a strategy that stores rank 0's own
    ``optimizer.state_dict()`` (plain DDP): replace each sharded Shampoo's entry by every block's
    state. Collective: every rank calls it (``ShampooCallback.on_save_checkpoint`` does). The
    Shampoo strategies consolidate themselves and are left alone."""
    from .optim import Shampoo

    states = checkpoint.get("optimizer_states")
    if states is None or getattr(trainer.strategy, "consolidates_shampoo_state", False):
        return
    for i, optimizer in enumerate(trainer.optimizers):
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        if isinstance(optimizer, Shampoo) and optimizer.sharded and i < len(states):
            states[i] = consolidate_state_dict(optimizer)
